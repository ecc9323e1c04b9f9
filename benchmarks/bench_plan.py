"""Cluster planning at scale (issue 12's targets), on fleets from benchmarks/fleetgen.py.

- `plan hosts`: 1,000 hosts (at least 50 classes) x 50 templates: <= 10 s on 2 cores.
- `plan common` over 1,000 hosts: <= 5 s.
- 100,000 hosts x 1,000 templates: too big for one machine's budget, so a slice of it runs on a Dask
  LocalCluster here (two workers), the rate in class-template checks per second is measured, and the
  full job is projected to a 32-worker cluster (hosts collapse into classes, so the work is
  classes x templates; the projection assumes the same per-check cost and linear scaling, which
  batching makes close to true: one task is a batch of classes x all templates).

Run: .venv/bin/python benchmarks/bench_plan.py [--hosts N] [--templates N] [--workers N] [--no-dask]
Needs the libvirt corpus (scripts/fetch-libvirt-corpus.sh).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from _benchutil import emit_json, environment, table
from bench_engine import varied_domain
from fleetgen import generate

from virtpolicy.plan.common import plan_common
from virtpolicy.plan.fleet import classes_of, load_fleet
from virtpolicy.plan.hosts import engine_for, plan_hosts_many

TARGET_HOSTS_S = 10.0
TARGET_COMMON_S = 5.0
FULL_HOSTS, FULL_TEMPLATES, PROJECTED_WORKERS = 100_000, 1_000, 32


def templates(count: int, seed: int) -> list[tuple[bytes, str]]:
    """bench_engine's varied partial domains (all planned for fedora37)."""
    rng = random.Random(seed)
    return [(varied_domain(rng, i)[0].encode(), f"template-{i}") for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--templates", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        inventory = generate(Path(tmp), args.hosts)
        start = time.perf_counter()
        fleet = load_fleet(inventory)
        load_s = time.perf_counter() - start
        engine = engine_for(fleet)
        domains = templates(args.templates, args.seed)
        start = time.perf_counter()
        plans = plan_hosts_many(engine, fleet, domains, os="fedora37", workers=args.workers)
        hosts_s = time.perf_counter() - start
        runs = sum(p.to_dict()["runs_on"] for p in plans)
        checks = len(fleet.classes) * len(domains)
        rows.append(
            [
                f"plan hosts: {len(fleet.hosts)} hosts, {len(fleet.classes)} classes x {len(domains)} templates (s)",
                round(hosts_s, 2),
                TARGET_HOSTS_S,
                f"+ {load_s:.2f} s loading the fleet; {checks} checks, {runs} host-template pairs run",
            ]
        )
        figures["hosts"] = {"seconds": round(hosts_s, 3), "load_seconds": round(load_s, 3), "checks": checks}
        start = time.perf_counter()
        common = plan_common(engine, classes_of(fleet.hosts), (Path(__file__).parent / "typical.xml").read_bytes(),
                             "typical.xml")  # fmt: skip
        common_s = time.perf_counter() - start
        verdict = f"{'fits all' if common.feasible else 'does not fit all'} {len(common.fits)} classes"
        rows.append([f"plan common over {len(fleet.hosts)} hosts (s)", round(common_s, 2), TARGET_COMMON_S, verdict])
        figures["common"] = {"seconds": round(common_s, 3), "feasible": common.feasible}
        if not args.no_dask:
            figures["dask"] = dask_rate(engine, fleet, domains, rows)
    print(table(["measure", "seconds", "target", "notes"], rows))
    emit_json({"bench": "plan", **figures, "targets": {"hosts_s": TARGET_HOSTS_S, "common_s": TARGET_COMMON_S},
               **environment()})  # fmt: skip


def dask_rate(engine, fleet, domains, rows) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        plan_hosts_many(engine, fleet, domains[:2], os="fedora37", client=client)  # warm: engine scattered
        start = time.perf_counter()
        plan_hosts_many(engine, fleet, domains, os="fedora37", client=client)
        seconds = time.perf_counter() - start
    checks = len(fleet.classes) * len(domains)
    rate = checks / seconds
    # the full job: 100,000 hosts collapse into classes; at fleetgen's ratio of classes to hosts
    full_classes = min(FULL_HOSTS, len(fleet.classes) * FULL_HOSTS // max(1, len(fleet.hosts)))
    projected = full_classes * FULL_TEMPLATES / (rate / 2 * PROJECTED_WORKERS)
    rows.append(
        [
            f"LocalCluster (2 workers): {checks} class-template checks (s)",
            round(seconds, 2),
            "-",
            f"{rate:.0f} checks/s; {FULL_HOSTS} hosts x {FULL_TEMPLATES} templates on {PROJECTED_WORKERS} workers: "
            f"~{projected:.0f} s (as {full_classes} classes)",
        ]
    )
    return {
        "seconds": round(seconds, 3),
        "checks_per_second": round(rate, 1),
        "projected_32_workers_s": round(projected),
    }


if __name__ == "__main__":
    main()
