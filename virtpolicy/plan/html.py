"""`virtpolicy plan hosts --format html`: the plan-hosts document as one self-contained page.

Drawn from the same `virtpolicy-plan-hosts/1` dictionary as the JSON and text forms, so they cannot
disagree. CSS and SVG are inline, nothing is fetched and nothing runs: the page can be attached to a
ticket. Every order comes from the document's lists (labels, the only dict shown, are sorted), so the
document straight from `HostsPlan.to_dict()` and the one read back from JSON with sorted keys give the
same bytes.
"""

from __future__ import annotations

import html
from typing import Any

from virtpolicy.outputs.explain_report import KIND_COLOURS

RUNS = "#1a9850"  # the hosts that run it; not a KIND_COLOURS colour, so a screenshot can find it
ERROR = "#b2182b"  # a class where the input itself is refused (no conflict to colour by)
HOSTS_OPEN = 200  # above this many hosts the host table is collapsed
BAR_W = 560  # the longest bar (every host), px
LABEL_CHARS = 110  # cause labels in the funnel are cut here; the tooltip has all of it

e = html.escape


def _classes(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["class"]: c for c in report["classes"]}


def cause_kind(report: dict[str, Any], row: dict[str, Any]) -> str:
    """The kind a funnel row is coloured by: `host` when the cause is host facts (as it usually is), the
    kind of the conflict's first member otherwise, `error` for refused input."""
    classes = _classes(report)
    members = [m for c in row["classes"] if c in classes for m in classes[c]["conflict"]]
    kinds = [m["provenance"]["kind"] for m in members]
    if not kinds:
        return "error"
    return "host" if "host" in kinds else kinds[0]


def cause_colour(kind: str) -> str:
    return KIND_COLOURS.get(kind, ERROR)


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _bar(y: int, colour: str, hosts: int, total: int, label: str, title: str, kind: str) -> str:
    width = round(BAR_W * hosts / total, 1) if total else 0.0
    width = max(width, 2.0) if hosts else 0.0  # one host of thousands is still visible
    return (
        f"<g><title>{e(title)}</title>"
        f'<text x="10" y="{y + 12}" font-size="12">{e(_cut(label))}</text>'
        f'<rect class="bar" data-kind="{e(kind)}" data-hosts="{hosts}" x="10" y="{y + 18}" width="{width}" '
        f'height="18" fill="{colour}"/>'
        f'<text x="{10 + width + 6:.1f}" y="{y + 32}" font-size="12" font-weight="bold">{hosts}</text></g>'
    )


def funnel_svg(report: dict[str, Any]) -> str:
    """One bar for the hosts that run the domain, then one per cause, most hosts first, to the same scale."""
    total = report["hosts_total"]
    rows = report["funnel"]
    step = 44
    height = step * (1 + len(rows)) + 8
    width = BAR_W + 400
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="funnel" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        _bar(4, RUNS, report["runs_on"], total, f"runs on {report['runs_on']} of {total} host(s)",
             f"runs on {report['runs_on']} of {total} host(s)", "runs"),
    ]  # fmt: skip
    for i, row in enumerate(rows, 1):
        kind = cause_kind(report, row)
        title = f"{row['hosts']} host(s), {len(row['classes'])} class(es): {row['cause']}"
        parts.append(_bar(4 + i * step, cause_colour(kind), row["hosts"], total, row["cause"], title, kind))
    parts.append("</svg>")
    return "".join(parts)


def _legend(report: dict[str, Any]) -> str:
    kinds = ["runs"]
    for row in report["funnel"]:
        kind = cause_kind(report, row)
        if kind not in kinds:
            kinds.append(kind)
    words = {"runs": "runs there", "error": "input refused", "host": "host facts"}
    return " ".join(
        f'<span class="swatch" style="background:{RUNS if k == "runs" else cause_colour(k)}"></span>'
        f"{e(words.get(k, k + ' requirement'))}"
        for k in kinds
    )


def _member(req: dict[str, Any]) -> str:
    """Kind badge, message, and where it comes from (profile file:line, XPath, osinfo, host files)."""
    p = req["provenance"]
    kind = p["kind"]
    return (
        f'<li class="member"><span class="kind" style="background:{KIND_COLOURS.get(kind, "#333")}">{e(kind)}</span> '
        f"{e(req['message'])}<br><small>{e(p.get('where', ''))}</small></li>"
    )


def classes_table(report: dict[str, Any]) -> str:
    """One row per class; under each class that does not run, its minimal conflict."""
    rows = []
    for c in report["classes"]:
        verdict = '<td class="yes">yes</td>' if c["runs"] else '<td class="no">no</td>'
        rows.append(
            f'<tr class="class" data-class="{e(c["class"])}"><td><code>{e(c["class"])}</code></td>'
            f'<td class="n">{c["hosts"]}</td><td>{e(c["example"])}</td>{verdict}<td>{e(c["cause"])}</td></tr>'
        )
        if not c["runs"] and c["conflict"]:
            members = "".join(_member(m) for m in c["conflict"])
            rows.append(
                f'<tr class="conflict" data-class="{e(c["class"])}"><td colspan="5">'
                f"minimal conflict, {len(c['conflict'])} requirement(s):<ul>{members}</ul></td></tr>"
            )
    return (
        '<table id="classes"><tr><th>class</th><th>hosts</th><th>example</th><th>runs</th><th>cause</th></tr>'
        f"{''.join(rows)}</table>"
    )


def hosts_table(report: dict[str, Any]) -> str:
    """Every host; folded away behind <details> when the fleet is large."""
    rows = "".join(
        f'<tr class="host"><td>{e(h["name"])}</td>'
        f"<td>{e(', '.join(f'{k}={v}' for k, v in sorted(h['labels'].items())))}</td>"
        f"<td><code>{e(h['class'])}</code></td>"
        + ('<td class="yes">yes</td>' if h["runs"] else '<td class="no">no</td>')
        + "</tr>"
        for h in report["hosts"]
    )
    table = f'<table id="hosts"><tr><th>host</th><th>labels</th><th>class</th><th>runs</th></tr>{rows}</table>'
    if len(report["hosts"]) > HOSTS_OPEN:
        runs = sum(1 for h in report["hosts"] if h["runs"])
        return f"<details><summary>{len(report['hosts'])} hosts ({runs} run it)</summary>{table}</details>"
    return table


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left} small{color:#555}
h2{margin-top:1.6em} td.n{text-align:right} td.yes{color:#0b5d1e;font-weight:bold}
td.no{color:#7a0014;font-weight:bold} tr.conflict td{background:#fafafa;border-top:none}
.kind{color:#fff;border-radius:3px;padding:0 5px;font-size:85%} ul{margin:4px 0}
.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
summary{cursor:pointer}"""


def to_html(report: dict[str, Any]) -> str:
    """The whole page: header, funnel, classes with their conflicts, hosts."""
    classes = len(report["classes"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>virtpolicy plan hosts: {e(report["domain"])}</title>
<style>{STYLE}</style></head>
<body><h1>{e(report["domain"])}: runs on {report["runs_on"]} of {report["hosts_total"]} host(s)</h1>
<p id="summary">{report["hosts_total"]} host(s) in {classes} class(es) of identical capabilities;
{sum(1 for c in report["classes"] if c["runs"])} class(es) run it. Schema {e(report["schema"])}.</p>
<h2>Where it runs, and why not</h2>
<p>{_legend(report)}</p>
{funnel_svg(report)}
<h2>Host classes</h2>
{classes_table(report)}
<h2>Hosts</h2>
{hosts_table(report)}
</body></html>
"""
