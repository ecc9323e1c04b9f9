"""One Engine, many requests: the figures the what-if, planning and REST layers depend on.

Three measurements (issue 10's in-process targets):
- typical VM (`typical.xml`) through `Engine.solve`: median <= 5 ms;
- 1,000 varied domains (generated here, seeded: OS, machine, disk and NIC counts and buses, profile
  sets) through one Engine on one core: <= 8 s in total;
- peak memory of a process holding an Engine with every osinfo-db OS resolved and every shipped
  profile loaded: <= 80 MiB. Reported as the process's peak RSS (interpreter and lxml included) and as
  the Python allocations the engine itself holds (tracemalloc).

Run: .venv/bin/python benchmarks/bench_engine.py [--runs N] [--varied N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time
import tracemalloc

from _benchutil import TYPICAL_XML, emit_json, environment, summary_ms, table

from virtpolicy import Engine, InputError

TARGET_TYPICAL_MS = 5.0
TARGET_VARIED_S = 8.0
TARGET_MEMORY_MIB = 80.0
OSES = (
    "fedora37",
    "rhel9.0",
    "rhel8.6",
    "rhel7.9",
    "rhel6.10",
    "centos7.0",
    "debian11",
    "ubuntu22.04",
    "ubuntu18.04",
    "sle15sp4",
    "win10",
    "win11",
    "win2k19",
    "win2k22",
    "winxp",
    "freebsd13.1",
    "alpinelinux3.17",
    "opensuse15.4",
    "archlinux",
    "generic",
)
MACHINES = (None, None, "q35", "pc")
DISK_BUSES = (None, None, "virtio", "sata", "scsi", "ide")
NIC_MODELS = (None, None, "virtio", "e1000e", "rtl8139")
PROFILE_SETS = ((), (), ("modern-q35",), ("headless-server",), ("virtio-everywhere",), ("legacy-pc",))


def varied_domain(rng: random.Random, i: int) -> tuple[str, tuple[str, ...]]:
    """A partial domain as a management app writes it, and the profiles it asks for."""
    machine = rng.choice(MACHINES)
    machine_attr = f" machine='{machine}'" if machine else ""
    devices = []
    for d in range(rng.randint(1, 4)):
        bus = rng.choice(DISK_BUSES)
        prefix = {"virtio": "vd", "ide": "hd"}.get(bus or "", "sd")
        target = f"<target dev='{prefix}{chr(97 + d)}' bus='{bus}'/>" if bus else ""
        devices.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='/var/lib/libvirt/images/v{i}-{d}.qcow2'/>{target}</disk>"
        )
    for _ in range(rng.randint(0, 3)):
        model = rng.choice(NIC_MODELS)
        devices.append(
            "<interface type='network'><source network='default'/>"
            + (f"<model type='{model}'/>" if model else "")
            + "</interface>"
        )
    xml = (
        f"<domain type='kvm'><name>varied-{i}</name><memory unit='MiB'>{rng.choice((512, 2048, 8192))}</memory>"
        f"<vcpu>{rng.choice((1, 2, 4, 8))}</vcpu><os><type arch='x86_64'{machine_attr}>hvm</type></os>"
        f"<devices>{''.join(devices)}</devices></domain>"
    )
    return xml, rng.choice(PROFILE_SETS)


def pin_one_core() -> str:
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        return "pinned to one core"
    except (AttributeError, OSError):
        return "not pinned (no sched_setaffinity)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--varied", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=10)
    args = parser.parse_args()
    pinning = pin_one_core()

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = Engine()
    osdb = engine.osinfo
    resolved = 0
    for key in osdb.os_ids():
        try:
            osdb.lookup(key)
            resolved += 1
        except InputError:
            pass
    for name in sorted(engine.profiles()):
        engine.profile(name)
    engine_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    data = TYPICAL_XML.read_bytes()
    times = []
    for i in range(args.runs + 10):
        start = time.perf_counter()
        result = engine.solve(data, source="typical")
        if i >= 10:
            times.append(time.perf_counter() - start)
        assert result.feasible
    typical = summary_ms(times)

    rng = random.Random(args.seed)
    requests = [varied_domain(rng, i) for i in range(args.varied)]
    outcomes = {"solved": 0, "conflict": 0, "input error": 0}
    start = time.perf_counter()
    for xml, profiles in requests:
        try:
            result = engine.solve(xml, profiles=profiles, os=rng.choice(OSES))
            outcomes[result.status] += 1
        except InputError:
            outcomes["input error"] += 1
    varied_s = time.perf_counter() - start
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(
        table(
            ["measure", "figure", "target", "notes"],
            [
                [
                    "typical VM, Engine.solve median (ms)",
                    typical["median_ms"],
                    TARGET_TYPICAL_MS,
                    f"p95 {typical['p95_ms']}",
                ],
                [
                    f"{args.varied} varied domains (s)",
                    round(varied_s, 2),
                    TARGET_VARIED_S,
                    ", ".join(f"{v} {k}" for k, v in outcomes.items()) + f"; {pinning}",
                ],
                [
                    "peak RSS of the process (MiB)",
                    round(peak_rss_mib, 1),
                    TARGET_MEMORY_MIB,
                    "interpreter + lxml included",
                ],
                [
                    "engine's own allocations (MiB)",
                    round(engine_bytes / 2**20, 1),
                    TARGET_MEMORY_MIB,
                    f"{resolved} osinfo OSes resolved, {len(engine.profiles())} profiles loaded",
                ],
            ],
        )
    )
    emit_json(
        {
            "bench": "engine",
            "typical": typical,
            "varied": {"count": args.varied, "seconds": round(varied_s, 3), "outcomes": outcomes, "pinning": pinning},
            "memory": {"peak_rss_mib": round(peak_rss_mib, 1), "engine_mib": round(engine_bytes / 2**20, 1)},
            "targets": {"typical_ms": TARGET_TYPICAL_MS, "varied_s": TARGET_VARIED_S, "memory_mib": TARGET_MEMORY_MIB},
            **environment(),
        }
    )


if __name__ == "__main__":
    main()
