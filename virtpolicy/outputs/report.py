"""Words for people and objects for programs: the decision summary and the conflict report.

JSON and text are built from the same objects, so `--format json` says exactly what the terminal says.
"""

from __future__ import annotations

from typing import Any

from virtpolicy.core.problem import Constraint, Source
from virtpolicy.core.solve import Conflict, Solution
from virtpolicy.sources.context import Build

REPORT_SCHEMA_VERSION = 1


def _constraint_json(c: Constraint) -> dict[str, Any]:
    return c.to_json()


def _reason_text(c: Constraint | None) -> str:
    if c is None:
        return "the only value the host and the rules allow"
    if c.provenance.source is Source.ENGINE:
        return f"engine default {c.provenance.where}"
    return c.provenance.describe()


def decisions_json(built: Build, solution: Solution) -> list[dict[str, Any]]:
    rows = []
    for name, d in solution.decisions.items():
        rows.append(
            {
                "variable": name,
                "value": d.value,
                "label": built.problem.variables[name].label,
                "reason": _constraint_json(d.reason) if d.reason is not None else None,
                "passed_over": [
                    {"value": value, "because": [_constraint_json(b) for b in _because(solution, wish)]}
                    for value, wish in d.passed_over
                ],
            }
        )
    return rows


def report_header(built: Build, status: str) -> dict[str, Any]:
    """What every report says first: schema version, outcome, and which domain, OS and host it is about."""
    return {
        "schema": REPORT_SCHEMA_VERSION,
        "status": status,
        "domain": built.domain.name,
        "os": {"id": built.guest.id, "short_id": built.guest.short_id},
        "host": built.host.name,
        "domain_state": {"complete": built.complete, "reason": built.completeness.reason},
        "profiles": [
            {
                "name": s.profile.name,
                "version": s.profile.version,
                "digest": s.profile.digest,
                "priority": s.priority,
                "source": s.profile.source,
                "selected_by": s.where,
            }
            for s in built.profiles
        ],
    }


def solution_json(built: Build, solution: Solution, xml: str) -> dict[str, Any]:
    return {
        **report_header(built, "solved"),
        "decisions": decisions_json(built, solution),
        "dropped_preferences": [
            {
                "preference": _constraint_json(d.constraint),
                "because": [_constraint_json(b) for b in solution.why_dropped(d)],
            }
            for d in solution.dropped
            if d.constraint.provenance.source is not Source.ENGINE
        ],
        "warnings": built.warnings_for(solution),
        "xml": xml,
    }


def device_json(built: Build, solution: Solution, device_xml: str) -> dict[str, Any]:
    """`device add --format json`: the new device's XML and the decisions about it (only it is decided)."""
    return {
        **report_header(built, "solved"),
        "decisions": decisions_json(built, solution),
        "warnings": built.warnings_for(solution),
        "device": device_xml,
    }


def conflict_json(built: Build, conflict: Conflict) -> dict[str, Any]:
    return {
        **report_header(built, "conflict"),
        "warnings": list(built.warnings),
        "conflict": [_constraint_json(c) for c in conflict.members],
        "background": [_constraint_json(c) for c in conflict.background],
    }


def _short(c: Constraint) -> str:
    """A few words for a summary line: who objects, and to what."""
    prov = c.provenance
    if prov.source is Source.GUEST and prov.detail.startswith("http"):
        ids = prov.detail.replace("http://pcisig.com/pci/", "")
        ids = ", ".join(i.replace("/", ":") if "://" not in i else i for i in ids.split(", "))
        return f"{prov.where.split(' ')[0]} lacks {ids}"
    return c.message


def _because(solution: Solution, wish: Constraint) -> list[Constraint]:
    for d in solution.dropped:
        if d.constraint is wish:
            return solution.why_dropped(d)
    return []


def _passed_over_text(solution: Solution, name: str) -> str:
    by_reason: dict[str, list[str]] = {}
    for value, wish in solution.decisions[name].passed_over:
        blame = _because(solution, wish)
        hard = [b for b in blame if b.is_hard and b.provenance.source is not Source.ENGINE] or blame
        if hard:
            by_reason.setdefault(" and ".join(dict.fromkeys(_short(b) for b in hard)), []).append(value)
    return "; ".join(f"not {'/'.join(dict.fromkeys(values))}: {why}" for why, values in by_reason.items())


def solution_text(built: Build, solution: Solution, elapsed_ms: float) -> str:
    lines = [
        f"virtpolicy: solved '{built.domain.name}' for {built.guest.label} on host {built.host.name} "
        f"({elapsed_ms:.1f} ms, {len(built.problem.constraints)} constraints)"
    ]
    width = max(len(n) for n in solution.decisions)
    for name, d in solution.decisions.items():
        value = d.value
        if name == "machine":
            rendered = built.host.default_machine(built.arch, solution.assignment["domain.type"], value)
            if built.app_machine and built.app_machine.value != value:
                rendered = built.app_machine.value if "-" in built.app_machine.value else rendered
            value = f"{value} ({rendered})" if rendered else value
        line = f"  {name:<{width}}  {value:<28} {_reason_text(d.reason)}"
        extra = _passed_over_text(solution, name)
        if extra:
            line += f" ({extra})"
        lines.append(line)
    return "\n".join(lines)


def conflict_text(built: Build, conflict: Conflict) -> str:
    hard = sum(1 for c in built.problem.constraints if c.is_hard)
    lines = [
        f"virtpolicy: error: the requirements for '{built.domain.name}' ({built.guest.label}) cannot all hold; "
        f"minimal conflicting set ({len(conflict.members)} of {hard} hard requirements):"
    ]
    for c in conflict.members:
        lines.append(f"  - {c.provenance.describe()}: {c.message}")
    for b in conflict.background:
        lines.append(f"    given {b.provenance.describe()}: {b.message} [{b.provenance.citation}]")
    cited = {r for c in conflict.members for r in c.cites}
    if cited:
        lines.append(f"    rules relied on: {', '.join(sorted(cited))}")
    lines.append(
        "  Change or drop one of these requirements: without any one of them, the rest of this set can hold "
        "(other, independent conflicts may remain)."
    )
    return "\n".join(lines)
