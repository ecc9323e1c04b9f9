"""`virtpolicy whatif combinations`: the cells analysed, and what holds across all of them.

One document (schema virtpolicy-whatif/1, docs/whatif-schema.md) is rendered as JSON, as text for a
terminal and as a self-contained HTML page, so the formats cannot disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from virtpolicy.whatif.combinations import DEFAULT_DOMAIN, CellAnalysis, analyse_cell
from virtpolicy.whatif.runner import run_tasks

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from virtpolicy.engine import Engine, XmlInput

SCHEMA = "virtpolicy-whatif/1"


@dataclass
class CombinationsReport:
    domain: str
    profiles: tuple[str, ...]
    cells: list[CellAnalysis]

    @property
    def dead(self) -> list[str]:
        """Profiles that are infeasible alone in every cell."""
        return [p for p in self.profiles if self.cells and all(p in c.dead for c in self.cells)]

    @property
    def never_fired(self) -> list[str]:
        rules = sorted({r for c in self.cells for r in c.rule_fired})
        return [r for r in rules if not any(c.rule_fired.get(r) for c in self.cells)]

    @property
    def always_overridden(self) -> list[str]:
        return [p for p in self.profiles if self.cells and all(p in c.overridden for c in self.cells)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "domain": self.domain,
            "profiles": list(self.profiles),
            "summary": {
                "cells": len(self.cells),
                "dead": self.dead,
                "always_overridden": self.always_overridden,
                "rules_never_fired": self.never_fired,
                "infeasible_pairs": _pair_counts(self.cells),
            },
            "cells": [c.to_dict() for c in self.cells],
        }


def _pair_counts(cells: Sequence[CellAnalysis]) -> list[dict[str, Any]]:
    """Pairs that are a minimal infeasible combination, and in how many cells."""
    counts: dict[tuple[str, ...], int] = {}
    for cell in cells:
        for m in cell.minimal_infeasible:
            if len(m.profiles) == 2:
                counts[m.profiles] = counts.get(m.profiles, 0) + 1
    return [{"profiles": list(k), "cells": v} for k, v in sorted(counts.items())]


def _cell_task(
    engine: Engine, domain: bytes, profiles: tuple[str, ...], os: str, host: str | None, guest_support: str
) -> CellAnalysis:
    return analyse_cell(engine, domain, profiles, os, host, guest_support)


def analyse_combinations(
    engine: Engine,
    profiles: Sequence[str],
    oses: Sequence[str],
    domain: XmlInput | None = None,
    hosts: Sequence[str] | None = None,
    guest_support: str = "strict",
    workers: int = 0,
    executor: Executor | None = None,
) -> CombinationsReport:
    """Every (OS, host) cell of the profile-combination analysis, spread over worker processes."""
    from virtpolicy.engine import read_xml

    data, name = read_xml(domain, "domain") if domain is not None else (DEFAULT_DOMAIN, "the default template")
    engine.build(data, os=oses[0] if oses else "generic", source=name)  # bad input fails here, once, in one line
    names = tuple(engine.profile(p).name for p in profiles)
    host_ids: Sequence[str | None] = list(hosts) if hosts else [None]
    tasks = [(data, names, os, host, guest_support) for host in host_ids for os in oses]
    cells = run_tasks(engine, _cell_task, tasks, workers=workers, executor=executor, label="what-if cells")
    return CombinationsReport(name, names, cells)


def to_text(report: CombinationsReport) -> str:
    n = len(report.profiles)
    lines = [f"virtpolicy whatif: {n} profiles, {len(report.cells)} cell(s), template {report.domain}"]
    for cell in report.cells:
        lines.append(
            f"\n{cell.os} on {cell.host}: {cell.infeasible_count} of {cell.total} selections infeasible"
            + ("" if cell.base_feasible else " (the domain is infeasible without any profile)")
        )
        for m in cell.minimal_infeasible:
            lines.append(f"  never together: {' + '.join(m.profiles)}  ({m.supersets} selections)")
            for r in m.conflict:
                lines.append(f"    - {r.kind} {r.where}: {r.message}")
        if cell.dead:
            lines.append(f"  dead (infeasible alone): {', '.join(cell.dead)}")
        for profile, changes in cell.influence.items():
            if changes:
                shown = ", ".join(f"{v}={w}" for v, (_, w) in sorted(changes.items())[:6])
                more = f" (+{len(changes) - 6} more)" if len(changes) > 6 else ""
                lines.append(f"  {profile} changes {shown}{more}")
        for pair in cell.interactions:
            pair_names, variables = " + ".join(pair["profiles"]), ", ".join(pair["variables"])
            lines.append(f"  interaction: {pair_names} differ from each alone on {variables}")
    summary = report.to_dict()["summary"]
    lines.append("")
    if summary["dead"]:
        lines.append(f"dead in every cell: {', '.join(summary['dead'])}")
    if summary["always_overridden"]:
        lines.append(f"always overridden: {', '.join(summary['always_overridden'])}")
    if summary["rules_never_fired"]:
        lines.append(f"rules that never fire here: {', '.join(summary['rules_never_fired'])}")
    return "\n".join(lines)
