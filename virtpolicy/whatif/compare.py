"""`virtpolicy whatif compare`: what changes for existing domains when a host, a profile library or the
guest OS changes.

Each domain is solved before and after. A complete domain is solved with `refresh` (what the engine and
its profiles decided is decided again, what the app wrote stays), so a new profile version or a new
QEMU shows in what it would now decide; and it is checked as it stands against the after side, which
says whether the running domain still fits. Changes are sorted into those that touch the guest ABI
(machine version, CPU, device models, buses, addresses, firmware) and the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import xpath_of
from virtpolicy.whatif.runner import run_tasks

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from virtpolicy.engine import Engine
    from virtpolicy.results import Result

SCHEMA = "virtpolicy-whatif-compare/1"
# device children and attributes that are guest-visible hardware (a change is an ABI change)
ABI_DEVICE_KEYS = ("@model", "@type", "model/@type", "model/@name", "target/@bus", "target/@type", "driver/@name")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: which engine, and which guest OS (None: the domain's own)."""

    label: str
    os: str | None = None


@dataclass
class DomainChange:
    source: str
    name: str
    before: str  # solved | conflict | input error
    after: str
    still_fits: bool | None  # a complete domain, as it stands, against the after side (None: partial)
    complete: bool = False  # re-decided as `solve --refresh` would; its own values stay
    decisions: list[dict[str, str]] = field(default_factory=list)  # variable, before, after, reason
    abi: list[dict[str, str]] = field(default_factory=list)  # what, xpath, before, after
    conflict: list[dict[str, Any]] = field(default_factory=list)  # the after side's minimal conflict
    error: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.decisions or self.abi or self.error) or self.before != self.after or self.still_fits is False

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "domain": self.name,
            "before": self.before,
            "after": self.after,
            "becomes_infeasible": self.before == "solved" and self.after == "conflict",
            "still_fits": self.still_fits,
            "complete": self.complete,
            "decisions": self.decisions,
            "abi_changes": self.abi,
            "conflict": self.conflict,
            "error": self.error,
        }


def abi_facts(xml: str) -> dict[str, str]:
    """The guest-visible hardware of a domain: XPath -> value, for the fields an ABI change touches."""
    root = etree.fromstring(xml.encode())
    facts: dict[str, str] = {}
    os_type = root.find("os/type")
    if os_type is not None:
        facts["/domain/os/type/@machine"] = os_type.get("machine", "")
    os_el = root.find("os")
    if os_el is not None and os_el.get("firmware"):
        facts["/domain/os/@firmware"] = os_el.get("firmware", "")
    loader = root.find("os/loader")
    if loader is not None:
        facts["/domain/os/loader"] = (loader.text or "").strip() + f" secure={loader.get('secure', '')}"
    cpu = root.find("cpu")
    if cpu is not None:
        model = cpu.findtext("model") or ""
        features = ",".join(sorted(f"{f.get('policy', '')}:{f.get('name', '')}" for f in cpu.findall("feature")))
        facts["/domain/cpu"] = f"mode={cpu.get('mode', '')} model={model.strip()} features={features}"
    devices = root.find("devices")
    for el in devices if devices is not None else ():
        if not isinstance(el.tag, str):
            continue
        where = xpath_of(el)
        for key in ABI_DEVICE_KEYS:
            path, _, attr = key.rpartition("@")
            target = el.find(path.rstrip("/")) if path else el
            if target is not None and target.get(attr) is not None:
                facts[f"{where}/{key}"] = target.get(attr, "")
        address = el.find("address")
        if address is not None:
            facts[f"{where}/address"] = " ".join(f"{k}={v}" for k, v in sorted(address.attrib.items()))
    return facts


def _decisions(before: Result, after: Result) -> list[dict[str, str]]:
    b = {d.variable: d for d in before.decisions}
    rows = []
    for d in after.decisions:
        old = b.get(d.variable)
        if old is not None and old.value != d.value:
            reason = f"{d.reason.kind} {d.reason.where}" if d.reason is not None else "the only value left"
            rows.append({"variable": d.variable, "before": old.value, "after": d.value, "reason": reason})
    return rows


def _abi(before: str, after: str) -> list[dict[str, str]]:
    b, a = abi_facts(before), abi_facts(after)
    rows = []
    for key in sorted(set(b) | set(a)):
        if b.get(key) != a.get(key):
            rows.append({"xpath": key, "before": b.get(key, ""), "after": a.get(key, "")})
    return rows


def compare_one(engines: tuple[Engine, Engine], data: bytes, source: str, sides: tuple[Side, Side]) -> DomainChange:
    """Before and after for one domain (a task for the runner: picklable arguments only)."""
    from virtpolicy.inputs.domain import Domain
    from virtpolicy.knowledge.completeness import completeness

    results: list[Result | InputError] = []
    try:
        parsed = Domain.from_bytes(data, source)
        complete = completeness(parsed.root, source, None).complete
    except InputError as exc:
        return DomainChange(source, "", "input error", "input error", None, error=str(exc))
    for engine, side in zip(engines, sides, strict=True):
        try:
            results.append(engine.solve(data, os=side.os, source=source, refresh=complete))
        except InputError as exc:
            results.append(exc)
    before, after = results
    name = ""
    if not isinstance(before, InputError):
        name = before.build.domain.name
    status = [_status(r) for r in results]
    change = DomainChange(source, name, status[0], status[1], None, complete=complete)
    if isinstance(after, InputError):
        change.error = str(after)
    elif not after.feasible:
        change.conflict = [r.to_dict() for r in after.conflicts[0].members]
    if complete and not isinstance(after, InputError):
        change.still_fits = engines[1].check(data, os=sides[1].os, source=source).feasible
    if isinstance(before, InputError) or isinstance(after, InputError):
        return change
    if before.feasible and after.feasible:
        change.decisions = _decisions(before, after)
        change.abi = _abi(before.xml or "", after.xml or "")
    return change


def _status(result: Result | InputError) -> str:
    if isinstance(result, InputError):
        return "input error"
    return "solved" if result.feasible else "conflict"


@dataclass
class CompareReport:
    before: str
    after: str
    changes: list[DomainChange]

    def to_dict(self) -> dict[str, Any]:
        changed = [c for c in self.changes if c.changed]
        return {
            "schema": SCHEMA,
            "before": self.before,
            "after": self.after,
            "summary": {
                "domains": len(self.changes),
                "changed": len(changed),
                "abi_changed": sum(1 for c in self.changes if c.abi),
                "become_infeasible": sum(1 for c in self.changes if c.before == "solved" and c.after == "conflict"),
                "no_longer_fit": sum(1 for c in self.changes if c.still_fits is False),
            },
            "domains": [c.to_dict() for c in self.changes],
        }


def _compare_task(engines: tuple[Engine, Engine], data: bytes, source: str, sides: tuple[Side, Side]) -> DomainChange:
    return compare_one(engines, data, source, sides)


def compare_domains(
    before: Engine,
    after: Engine,
    domains: Sequence[tuple[bytes, str]],
    sides: tuple[Side, Side],
    workers: int = 0,
    executor: Executor | None = None,
) -> CompareReport:
    """Every domain before and after, spread over worker processes holding both engines."""
    tasks = [(data, source, sides) for data, source in domains]
    changes = run_tasks((before, after), _compare_task, tasks, workers=workers, executor=executor, label="domains")
    return CompareReport(sides[0].label, sides[1].label, changes)


def to_text(report: CompareReport) -> str:
    summary = report.to_dict()["summary"]
    lines = [
        f"virtpolicy whatif compare: {report.before} -> {report.after}: {summary['domains']} domain(s), "
        f"{summary['changed']} changed, {summary['abi_changed']} with guest ABI changes, "
        f"{summary['become_infeasible']} become infeasible, {summary['no_longer_fit']} no longer fit as they are"
    ]
    for c in report.changes:
        if not c.changed:
            continue
        head = f"\n{c.source} ({c.name or '?'}): {c.before} -> {c.after}"
        if c.complete:
            head += "; complete: as it stands it " + ("still fits" if c.still_fits else "NO LONGER FITS")
            head += ", and re-decided (solve --refresh) it would change:"
        lines.append(head)
        lines += [f"  abi: {r['xpath']}: {r['before'] or '(none)'} -> {r['after'] or '(none)'}" for r in c.abi]
        lines += [f"  {r['variable']}: {r['before']} -> {r['after']} ({r['reason']})" for r in c.decisions]
        lines += [
            f"  conflict: {m['provenance']['kind']} {m['provenance']['where']}: {m['message']}" for m in c.conflict
        ]
        if c.error:
            lines.append(f"  error: {c.error}")
    return "\n".join(lines)
