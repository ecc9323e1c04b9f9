"""Profiles: in-process solve of the typical VM with five profiles selected, and `profiles check` of the
whole shipped library including every pair.

Targets (issue 3): solve with 5 profiles, median <= 15 ms; check of the library with all pairs <= 5 s.
Host, osinfo index and profiles are loaded before timing (a service has them loaded); each iteration
parses the domain, builds, solves and renders.

Run: .venv/bin/python benchmarks/bench_profiles.py [--runs N]
"""

from __future__ import annotations

import argparse
import time

from _benchutil import TYPICAL_XML, emit_json, environment, summary_ms, table

from virtpolicy import Engine
from virtpolicy.profiles.library import available

FIVE = ("modern-q35", "virtio-everywhere", "desktop-spice", "hotplug-ready", "migration-safe")
TARGET_SOLVE_MS = 15.0
TARGET_CHECK_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    engine = Engine()
    data = TYPICAL_XML.read_bytes()
    times = []
    solves = 0
    constraints = 0
    for i in range(args.runs + 10):
        start = time.perf_counter()
        result = engine.solve(data, profiles=FIVE, os="fedora37", source="typical")
        assert result.feasible
        if i >= 10:
            times.append(time.perf_counter() - start)
        solves = result.outcome.solves
        constraints = len(result.problem.constraints)
    solve_stats = summary_ms(times)

    files = sorted(available().values())
    checks = []
    incompatible = 0
    for _ in range(3):
        start = time.perf_counter()
        report = Engine().check_profiles(files)
        checks.append(time.perf_counter() - start)
        incompatible = len(report.incompatible)
    check_s = min(checks)
    pairs = len(files) * (len(files) - 1) // 2
    print(
        table(
            ["measure", "median / best", "p95", "target", "notes"],
            [
                [
                    f"solve typical VM + {len(FIVE)} profiles (ms)",
                    solve_stats["median_ms"],
                    solve_stats["p95_ms"],
                    TARGET_SOLVE_MS,
                    f"{solves} solver calls, {constraints} constraints",
                ],
                [
                    f"profiles check, {len(files)} profiles (s)",
                    round(check_s, 3),
                    round(max(checks), 3),
                    TARGET_CHECK_S,
                    f"{pairs} pairs x 2 guests, {incompatible} incompatible",
                ],
            ],
        )
    )
    emit_json(
        {
            "bench": "profiles",
            "profiles": list(FIVE),
            "solve": solve_stats,
            "solver_calls": solves,
            "check_seconds_best": round(check_s, 3),
            "check_runs": [round(c, 3) for c in checks],
            "library_size": len(files),
            "pairs": pairs,
            "incompatible_pairs": incompatible,
            "targets": {"solve_median_ms": TARGET_SOLVE_MS, "check_s": TARGET_CHECK_S},
            **environment(),
        }
    )


if __name__ == "__main__":
    main()
