"""`virtpolicy explain` output: text for terminals, a versioned JSON document, a self-contained HTML page.

All three are built from one report dictionary, so they cannot disagree. The JSON schema is documented
in docs/explain-schema.md; its `schema` field changes when a field changes meaning.
"""

from __future__ import annotations

import html
import math
import os
import sys
from typing import Any

import networkx as nx

from virtpolicy.core.explain import ConflictExplainer, Explanation
from virtpolicy.core.problem import Constraint, Source
from virtpolicy.core.solve import Conflict, Solution
from virtpolicy.outputs.report import report_header
from virtpolicy.sources.context import Build

SCHEMA = "virtpolicy-explain/1"
KIND_COLOURS = {
    "app": "#d62728",
    "profile": "#1f77b4",
    "guest": "#2ca02c",
    "host": "#ff7f0e",
    "structural": "#7f7f7f",
    "engine": "#9467bd",
}


def requirement(c: Constraint) -> dict[str, Any]:
    """The JSON form of one requirement: the same object `solve --format json` prints."""
    return c.to_json()


def build_report(built: Build, result: Solution | Conflict, max_conflicts: int) -> dict[str, Any]:
    explainer = ConflictExplainer(built.problem)
    report: dict[str, Any] = {**report_header(built, "conflict" if isinstance(result, Conflict) else "solved")}
    report["schema"] = SCHEMA
    if isinstance(result, Conflict):
        explanation: Explanation = explainer.explain(max_conflicts)
        report["complete"] = explanation.complete
        report["conflicts"] = [
            {"id": f"C{i}", "members": [requirement(c) for c in mus]} for i, mus in enumerate(explanation.conflicts, 1)
        ]
        report["background"] = [requirement(b) for b in explanation.background]
        report["corrections"] = [
            {"id": f"K{i}", "cost": k.cost, "drop": [c.id for c in k.members], "actions": k.actions}
            for i, k in enumerate(explanation.corrections, 1)
        ]
        report["decisions"] = []
        report["overridden_preferences"] = []
        return report
    decided = {name: d.reason for name, d in result.decisions.items()}
    reasons = explainer.decisions(result.assignment, decided, result.kept)
    report["conflicts"] = []
    report["corrections"] = []
    report["background"] = []
    report["complete"] = True
    report["decisions"] = [
        {
            "variable": r.variable,
            "value": r.value,
            "label": r.label,
            "decided_by": requirement(r.decided_by) if r.decided_by is not None else None,
            "excluded": [
                {"value": e.value, "impossible": e.hard, "by": [requirement(c) for c in e.by]} for e in r.excluded
            ],
        }
        for r in reasons
    ]
    passed_over = {id(wish) for d in result.decisions.values() for _, wish in d.passed_over}  # once, not per drop
    report["overridden_preferences"] = [
        {"preference": requirement(d.constraint), "by": [requirement(c) for c in result.why_dropped(d)]}
        for d in result.dropped
        if _overridden(d.constraint, passed_over)
    ]
    return report


def _overridden(c: Constraint, passed_over: set[int]) -> bool:
    """A preference that lost to something else, not merely the later options of a chain that was decided
    (`passed_over`: the ids of the wishes some decision passed over)."""
    return c.provenance.source is Source.PROFILE or id(c) in passed_over


# --- text ----------------------------------------------------------------------------------------------
class _Style:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text


def _where(req: dict[str, Any]) -> str:
    p = req["provenance"]
    kind = p["kind"]
    if kind == "app":
        return f"domain XML {p['xpath']} = '{p['value']}'"
    if kind == "profile":
        return f"profile {p['profile']} {p['version']}, rule '{p['rule']}' at {p['file']}:{p['line']}"
    if kind == "guest":
        return f"osinfo {p['os_id']} ({p['short_id']}), device {' or '.join(p.get('device_ids', [])) or p['detail']}"
    if kind == "host":
        return f"host {', '.join(p.get('files', [p['where']]))}" + (f", enum {p['enum']}" if "enum" in p else "")
    if kind == "structural":
        return f"libvirt/QEMU rule {p['rule']} ({p['file']}:{p['line']}): {p.get('citation', '')}"
    return f"engine default {p['where']}"


def to_text(report: dict[str, Any], colour: bool | None = None) -> str:
    if colour is None:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    s = _Style(colour)
    lines = []
    head = f"virtpolicy explain: '{report['domain']}' ({report['os']['short_id']}) on {report['host']}"
    if report["profiles"]:
        head += " with profiles " + ", ".join(f"{p['name']} {p['version']}" for p in report["profiles"])
    lines.append(s(head, "1"))
    if report["status"] == "conflict":
        more = "" if report["complete"] else " (stopped at --max-conflicts; there may be more)"
        lines.append(
            s(f"{len(report['conflicts'])} minimal set(s) of requirements that cannot hold together{more}:", "1;31")
        )
        for conflict in report["conflicts"]:
            lines.append(s(f"\nConflict {conflict['id']}:", "1;31"))
            for m in conflict["members"]:
                lines.append(f"  - {m['message']}")
                lines.append(s(f"      where: {_where(m)}", "2"))
        if report["background"]:
            lines.append("\nGiven these libvirt/QEMU facts:")
            lines += [f"  * {b['message']}\n      {_where(b)}" for b in report["background"]]
        lines.append(s("\nSmallest changes that make it feasible, cheapest first:", "1;32"))
        for k in report["corrections"]:
            lines.append(f"  {k['id']}. " + "\n      and ".join(k["actions"]))
        return "\n".join(lines)
    lines.append("Every decided value, what decided it, and why not the others:")
    for d in report["decisions"]:
        by = d["decided_by"]
        lines.append(f"\n  {s(d['variable'], '1')} = {s(d['value'], '1;32')}   ({d['label']})")
        lines.append(f"      decided by: {by['message'] + ' [' + _where(by) + ']' if by else 'the only value left'}")
        for e in d["excluded"]:
            why = "; ".join(f"{b['message']} [{_where(b)}]" for b in e["by"]) or "less preferred"
            tag = "impossible" if e["impossible"] else "not preferred"
            lines.append(f"      not {e['value']} ({tag}): {why}")
    if report["overridden_preferences"]:
        lines.append(s("\nPreferences overridden by stronger requirements:", "1"))
        for o in report["overridden_preferences"]:
            by = "; ".join(f"{b['message']} [{_where(b)}]" for b in o["by"]) or "an earlier preference"
            lines.append(f"  - {o['preference']['message']}\n      overridden by: {by}")
    return "\n".join(lines)


# --- HTML ----------------------------------------------------------------------------------------------
def conflict_graph(report: dict[str, Any]) -> nx.Graph:
    """Requirements as nodes; two requirements are joined when they belong to the same minimal conflict."""
    graph = nx.Graph()
    groups = report["conflicts"] or [
        {"id": f"O{i}", "members": [o["preference"], *o["by"]]}
        for i, o in enumerate(report["overridden_preferences"], 1)
    ]
    for group in groups:
        for m in group["members"]:
            graph.add_node(m["id"], kind=m["provenance"]["kind"], message=m["message"])
        for a, b in nx.utils.pairwise([m["id"] for m in group["members"]] + [group["members"][0]["id"]]):
            if a != b:
                graph.add_edge(a, b, group=group["id"])
    return graph


def _layout(graph: nx.Graph, cell_w: int = 340, cell_h: int = 300, columns: int = 3) -> dict[str, tuple[float, float]]:
    """Each connected group of requirements in its own circle, groups on a grid, in a stable order."""
    components = sorted((sorted(c) for c in nx.connected_components(graph)), key=lambda c: (-len(c), c))
    pos: dict[str, tuple[float, float]] = {}
    for index, nodes in enumerate(components):
        col, row = index % columns, index // columns
        cx, cy = col * cell_w + cell_w / 2, row * cell_h + cell_h / 2 - 10
        radius = 0 if len(nodes) == 1 else min(cell_w, cell_h) / 2 - 70
        for i, n in enumerate(nodes):
            angle = 2 * math.pi * i / len(nodes) - math.pi / 2
            pos[n] = (cx + radius * math.cos(angle), cy + radius * math.sin(angle))
    return pos


def _svg(graph: nx.Graph, cell_w: int = 340, cell_h: int = 300, columns: int = 3) -> str:
    nodes = sorted(graph.nodes)
    if not nodes:
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" width="900" height="60"><text x="10" y="35">'
            "Nothing to draw: no conflicts and no overridden preferences.</text></svg>"
        )
    pos = _layout(graph, cell_w, cell_h, columns)
    groups = nx.number_connected_components(graph)
    width = cell_w * min(columns, groups)
    height = cell_h * math.ceil(groups / columns)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="conflict-graph" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">'
    ]
    for a, b in sorted(graph.edges):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#444" stroke-width="3"/>')
    for n in nodes:
        x, y = pos[n]
        data = graph.nodes[n]
        colour = KIND_COLOURS.get(data["kind"], "#333")
        message = data["message"]
        label = html.escape(message[:34] + ("…" if len(message) > 34 else ""))
        parts.append(
            f"<g><title>{html.escape(n)}: {html.escape(message)}</title>"
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="24" fill="{colour}" stroke="#000"/>'
            f'<text x="{x:.1f}" y="{y + 40:.1f}" font-size="11" text-anchor="middle">{label}</text>'
            f'<text x="{x:.1f}" y="{y + 4:.1f}" font-size="11" fill="#fff" text-anchor="middle">'
            f"{html.escape(data['kind'])}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for d in report["decisions"]:
        by = d["decided_by"]
        excluded = "<br>".join(
            f"{e(x['value'])}: {e('; '.join(b['message'] for b in x['by']) or 'less preferred')}" for x in d["excluded"]
        )
        rows.append(
            f"<tr><td>{e(d['variable'])}</td><td><b>{e(d['value'])}</b></td>"
            f"<td>{e(by['message']) if by else 'only value'}<br><small>{e(_where(by)) if by else ''}</small></td>"
            f"<td><small>{excluded}</small></td></tr>"
        )
    conflicts = []
    for c in report["conflicts"]:
        items = "".join(f"<li>{e(m['message'])}<br><small>{e(_where(m))}</small></li>" for m in c["members"])
        conflicts.append(f"<h3>Conflict {e(c['id'])}</h3><ul>{items}</ul>")
    corrections = "".join(f"<li>{'<br>and '.join(e(a) for a in k['actions'])}</li>" for k in report["corrections"])
    legend = " ".join(f'<span style="color:{c}">&#9679; {k}</span>' for k, c in KIND_COLOURS.items())
    status = "cannot be satisfied" if report["status"] == "conflict" else "solved"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>virtpolicy explain: {e(report["domain"])}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} small{{color:#555}}</style></head>
<body><h1>{e(report["domain"])}: {status}</h1>
<p>Guest {e(report["os"]["short_id"])} ({e(report["os"]["id"])}) on host {e(report["host"])}.
Profiles: {e(", ".join(p["name"] + " " + p["version"] for p in report["profiles"]) or "none")}.</p>
<h2>{"Conflict graph" if report["conflicts"] else "Overridden preferences"}</h2>
<p>{legend}</p>
{_svg(conflict_graph(report))}
{"".join(conflicts)}
{"<h2>Corrections, cheapest first</h2><ol>" + corrections + "</ol>" if corrections else ""}
{
        "<h2>Decisions</h2><table><tr><th>variable</th><th>value</th><th>decided by</th><th>excluded</th></tr>"
        + "".join(rows)
        + "</table>"
        if rows
        else ""
    }
</body></html>
"""
