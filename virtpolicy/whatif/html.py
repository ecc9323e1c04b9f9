"""`virtpolicy whatif combinations --format html`: the what-if document as one self-contained page.

The page is drawn from the same `virtpolicy-whatif/1` dictionary as the JSON and text forms, so they
cannot disagree. It carries its CSS and SVG inline and fetches nothing: it is meant to be attached to a
ticket or opened from a file. Every order on the page comes from the document's lists (`profiles` is the
canonical profile order) and never from dict or set iteration, so the same document gives the same bytes
whether it comes straight from `CombinationsReport.to_dict()` or back from `json.loads` with sorted keys.
"""

from __future__ import annotations

import html
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, TypeVar

from virtpolicy.outputs.explain_report import KIND_COLOURS

FEASIBLE = "#e5f5e0"  # the pair can be selected together in every cell
PARTIAL = "#fdae61"  # infeasible in one cell (of several); darker towards INFEASIBLE
INFEASIBLE = "#b2182b"  # infeasible in every cell; not a KIND_COLOURS colour, so a screenshot can find it
SQUARE = 26  # heatmap square, px
CHAR_W = 6.5  # rough width of one 11px sans-serif character, for label margins

K = TypeVar("K", bound=Hashable)
e = html.escape


# --- reading the document ------------------------------------------------------------------------------
def several_hosts(report: dict[str, Any]) -> bool:
    """Rows name the host only when there is more than one: otherwise it is noise on every line."""
    return len({c["host"] for c in report["cells"]}) > 1


def cell_label(cell: dict[str, Any], with_host: bool) -> str:
    return f"{cell['os']} on {cell['host']}" if with_host else cell["os"]


def cell_labels(report: dict[str, Any]) -> list[str]:
    with_host = several_hosts(report)
    return [cell_label(c, with_host) for c in report["cells"]]


def ordered(report: dict[str, Any], names: Iterable[str]) -> tuple[str, ...]:
    """Profile names in the document's bit order, whatever order a list in the document used."""
    rank = {p: i for i, p in enumerate(report["profiles"])}
    return tuple(sorted(names, key=lambda p: (rank.get(p, len(rank)), p)))


def blocking(cell: dict[str, Any], selection: set[str]) -> list[list[str]]:
    """The minimal infeasible combinations inside `selection`: any one of them makes it infeasible."""
    return [m["profiles"] for m in cell["minimal_infeasible"] if set(m["profiles"]) <= selection]


def pair_infeasibility(report: dict[str, Any]) -> dict[tuple[str, str], list[int]]:
    """(a, b) -> indices of the cells where {a, b} cannot be selected; (a, a) is a alone (dead).

    Counted from the minimal combinations rather than `summary.infeasible_pairs`, which only lists pairs
    that are themselves minimal: a pair with a dead member is infeasible too and must be coloured.
    """
    profiles = report["profiles"]
    result: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(profiles):
        for b in profiles[i:]:
            result[(a, b)] = [k for k, c in enumerate(report["cells"]) if blocking(c, {a, b})]
    return result


def group(items: Iterable[tuple[K, int]]) -> dict[K, list[int]]:
    """key -> the cell indices it occurs in, keys in first-seen order (the document's order)."""
    groups: dict[K, list[int]] = {}
    for key, index in items:
        cells = groups.setdefault(key, [])
        if index not in cells:
            cells.append(index)
    return groups


def where_cells(indices: Sequence[int], labels: Sequence[str]) -> str:
    """'every cell' rather than a long list that the reader must check is complete."""
    if len(indices) == len(labels) and len(labels) > 1:
        return "every cell"
    return ", ".join(labels[i] for i in indices)


def combination_name(profiles: Sequence[str]) -> str:
    return " + ".join(profiles) if profiles else "the template alone (no profile)"


# --- the heatmap ---------------------------------------------------------------------------------------
def _mix(a: str, b: str, t: float) -> str:
    rgb = [round(int(a[i : i + 2], 16) * (1 - t) + int(b[i : i + 2], 16) * t) for i in (1, 3, 5)]
    return "#" + "".join(f"{v:02x}" for v in rgb)


def heat_colour(count: int, cells: int) -> str:
    """Feasible, or orange to dark red by how many cells refuse it; exactly INFEASIBLE when all of them do."""
    if count <= 0:
        return FEASIBLE
    if count >= cells or cells <= 1:
        return INFEASIBLE
    return _mix(PARTIAL, INFEASIBLE, (count - 1) / (cells - 1))


def legend_steps(cells: int) -> list[int]:
    """Every count when there are few cells; otherwise the ends and the quartiles."""
    if cells <= 8:
        return list(range(cells + 1))
    return sorted({0, 1, cells // 4, cells // 2, 3 * cells // 4, cells})


def _square_title(report: dict[str, Any], a: str, b: str, indices: list[int], labels: list[str]) -> str:
    """The tooltip says which cells refuse the pair and which minimal combination is the reason."""
    name = f"{a} alone" if a == b else f"{a} + {b}"
    total = len(labels)
    if not indices:
        return f"{name}: feasible in every cell" if total > 1 else f"{name}: feasible"
    reasons = group((tuple(m), k) for k in indices for m in blocking(report["cells"][k], {a, b}))
    why = "; ".join(f"{combination_name(m)} in {where_cells(ks, labels)}" for m, ks in reasons.items())
    verb = "dead" if a == b else "infeasible"
    return f"{name}: {verb} in {len(indices)} of {total} cell(s) ({why})"


def _square(x: float, y: float, a: str, b: str, count: int, cells: int, title: str) -> str:
    colour = heat_colour(count, cells)
    text = ""
    if count:
        ink = "#fff" if count * 2 > cells else "#222"
        text = (
            f'<text x="{x + SQUARE / 2:.1f}" y="{y + SQUARE / 2 + 4:.1f}" font-size="10" fill="{ink}" '
            f'text-anchor="middle">{count}</text>'
        )
    return (
        f"<g><title>{e(title)}</title>"
        f'<rect class="pair" data-a="{e(a)}" data-b="{e(b)}" data-cells="{count}" x="{x:.1f}" y="{y:.1f}" '
        f'width="{SQUARE}" height="{SQUARE}" fill="{colour}" stroke="#fff" stroke-width="1"/>{text}</g>'
    )


def _axis_labels(profiles: Sequence[str], left: float, top: float) -> list[str]:
    """Row names right-aligned on the left; column names at 45 degrees so long names do not collide."""
    parts = []
    for i, p in enumerate(profiles):
        y = top + i * SQUARE + SQUARE / 2 + 4
        parts.append(f'<text x="{left - 6:.1f}" y="{y:.1f}" font-size="11" text-anchor="end">{e(p)}</text>')
    for j, p in enumerate(profiles):
        x, y = left + j * SQUARE + SQUARE / 2, top - 6
        parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" transform="rotate(-45 {x:.1f} {y:.1f})">{e(p)}</text>'
        )
    return parts


def _legend_offset(cells: int) -> float:
    """Where the swatches start: after the legend's caption, whose length depends on the cell count."""
    return len(f"infeasible in how many of {cells} cell(s):") * CHAR_W * 0.95 + 12


def _diagonal(count: int, left: float, top: float) -> str:
    """The profile-alone squares are outlined last, so no neighbouring square paints over the outline."""
    return "".join(
        f'<rect class="diagonal" x="{left + i * SQUARE:.1f}" y="{top + i * SQUARE:.1f}" width="{SQUARE}" '
        f'height="{SQUARE}" fill="none" stroke="#000" stroke-width="1.5" pointer-events="none"/>'
        for i in range(count)
    )


def _legend(cells: int, x: float, y: float) -> list[str]:
    label = f"infeasible in how many of {cells} cell(s):"
    parts = [f'<text x="{x:.1f}" y="{y + 13:.1f}" font-size="11">{label}</text>']
    step = 44
    x0 = x + _legend_offset(cells)
    for i, count in enumerate(legend_steps(cells)):
        sx = x0 + i * step
        parts.append(
            f'<rect class="legend" x="{sx:.1f}" y="{y:.1f}" width="{SQUARE}" height="16" '
            f'fill="{heat_colour(count, cells)}" stroke="#999"/>'
            f'<text x="{sx + SQUARE / 2:.1f}" y="{y + 30:.1f}" font-size="10" text-anchor="middle">{count}</text>'
        )
    dx = x0 + len(legend_steps(cells)) * step + 10
    parts.append(
        f'<rect class="legend" x="{dx:.1f}" y="{y:.1f}" width="16" height="16" fill="{FEASIBLE}" '
        f'stroke="#000" stroke-width="1.5"/><text x="{dx + 22:.1f}" y="{y + 13:.1f}" font-size="11">'
        "diagonal: the profile alone (dead)</text>"
    )
    return parts


def heatmap_svg(report: dict[str, Any]) -> str:
    """Profile x profile: how many (OS, host) cells refuse each pair; the diagonal, each profile alone."""
    profiles = report["profiles"]
    if not profiles:
        return (
            '<svg xmlns="http://www.w3.org/2000/svg" id="pair-heatmap" width="600" height="40">'
            '<text x="10" y="25" font-family="sans-serif">No optional profiles: nothing to pair.</text></svg>'
        )
    labels = cell_labels(report)
    cells = len(labels)
    label_w = max(len(p) for p in profiles) * CHAR_W + 8
    left, top = label_w + 10, label_w * 0.72 + 10
    grid = len(profiles) * SQUARE
    legend_w = _legend_offset(cells) + (len(legend_steps(cells)) + 1) * 44 + 230
    width = round(max(left + grid + label_w * 0.72, legend_w + 10))
    height = round(top + grid + 60)
    infeasible = pair_infeasibility(report)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="pair-heatmap" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
        *_axis_labels(profiles, left, top),
    ]
    for i, a in enumerate(profiles):
        for j, b in enumerate(profiles):
            key = (a, b) if i <= j else (b, a)
            indices = infeasible[key]
            title = _square_title(report, *key, indices, labels)
            parts.append(_square(left + j * SQUARE, top + i * SQUARE, a, b, len(indices), cells, title))
    parts.append(_diagonal(len(profiles), left, top))
    parts += _legend(cells, 10, top + grid + 18)
    parts.append("</svg>")
    return "".join(parts)


# --- the OS x profile matrix ---------------------------------------------------------------------------
def _change(c: dict[str, Any]) -> str:
    return f"{c['variable']}: {c['base']} → {c['with']}"


def _matrix_cell(cell: dict[str, Any], profile: str, most: int) -> str:
    """Dead beats everything else; otherwise how many decided values the profile changes here."""
    changes = cell["influence"].get(profile, [])
    overridden = profile in cell["always_overridden"]
    if profile in cell["dead"]:
        return f'<td class="dead" title="{e(profile)} is infeasible alone here">dead</td>'
    tip = "; ".join(_change(c) for c in changes) or "changes nothing"
    if overridden:
        tip += " (every preference of it lost here)"
    shade = f' style="background:{_mix("#ffffff", "#6baed6", len(changes) / most)}"' if changes else ""
    mark = "<br><small>overridden</small>" if overridden else ""
    return f'<td class="n"{shade} title="{e(tip)}">{len(changes)}{mark}</td>'


def matrix_table(report: dict[str, Any]) -> str:
    """One row per cell, one column per profile, so a profile that only some guests refuse stands out."""
    profiles = report["profiles"]
    labels = cell_labels(report)
    most = max([len(v) for c in report["cells"] for v in c["influence"].values()] + [1])
    head = "".join(f'<th class="v"><span>{e(p)}</span></th>' for p in profiles)
    rows = []
    for label, cell in zip(labels, report["cells"], strict=True):
        base = "" if cell["base_feasible"] else ' <b class="bad">template infeasible</b>'
        rows.append(
            f"<tr><th>{e(label)}{base}</th><td class='n'>{cell['infeasible_count']} / {cell['total']}</td>"
            f"<td class='n'>{cell['consistency_checks']}</td>"
            + "".join(_matrix_cell(cell, p, most) for p in profiles)
            + "</tr>"
        )
    return (
        '<table id="os-matrix"><tr><th>cell</th><th>infeasible selections</th><th>solver checks</th>'
        f"{head}</tr>{''.join(rows)}</table>"
    )


# --- minimal infeasible combinations -------------------------------------------------------------------
def _member(req: dict[str, Any]) -> str:
    """Kind, message, and where it comes from: a profile file:line, an XPath, an osinfo or a host fact."""
    p = req["provenance"]
    kind = p["kind"]
    colour = KIND_COLOURS.get(kind, "#333")
    detail = f" ({e(p['detail'])})" if p.get("detail") and p["detail"] not in p["where"] else ""
    relies = f"<br><small>relies on: {e(', '.join(req['relies_on']))}</small>" if req.get("relies_on") else ""
    return (
        f'<li><span class="kind" style="background:{colour}">{e(kind)}</span> {e(req["message"])}'
        f"<br><small>{e(p['where'])}{detail}</small>{relies}</li>"
    )


def _cause_key(m: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    return tuple((r["provenance"]["kind"], r["provenance"]["where"], r["message"]) for r in m["conflict"])


def _combination(report: dict[str, Any], name: tuple[str, ...], indices: list[int], labels: list[str]) -> str:
    """One combination: the cells refusing it, then each distinct cause once with the cells it applies to."""
    found = [
        (m, k)
        for k in indices
        for m in report["cells"][k]["minimal_infeasible"]
        if ordered(report, m["profiles"]) == name
    ]
    counts = group((m["infeasible_selections"], k) for m, k in found)
    if len(counts) == 1:
        selections = f"{next(iter(counts))} infeasible selections contain it in each of these cells"
    else:
        selections = "infeasible selections containing it: " + ", ".join(
            f"{n} in {where_cells(ks, labels)}" for n, ks in counts.items()
        )
    firsts: dict[tuple[tuple[str, str, str], ...], dict[str, Any]] = {}
    causes = group((_cause_key(m), k) for m, k in found)
    for m, _ in found:
        firsts.setdefault(_cause_key(m), m)
    blocks = []
    for key, ks in causes.items():
        intro = f"<p class='cells'>in {e(where_cells(ks, labels))}:</p>" if len(causes) > 1 else ""
        blocks.append(intro + "<ul>" + "".join(_member(r) for r in firsts[key]["conflict"]) + "</ul>")
    return (
        f"<div class='combo'><h3>{e(combination_name(name))}</h3>"
        f"<p>Cannot be selected together in {len(indices)} of {len(labels)} cell(s): "
        f"{e(where_cells(indices, labels))}. {e(selections)}.</p>{''.join(blocks)}</div>"
    )


def combinations_section(report: dict[str, Any]) -> str:
    """Smallest combinations first: a dead profile or a clashing pair explains most of the heatmap."""
    labels = cell_labels(report)
    rank = {p: i for i, p in enumerate(report["profiles"])}
    groups = group(
        (ordered(report, m["profiles"]), k) for k, c in enumerate(report["cells"]) for m in c["minimal_infeasible"]
    )
    if not groups:
        return "<p>Every combination of the profiles can be selected in every cell.</p>"
    names = sorted(groups, key=lambda n: (len(n), [rank.get(p, len(rank)) for p in n]))
    return "".join(_combination(report, n, groups[n], labels) for n in names)


# --- influence, interactions, redundancy ---------------------------------------------------------------
def influence_table(report: dict[str, Any]) -> str:
    """profile -> variable -> base -> with, each distinct change once with the cells where it happens."""
    labels = cell_labels(report)
    rows, idle = [], []
    for p in report["profiles"]:
        changes = group(
            ((c["variable"], c["base"], c["with"]), k)
            for k, cell in enumerate(report["cells"])
            for c in cell["influence"].get(p, [])
        )
        if not changes:
            idle.append(p)
            continue
        keys = sorted(changes)
        for i, (variable, base, with_) in enumerate(keys):
            first = f"<th rowspan='{len(keys)}'>{e(p)}</th>" if i == 0 else ""
            rows.append(
                f"<tr>{first}<td><code>{e(variable)}</code></td><td>{e(base)}</td><td><b>{e(with_)}</b></td>"
                f"<td><small>{e(where_cells(changes[(variable, base, with_)], labels))}</small></td></tr>"
            )
    table = (
        '<table id="influence"><tr><th>profile</th><th>variable</th><th>without profiles</th><th>with it</th>'
        f"<th>cells</th></tr>{''.join(rows)}</table>"
        if rows
        else ""
    )
    none = f"<p>Change nothing in any cell: {e(', '.join(idle))}.</p>" if idle else ""
    return table + none


def interactions_table(report: dict[str, Any]) -> str:
    """Pairs whose joint result is not the merge of each alone: the ones worth testing together."""
    labels = cell_labels(report)
    rows = group(
        (
            (
                ordered(report, x["profiles"]),
                tuple(x["variables"]),
                tuple(sorted((str(v), str(w)) for v, w in x["joint"].items())),
            ),
            k,
        )
        for k, c in enumerate(report["cells"])
        for x in c["interactions"]
    )
    if not rows:
        return "<p>No pair of profiles interacts: each pair does what each does alone.</p>"
    body = "".join(
        f"<tr><td>{e(' + '.join(pair))}</td><td><code>{e(', '.join(variables))}</code></td>"
        f"<td>{e(', '.join(f'{v} = {w}' for v, w in joint))}</td>"
        f"<td><small>{e(where_cells(ks, labels))}</small></td></tr>"
        for (pair, variables, joint), ks in rows.items()
    )
    return (
        '<table id="interactions"><tr><th>pair</th><th>variables</th><th>joint result</th><th>cells</th></tr>'
        f"{body}</table>"
    )


def redundant_table(report: dict[str, Any]) -> str:
    """Pairs where one profile adds nothing once the other is selected."""
    labels = cell_labels(report)
    rows = group(
        ((ordered(report, x["profiles"]), x["adds_nothing"]), k)
        for k, c in enumerate(report["cells"])
        for x in c["redundant"]
    )
    if not rows:
        return "<p>No redundant pairs.</p>"
    body = "".join(
        f"<tr><td>{e(' + '.join(pair))}</td><td>{e(extra)}</td>"
        f"<td><small>{e(where_cells(ks, labels))}</small></td></tr>"
        for (pair, extra), ks in rows.items()
    )
    return f'<table id="redundant"><tr><th>pair</th><th>adds nothing</th><th>cells</th></tr>{body}</table>'


# --- the page ------------------------------------------------------------------------------------------
def _names(items: Sequence[str]) -> str:
    return e(", ".join(items)) if items else "none"


def summary_table(report: dict[str, Any]) -> str:
    """What holds across every cell, first, before the reader scrolls."""
    s = report["summary"]
    labels = cell_labels(report)
    n = len(report["profiles"])
    pairs = ", ".join(f"{' + '.join(ordered(report, p['profiles']))} ({p['cells']})" for p in s["infeasible_pairs"])
    rows = [
        ("cells", f"{s['cells']}: {_names(labels)}"),
        ("profiles", f"{n}, so {2**n} selections per cell"),
        ("dead in every cell", _names(s["dead"])),
        ("always overridden", _names(s["always_overridden"])),
        ("rules never fired", _names(s["rules_never_fired"])),
        ("minimal infeasible pairs (cells)", e(pairs) if pairs else "none"),
    ]
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table id="summary">{body}</table>'


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px} table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left} small{color:#555}
h2{margin-top:1.6em} #summary th{background:#f4f4f4;white-space:nowrap} td.n{text-align:right}
td.dead{background:#f8d0d0;color:#7a0014;font-weight:bold;text-align:center} b.bad{color:#7a0014}
th.v{vertical-align:bottom;padding:6px 2px} th.v span{writing-mode:vertical-rl;transform:rotate(180deg);
white-space:nowrap;font-weight:normal} .kind{color:#fff;border-radius:3px;padding:0 5px;font-size:85%}
.combo{border-left:4px solid #ccc;padding-left:10px;margin:10px 0} .combo h3{margin:4px 0} p.cells{margin:4px 0}
ul{margin:4px 0}"""


def to_html(report: dict[str, Any]) -> str:
    """The whole page: summary, heatmap, OS x profile matrix, combinations, influence, pairs."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>virtpolicy whatif: {e(report["domain"])}</title>
<style>{STYLE}</style></head>
<body><h1>What-if: {len(report["profiles"])} profiles over {report["summary"]["cells"]} cell(s)</h1>
<p>Template: {e(report["domain"])}. Schema {e(report["schema"])}.</p>
{summary_table(report)}
<h2>Which pairs can be selected together</h2>
<p>Each square counts the (OS, host) cells in which the two profiles cannot be selected together; hover for why.</p>
{heatmap_svg(report)}
<h2>Guest OS × profile</h2>
<p><b>dead</b>: infeasible alone there; a number: how many decided values the profile changes (hover for them).</p>
{matrix_table(report)}
<h2>Minimal infeasible combinations</h2>
{combinations_section(report)}
<h2>Influence: what each profile changes</h2>
{influence_table(report)}
<h2>Interactions</h2>
{interactions_table(report)}
<h2>Redundant pairs</h2>
{redundant_table(report)}
</body></html>
"""
