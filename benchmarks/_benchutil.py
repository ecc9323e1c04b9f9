"""Shared bits of the benchmark scripts: statistics, tables, paths.

Kept in one place so the three scripts compute percentiles the same way; their figures are compared
against each other and against the targets in README.md.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TYPICAL_XML = BENCH_DIR / "typical.xml"
RHEL6_XML = REPO / "examples" / "rhel6-on-q35.xml"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile: a value that was actually observed, not an interpolation.

    With a few hundred samples the interpolated and nearest-rank figures differ by less than the
    run-to-run noise, and an observed value is easier to reason about.
    """
    ordered = sorted(values)
    rank = max(1, -(-95 * len(ordered) // 100))  # ceil(0.95 n)
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "median_ms": round(median(ms), 3),
        "p95_ms": round(p95(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left/right-aligned text table: numbers right, words left."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def environment() -> dict[str, str]:
    """What the figures depend on, so a JSON line read later still says where it was measured."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def emit_json(data: dict[str, object]) -> None:
    """The last line of output: one JSON object, for scripts that collect the figures."""
    sys.stdout.flush()
    print(json.dumps(data, sort_keys=True))
