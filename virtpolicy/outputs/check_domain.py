"""`virtpolicy check`: the verdict on an existing domain, never a rewrite.

Management apps hold domains libvirt already runs; what they need to know is whether each one fits its
host and guest as it stands. The check is the solve of the domain taken as complete, so a conflict here
is exactly the conflict `explain` shows (same JSON members), and a fit lists what was checked and what
was only warned about (inert devices, skipped guest checks).
"""

from __future__ import annotations

from typing import Any

from virtpolicy.core.solve import Conflict, Solution
from virtpolicy.outputs.explain_report import build_report, to_text
from virtpolicy.outputs.report import report_header
from virtpolicy.sources.context import Build


def check_report(built: Build, result: Solution | Conflict, max_conflicts: int) -> dict[str, Any]:
    """The explain report for a conflict; for a fit, the header, the count of checks and the warnings."""
    if isinstance(result, Conflict):
        report = build_report(built, result, max_conflicts)
        report["warnings"] = list(built.warnings)
        return report
    hard = [c for c in built.problem.constraints if c.is_hard]
    sources = sorted({c.provenance.source.value for c in hard})
    return {
        **report_header(built, "fits"),
        "checked": {"requirements": len(hard), "sources": sources, "guest_drivers": built.guest.described},
        "warnings": built.warnings_for(result),
    }


def check_text(report: dict[str, Any]) -> str:
    if report["status"] != "fits":
        lines = [to_text(report, colour=False)]
    else:
        checked = report["checked"]
        guest = report["os"]["short_id"] if checked["guest_drivers"] else "no guest OS"
        lines = [
            f"virtpolicy: '{report['domain']}' fits host {report['host']} and {guest}: "
            f"{checked['requirements']} requirements hold ({', '.join(checked['sources'])})"
        ]
    lines += [f"virtpolicy: warning: {w}" for w in report.get("warnings", ())]
    return "\n".join(lines)
