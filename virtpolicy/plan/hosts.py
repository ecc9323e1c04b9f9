"""`virtpolicy plan hosts`: on which hosts of a fleet a configuration runs, and why not on the others.

Work is per host class, batched (a solve takes milliseconds, so one task per class would be mostly
overhead), through the what-if runner's executor. A class where the domain does not run reports its
minimal conflict; the funnel counts hosts per cause, the host facts first, as an operator reads them
("12 hosts: no secure-boot loader").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from virtpolicy.errors import InputError
from virtpolicy.plan.fleet import Fleet, classes_of
from virtpolicy.results import Requirement
from virtpolicy.whatif.runner import run_tasks

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from virtpolicy.engine import Engine

SCHEMA = "virtpolicy-plan-hosts/1"


@dataclass(frozen=True)
class ClassVerdict:
    host_class: str
    runs: bool
    conflict: tuple[dict[str, Any], ...] = ()  # the minimal conflict's members (Requirement JSON)
    error: str = ""  # bad input on this class (e.g. an OS the class cannot name)

    @property
    def cause(self) -> str:
        """The conflict in a few words: its host facts if it has any (what differs between hosts)."""
        if self.error:
            return self.error
        host = [m for m in self.conflict if m["provenance"]["kind"] == "host"]
        return "; ".join(m["message"] for m in (host or list(self.conflict))) or "conflict"


def _verdicts(
    engine: Engine, domains: Sequence[tuple[bytes, str]], classes: Sequence[str], profiles: Sequence[str],
    os: str | None, guest_support: str,
) -> list[list[ClassVerdict]]:  # fmt: skip
    """Whether each domain's hard requirements hold on each class: a consistency check, not a solve and
    render (planning asks "does it run", thousands of times); a conflict is reduced only where it fails."""
    from virtpolicy.core.solve import Conflict, Solver
    from virtpolicy.inputs.domain import Domain

    rows = []
    for data, source in domains:
        verdicts = []
        try:
            parsed: Domain | InputError = Domain.from_bytes(data, source)  # parsed and validated once, not per class
        except InputError as exc:
            parsed = exc
        for host_class in classes:
            try:
                if isinstance(parsed, InputError):
                    raise parsed
                build = engine.build(parsed, profiles=profiles, os=os, guest_support=guest_support, host=host_class)  # type: ignore[arg-type]
            except InputError as exc:
                verdicts.append(ClassVerdict(host_class, False, error=str(exc)))
                continue
            solver = Solver(build.problem)
            if solver.consistent([c for c in build.problem.constraints if c.is_hard]):
                verdicts.append(ClassVerdict(host_class, True))
                continue
            outcome = solver.solve()
            members = (
                tuple(Requirement.of(c).to_dict() for c in outcome.members) if isinstance(outcome, Conflict) else ()
            )
            verdicts.append(ClassVerdict(host_class, False, members))
        rows.append(verdicts)
    return rows


@dataclass
class HostsPlan:
    domain: str
    fleet: Fleet
    verdicts: dict[str, ClassVerdict]

    @property
    def runs_anywhere(self) -> bool:
        return any(v.runs for v in self.verdicts.values())

    def funnel(self) -> list[dict[str, Any]]:
        counts: dict[str, int] = {}
        classes: dict[str, list[str]] = {}
        for host_class, verdict in self.verdicts.items():
            if verdict.runs:
                continue
            counts[verdict.cause] = counts.get(verdict.cause, 0) + len(self.fleet.members(host_class))
            classes.setdefault(verdict.cause, []).append(host_class)
        return [
            {"cause": cause, "hosts": n, "classes": classes[cause]}
            for cause, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "domain": self.domain,
            "runs_on": sum(1 for h in self.fleet.hosts if self.verdicts[h.host_class].runs),
            "hosts_total": len(self.fleet.hosts),
            "hosts": [
                {
                    "name": h.name,
                    "class": h.host_class,
                    "labels": dict(h.labels),
                    "runs": self.verdicts[h.host_class].runs,
                    "conflict": list(self.verdicts[h.host_class].conflict),
                }
                for h in self.fleet.hosts
            ],
            "classes": [
                {
                    "class": c,
                    "hosts": len(self.fleet.members(c)),
                    "example": self.fleet.members(c)[0].name,
                    "runs": v.runs,
                    "cause": "" if v.runs else v.cause,
                    "conflict": list(v.conflict),
                }
                for c, v in self.verdicts.items()
            ],
            "funnel": self.funnel(),
        }


def plan_hosts(
    engine: Engine,
    fleet: Fleet,
    domain: bytes,
    source: str,
    profiles: Sequence[str] = (),
    os: str | None = None,
    guest_support: str = "strict",
    workers: int = 0,
    executor: Executor | None = None,
    client: Any = None,
) -> HostsPlan:
    """The verdict per host class; `engine` must hold the fleet's classes as hosts (see engine_for)."""
    (plan,) = plan_hosts_many(engine, fleet, [(domain, source)], profiles, os, guest_support, workers, executor, client)
    return plan


def plan_hosts_many(
    engine: Engine,
    fleet: Fleet,
    domains: Sequence[tuple[bytes, str]],
    profiles: Sequence[str] = (),
    os: str | None = None,
    guest_support: str = "strict",
    workers: int = 0,
    executor: Executor | None = None,
    client: Any = None,
) -> list[HostsPlan]:
    """Every domain against every class in one fan-out: tasks are batches of classes, each solving all
    domains, so the per-task overhead is paid once per batch, not once per solve."""
    classes = classes_of(fleet.hosts)
    per_task = max(1, math.ceil(len(classes) / max(1, (workers or 2) * 4)))
    batches = [tuple(classes[i : i + per_task]) for i in range(0, len(classes), per_task)]
    tasks = [(tuple(domains), batch, tuple(profiles), os, guest_support) for batch in batches]
    results = run_tasks(
        engine, _verdicts, tasks, workers=workers, executor=executor, label="host classes", client=client
    )
    plans = []
    for d, (_, source) in enumerate(domains):
        verdicts = {v.host_class: v for batch in results for v in batch[d]}
        plans.append(HostsPlan(source, fleet, {c: verdicts[c] for c in classes}))
    return plans


def engine_for(fleet: Fleet, **options: Any) -> Engine:
    """An Engine whose hosts are the fleet's classes, named by fingerprint."""
    from virtpolicy.engine import Engine

    return Engine(dict(fleet.classes), **options)


def to_text(plan: HostsPlan) -> str:
    data = plan.to_dict()
    lines = [f"virtpolicy plan hosts: '{plan.domain}' runs on {data['runs_on']} of {data['hosts_total']} host(s), "
             f"{len(plan.verdicts)} class(es)"]  # fmt: skip
    for c in data["classes"]:
        verdict = "runs" if c["runs"] else f"does not run: {c['cause']}"
        lines.append(f"  class {c['class']} ({c['hosts']} host(s), e.g. {c['example']}): {verdict}")
        for m in c["conflict"]:
            lines.append(f"    - {m['provenance']['kind']} {m['provenance']['where']}: {m['message']}")
    if data["funnel"]:
        lines.append("  why not:")
        lines += [f"    {f['hosts']} host(s): {f['cause']}" for f in data["funnel"]]
    return "\n".join(lines)
