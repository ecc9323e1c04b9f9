"""`virtpolicy profiles check`: what a profile author wants to know before shipping a profile.

Parse errors and unknown variables or values (file:line), rules whose condition can never hold, a
profile that cannot be satisfied on its own on the default host, and pairs of profiles that can never be
combined, each with the reason. "Never" is judged on the embedded host for a modern Linux and a Windows
guest, a typical partial domain: the same sample a management app starts from.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from virtpolicy.core.solve import Conflict, Solver
from virtpolicy.errors import ProfileError
from virtpolicy.inputs.domain import Domain
from virtpolicy.knowledge.vocabulary import profile_vocabulary
from virtpolicy.profiles.expr import ExprError
from virtpolicy.profiles.facts import Facts
from virtpolicy.profiles.library import load_profile
from virtpolicy.profiles.model import Profile, Rule
from virtpolicy.results import Finding

if TYPE_CHECKING:
    from virtpolicy.engine import Engine

SAMPLE_GUESTS = ("fedora37", "win10", "rhel6.10", "winxp", "win11", "freebsd13.1")
SOLVE_GUESTS = ("fedora37", "win10")
SAMPLE_DOMAIN = b"""<domain type='kvm'><name>profile-check</name><memory unit='MiB'>2048</memory><vcpu>2</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><source file='/var/lib/libvirt/images/check.qcow2'/></disk>
<interface type='network'><source network='default'/></interface></devices></domain>"""
MAX_ENUMERATED = 4096


@dataclass
class CheckReport:
    profiles: list[Profile] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    incompatible: list[tuple[str, str, str]] = field(default_factory=list)  # (a, b, reason)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]


class ProfileChecker:
    """Lints through the engine's own pipeline (`Engine._build`), on the engine's default host."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.host = engine.host()
        self.domain = Domain.from_bytes(SAMPLE_DOMAIN, "profile-check sample domain")
        self.guests = {k: engine.osinfo.lookup(k) for k in SAMPLE_GUESTS}
        self.device_names = engine.osinfo.device_names()

    def check(self, paths: Iterable[Path]) -> CheckReport:
        report = CheckReport()
        for path in paths:
            try:
                report.profiles.append(load_profile(path))
            except ProfileError as exc:
                report.findings.append(Finding(str(exc).split(": ", 1)[0], "error", str(exc).split(": ", 1)[-1]))
        for profile in report.profiles:
            for rule in profile.rules:
                if not self._can_fire(rule):
                    report.findings.append(
                        Finding(
                            rule.where,
                            "warning",
                            f"rule '{rule.id}' can never fire: its "
                            f"condition is false for every sample guest and variable value",
                        )
                    )
            alone = {g: self._conflict([profile], g) for g in SOLVE_GUESTS}
            if all(alone.values()):
                report.findings.append(
                    Finding(
                        f"{profile.source}:1",
                        "error",
                        f"profile '{profile.name}' is "
                        f"unsatisfiable on its own on the default host: {alone['fedora37']}",
                    )
                )
        usable = [
            p
            for p in report.profiles
            if not any(f.level == "error" and f.where.startswith(f"{p.source}:") for f in report.findings)
        ]
        for a, b in itertools.combinations(usable, 2):
            reasons = {g: self._conflict([a, b], g) for g in SOLVE_GUESTS}
            if all(reasons.values()):
                reason = reasons["fedora37"]
                report.incompatible.append((a.name, b.name, reason))
                report.findings.append(
                    Finding(
                        f"{b.source}:1",
                        "warning",
                        f"profiles '{a.name}' and '{b.name}' can never be combined: {reason}",
                    )
                )
        return report

    def _conflict(self, profiles: list[Profile], guest_key: str) -> str:
        """'' when the profiles solve for this guest, else the minimal conflict in one line."""
        try:
            built = self.engine._build(self.domain, profiles, self.guests[guest_key], "strict", None, complete=None)
        except ProfileError as exc:
            return str(exc)
        result = Solver(built.problem).solve()
        if isinstance(result, Conflict):
            text = " vs ".join(f"{m.provenance.describe()}: {m.message}" for m in result.members) or "conflict"
            given = "; ".join(f"{b.provenance.where}: {b.message}" for b in result.background)
            return f"{text} (given {given})" if given else text
        return ""

    def _can_fire(self, rule: Rule) -> bool:
        if rule.when is None or any(n.startswith("domain.") and n != "domain.type" for n in rule.when.names()):
            return True  # conditions on the domain's own facts depend on the domain: no sample decides them
        variables = profile_vocabulary()
        refs = sorted(n for n in rule.when.names() if n in variables)
        combos = list(itertools.islice(itertools.product(*(variables[r] for r in refs)), MAX_ENUMERATED))
        for guest in self.guests.values():
            facts = Facts(self.domain, guest, self.host, self.host.arch, self.device_names)
            functions = facts.functions()
            for combo in combos:
                values = dict(zip(refs, combo, strict=True))
                try:
                    if rule.when.evaluate(lambda n, v=values, f=facts: v[n] if n in v else f.resolve(n), functions):
                        return True
                except ExprError:
                    continue
        return False


def profile_summary(profile: Profile) -> list[str]:
    lines = [
        f"{profile.name} {profile.version} ({profile.source}, digest {profile.digest})",
        f"  {profile.description}",
    ]
    if profile.use_when:
        lines.append(f"  use when: {profile.use_when}")
    for rule in profile.rules:
        effects = []
        for kind, table in (("require", rule.require), ("forbid", rule.forbid), ("prefer", rule.prefer)):
            effects += [f"{kind} {var} {'/'.join(values)}" for var, values in table.items()]
        effects += [f"{s.action} XML" for s in rule.snippets] + [f"set {p}" for p in rule.derive]
        if rule.drivers:
            effects.append(f"declare {len(rule.drivers)} driver ids")
        when = f" when {rule.when.source}" if rule.when else (" when <match>" if rule.match is not None else "")
        strength = "hard" if rule.hard else f"soft priority {rule.priority}"
        lines.append(f"  - {rule.id} ({strength}){when}: {'; '.join(effects)}  [{rule.where}]")
    return lines
