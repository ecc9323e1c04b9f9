"""Scale: solve and explain as a domain grows to hundreds and thousands of devices, and explain on every example.

Issue 9 asks that work grow gently with size: 1,000 devices solve and explain within 5 s, and
`virtpolicy explain` finish under 1 s on every file in examples/. This measures both, in-process with the
host bundle and the osinfo-db index loaded once (their one-time cost is bench_vs_virtinstall.py's), as
the median of a few runs. "solve" is build + solve + render, what `virtpolicy solve` does per request;
"explain" is build + solve + the explain report, what `virtpolicy explain` does.

A size whose first run exceeds --budget seconds is reported as such, and a larger size is skipped when
this one's time, grown to it at the rate measured between the last two sizes (at least linearly, at most
cubically; quadratically after the first size), would exceed the budget: the table should come back in
minutes, not hours. Wall-clock medians are the figures; the process's CPU time is shown beside them, since
on a shared machine the wall clock also counts other processes' turns.

Run: .venv/bin/python benchmarks/bench_scale.py [--runs N] [--sizes 100,500,1000] [--budget S]
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable

from _benchutil import REPO, emit_json, environment, median, table

from virtpolicy.core.solve import Conflict, solve
from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.guestos import OsinfoDB
from virtpolicy.inputs.host import Host, embedded_host
from virtpolicy.outputs.explain_report import build_report
from virtpolicy.outputs.render import render, to_bytes
from virtpolicy.sources.build import build

TARGET_DEVICES_S = 5.0  # 1,000 devices, solve or explain
TARGET_EXAMPLE_S = 1.0  # explain on every file in examples/
EXAMPLES = REPO / "examples"
DEVICES: dict[str, Callable[[int], str]] = {
    "disks": lambda i: f"<disk type='file' device='disk'><source file='/var/lib/images/d{i}.qcow2'/></disk>",
    "interfaces": lambda i: "<interface type='network'><source network='default'/></interface>",
}


def scaled_domain(kind: str, count: int) -> bytes:
    """A partial Fedora 37 domain with `count` devices of one kind and nothing else decided."""
    devices = "".join(DEVICES[kind](i) for i in range(count))
    return (
        f"<domain type='kvm'><name>{kind}-{count}</name><memory unit='GiB'>8</memory><vcpu>8</vcpu>"
        "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>"
        "<libosinfo:os id='http://fedoraproject.org/fedora/37'/></libosinfo:libosinfo></metadata>"
        f"<os><type arch='x86_64'>hvm</type></os><devices>{devices}</devices></domain>"
    ).encode()


def run_once(data: bytes, source: str, host: Host, osdb: OsinfoDB, command: str) -> tuple[float, float]:
    """Seconds for one request, from the parsed input to the output (XML or explain report): wall, CPU."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    domain = Domain.from_bytes(data, source)
    guest = osdb.lookup(domain.os_id.value if domain.os_id else "generic")
    built = build(domain, host, guest, device_names=osdb.device_names())
    result = solve(built.problem)
    if command == "explain":
        build_report(built, result, 10)
    elif not isinstance(result, Conflict):
        to_bytes(render(built, result))
    return time.perf_counter() - start, time.process_time() - cpu


def measure(data: bytes, source: str, host: Host, osdb: OsinfoDB, command: str, runs: int, budget: float) -> dict:
    """Medians of `runs` requests (wall and CPU); a first run over `budget` seconds is the only one."""
    times = [run_once(data, source, host, osdb, command)]
    if times[0][0] > budget:
        return {"median_s": round(times[0][0], 3), "cpu_s": round(times[0][1], 3), "runs": 1, "over_budget": True}
    times += [run_once(data, source, host, osdb, command) for _ in range(runs - 1)]
    return {
        "median_s": round(median([t[0] for t in times]), 3),
        "cpu_s": round(median([t[1] for t in times]), 3),
        "runs": len(times),
        "over_budget": False,
    }


def predicted(sizes: list[int], seconds: list[float], count: int) -> float:
    """The time at `count` devices, grown from the last measured size at the rate of the last two (its
    exponent at least 1 and at most 3; 2 when only one size is measured)."""
    exponent = 2.0
    if len(seconds) >= 2 and seconds[-2] > 0 and seconds[-1] > 0 and sizes[-1] != sizes[-2]:
        exponent = math.log(seconds[-1] / seconds[-2]) / math.log(sizes[-1] / sizes[-2])
        exponent = min(3.0, max(1.0, exponent))
    return seconds[-1] * (count / sizes[-1]) ** exponent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="100,500,1000", help="device counts, comma-separated")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds; larger sizes are skipped past it")
    args = parser.parse_args()
    sys.setrecursionlimit(1000)  # the default: a deep recursion must fail here as it would in the CLI
    host, osdb = embedded_host(), OsinfoDB()
    osdb.device_names()  # the index is built once per process, not per request
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rows: list[list[object]] = []
    results: list[dict[str, object]] = []
    for kind in DEVICES:
        for command in ("solve", "explain"):
            skipped = False
            measured: list[int] = []
            seconds: list[float] = []
            for position, count in enumerate(sizes):
                name = f"{command} {count} {kind}"
                if skipped:
                    rows.append([name, "skipped", "-", "-", f"a smaller size predicts over {args.budget:.0f} s"])
                    results.append({"case": name, "skipped": True})
                    continue
                figure = measure(scaled_domain(kind, count), name, host, osdb, command, args.runs, args.budget)
                measured.append(count)
                seconds.append(figure["median_s"])
                grown = predicted(measured, seconds, sizes[position + 1]) if position + 1 < len(sizes) else 0
                skipped = bool(figure["over_budget"]) or grown > args.budget
                target = f"<= {TARGET_DEVICES_S:.0f} s" if count <= 1000 else "-"
                note = (
                    f"over the {args.budget:.0f} s budget: one run"
                    if figure["over_budget"]
                    else f"{figure['runs']} runs"
                )
                rows.append([name, f"{figure['median_s']:.3f}", f"{figure['cpu_s']:.3f}", target, note])
                results.append({"case": name, **figure})
    for path in sorted(EXAMPLES.glob("*.xml")):
        name = f"explain examples/{path.name}"
        figure = measure(path.read_bytes(), str(path), host, osdb, "explain", args.runs, args.budget)
        rows.append(
            [
                name,
                f"{figure['median_s']:.3f}",
                f"{figure['cpu_s']:.3f}",
                f"<= {TARGET_EXAMPLE_S:.0f} s",
                f"{figure['runs']} runs",
            ]
        )
        results.append({"case": name, **figure})
    print(table(["case", "median s", "cpu s", "target", "notes"], rows))
    emit_json(
        {
            "bench": "scale",
            "results": results,
            "targets": {"devices_s": TARGET_DEVICES_S, "example_explain_s": TARGET_EXAMPLE_S},
            **environment(),
        }
    )


if __name__ == "__main__":
    main()
