"""Explanations: time to the first minimal conflict on a big problem, and to all minimal conflicts.

Targets (issue 4): first minimal conflict for a 40-device VM with 8 profiles (about 300 constraints)
<= 200 ms; all minimal conflicts of an instance that has 5 of them <= 1 s. Building the problem is done
once and not timed (bench_solve.py measures it).

Run: .venv/bin/python benchmarks/bench_explain.py [--runs N]
"""

from __future__ import annotations

import argparse
import time

from _benchutil import emit_json, environment, summary_ms, table

from virtpolicy import Engine
from virtpolicy.core.explain import ConflictExplainer
from virtpolicy.core.solve import Conflict, Solver

EIGHT = (
    "modern-q35",
    "virtio-everywhere",
    "desktop-spice",
    "hotplug-ready",
    "migration-safe",
    "kubevirt-preferences",
    "virt-install-defaults",
    "windows",
)
TARGET_FIRST_MS = 200.0
TARGET_ALL_MS = 1000.0


def big_domain() -> bytes:
    """40 devices, and the app asks for a host-passthrough CPU that migration-safe forbids."""
    disks = "".join(f"<disk type='file' device='disk'><source file='/d{i}.qcow2'/></disk>" for i in range(24))
    nics = "".join("<interface type='network'><source network='default'/></interface>" for _ in range(16))
    return (
        f"<domain type='kvm'><name>big</name><memory unit='GiB'>8</memory><vcpu>8</vcpu>"
        f"<os><type arch='x86_64'>hvm</type></os><cpu mode='host-passthrough'/>"
        f"<devices>{disks}{nics}</devices></domain>"
    ).encode()


def five_conflicts() -> bytes:
    """RHEL 5 on q35 with an IDE cdrom, two modern-only NICs and a passthrough CPU under migration-safe."""
    return b"""<domain type='kvm'><name>five</name><memory unit='MiB'>1024</memory><vcpu>1</vcpu>
    <os><type arch='x86_64' machine='q35'>hvm</type></os><cpu mode='host-passthrough'/><devices>
    <disk type='file' device='cdrom'><target dev='hda' bus='ide'/></disk>
    <interface type='user'><model type='virtio-non-transitional'/></interface>
    <interface type='user'><model type='virtio-non-transitional'/></interface>
    </devices></domain>"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    engine = Engine()
    big = engine.solve(big_domain(), profiles=EIGHT, os="fedora37", source="big")  # the problem, built once
    first_times, members = [], 0
    for _ in range(args.runs):
        start = time.perf_counter()
        result = Solver(big.problem).solve()
        first_times.append(time.perf_counter() - start)
        assert isinstance(result, Conflict)
        members = len(result.members)
    five = engine.solve(five_conflicts(), profiles=["migration-safe"], os="rhel5.11", source="five")
    all_times, found, corrections = [], 0, 0
    for _ in range(args.runs):
        start = time.perf_counter()
        explanation = ConflictExplainer(five.problem).explain(10)
        all_times.append(time.perf_counter() - start)
        found, corrections = len(explanation.conflicts), len(explanation.corrections)
    first, every = summary_ms(first_times), summary_ms(all_times)
    print(
        table(
            ["measure", "median ms", "p95 ms", "target ms", "notes"],
            [
                [
                    "first minimal conflict, 40 devices + 8 profiles",
                    first["median_ms"],
                    first["p95_ms"],
                    TARGET_FIRST_MS,
                    f"{len(big.problem.constraints)} constraints, {members} members",
                ],
                [
                    "all minimal conflicts (5 of them)",
                    every["median_ms"],
                    every["p95_ms"],
                    TARGET_ALL_MS,
                    f"{found} conflicts, {corrections} corrections",
                ],
            ],
        )
    )
    emit_json(
        {
            "bench": "explain",
            "first_conflict": first,
            "constraints": len(big.problem.constraints),
            "all_conflicts": every,
            "conflicts_found": found,
            "corrections": corrections,
            "targets": {"first_ms": TARGET_FIRST_MS, "all_ms": TARGET_ALL_MS},
            **environment(),
        }
    )


if __name__ == "__main__":
    main()
