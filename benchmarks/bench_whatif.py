"""What-if combinations at scale (issue 11's targets).

- 12 shipped profiles x 20 guest OSes x 1 host, full analysis (minimal infeasible sets, exact counts,
  influence, interactions): <= 5 s on 2 cores.
- 20 profiles (the shipped library plus generated ones) x 20 OSes x 3 hosts, with the 2^20 selections
  of each cell counted exactly: <= 60 s on 2 cores.
- `whatif compare` of 1,000 domains (bench_engine's varied templates, half of them laid out by a first
  solve, so complete) across the QEMU 7.2 -> 8.0 host upgrade of libvirt's test suite: <= 20 s on 2 cores
  (needs the corpus: scripts/fetch-libvirt-corpus.sh).

The generated profiles (seeded) require, forbid or prefer values of the global variables, so some clash
with each other and with the shipped ones. Hosts: the embedded bundle, and its pc-only and q35-only
domcapabilities files as hosts of their own. Both runs go through `analyse_combinations`, the function
the CLI calls, with a process pool of `--workers` (default 2).

Run: .venv/bin/python benchmarks/bench_whatif.py [--workers N] [--seed S] [--quick]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from _benchutil import REPO, emit_json, environment, table
from bench_engine import OSES, varied_domain

from virtpolicy import Engine
from virtpolicy.inputs.host import EMBEDDED_BUNDLE
from virtpolicy.whatif.report import analyse_combinations

TARGET_SMALL_S = 5.0
TARGET_LARGE_S = 60.0
TARGET_COMPARE_S = 20.0
TWELVE = (
    "desktop-spice",
    "headless-server",
    "hotplug-ready",
    "kubevirt-preferences",
    "legacy-pc",
    "migration-safe",
    "modern-q35",
    "nfv-networking",
    "secure-boot",
    "virt-install-defaults",
    "virtio-everywhere",
    "windows-11",
)
CHOICES = {
    "graphics.type": ("spice", "vnc", "none"),
    "clock.offset": ("utc", "localtime"),
    "cpu.mode": ("host-passthrough", "host-model"),
    "tpm.model": ("tpm-crb", "tpm-tis", "none"),
    "video.model": ("virtio", "qxl", "vga", "none"),
    "machine": ("q35", "pc"),
}


def generated_profiles(directory: Path, count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = []
    for i in range(count):
        name = f"gen-{i:02d}"
        var = rng.choice(sorted(CHOICES))
        values = rng.sample(CHOICES[var], k=rng.randint(1, len(CHOICES[var]) - 1))
        kind = rng.choice(("require", "require", "forbid", "prefer"))
        strength = "soft" if kind == "prefer" else "hard"
        listed = ", ".join(f'"{v}"' for v in values)
        (directory / f"{name}.toml").write_text(
            f'name = "{name}"\nversion = "1.0"\ndescription = "generated {kind} {var}"\n\n'
            f'[[rule]]\nid = "r"\n{kind} = {{ "{var}" = [{listed}] }}\nstrength = "{strength}"\n'
        )
        names.append(name)
    return names


def run(engine: Engine, profiles: list[str], hosts: list[str] | None, workers: int) -> tuple[float, dict[str, int]]:
    start = time.perf_counter()
    report = analyse_combinations(engine, profiles, list(OSES), hosts=hosts, workers=workers)
    elapsed = time.perf_counter() - start
    cells = report.cells
    return elapsed, {
        "cells": len(cells),
        "minimal_infeasible": sum(len(c.minimal_infeasible) for c in cells),
        "infeasible": sum(c.infeasible_count for c in cells),
        "selections": sum(c.total for c in cells),
        "checks": sum(c.checks for c in cells),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="only the 12-profile run")
    parser.add_argument("--domains", type=int, default=1000, help="domains for the compare run")
    args = parser.parse_args()
    rows = []
    figures: dict[str, object] = {}
    small_s, small = run(Engine(), list(TWELVE), None, args.workers)
    rows.append(["12 profiles x 20 OSes x 1 host (s)", round(small_s, 2), TARGET_SMALL_S, _notes(small)])
    figures["small"] = {"seconds": round(small_s, 3), **small}
    if not args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-whatif-") as tmp:
            extra = generated_profiles(Path(tmp), 20 - len(TWELVE), args.seed)
            hosts = {
                "full": EMBEDDED_BUNDLE,
                "pc-only": EMBEDDED_BUNDLE / "domcaps-x86_64-pc-kvm.xml",
                "q35-only": EMBEDDED_BUNDLE / "domcaps-x86_64-q35-kvm.xml",
            }
            engine = Engine(hosts, profile_path=[Path(tmp)])
            large_s, large = run(engine, [*TWELVE, *extra], list(hosts), args.workers)
        rows.append(["20 profiles x 20 OSes x 3 hosts (s)", round(large_s, 2), TARGET_LARGE_S, _notes(large)])
        figures["large"] = {"seconds": round(large_s, 3), **large}
    if not args.quick:
        compared = run_compare(args.domains, args.workers, args.seed)
        if compared is None:
            rows.append([f"compare {args.domains} domains 7.2 -> 8.0 (s)", "-", TARGET_COMPARE_S, "no corpus"])
        else:
            seconds, summary = compared
            notes = ", ".join(f"{v} {k}" for k, v in summary.items())
            rows.append([f"compare {args.domains} domains 7.2 -> 8.0 (s)", round(seconds, 2), TARGET_COMPARE_S, notes])
            figures["compare"] = {"seconds": round(seconds, 3), **summary}
    print(table(["measure", "seconds", "target", "notes"], rows))
    emit_json(
        {
            "bench": "whatif",
            "workers": args.workers,
            **figures,
            "targets": {"small_s": TARGET_SMALL_S, "large_s": TARGET_LARGE_S, "compare_s": TARGET_COMPARE_S},
            **environment(),
        }
    )


def run_compare(count: int, workers: int, seed: int) -> tuple[float, dict[str, int]] | None:
    sys.path.insert(0, str(REPO / "tests"))
    import corpus  # test-support module: assembles libvirt's QEMU test hosts as bundles

    from virtpolicy.whatif.compare import Side, compare_domains

    if corpus.corpus_dir() is None:
        return None
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        before_host = corpus.corpus_host_bundle(Path(tmp), "7.2.0")
        after_host = corpus.corpus_host_bundle(Path(tmp), "8.0.0")
        before, after = Engine(before_host), Engine(after_host)
        domains: list[tuple[bytes, str]] = []
        for i in range(count):
            xml, _ = varied_domain(rng, i)
            data = xml.replace("<os>", "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/"
                               "xmlns/libvirt/domain/1.0'><libosinfo:os id='http://fedoraproject.org/fedora/37'/>"
                               "</libosinfo:libosinfo></metadata><os>", 1).encode()  # fmt: skip
            if i % 2:
                laid_out = before.solve(data)
                data = laid_out.xml_bytes if laid_out.feasible and laid_out.xml_bytes else data
            domains.append((data, f"domain-{i}"))
        sides = (Side("qemu 7.2"), Side("qemu 8.0"))
        start = time.perf_counter()
        report = compare_domains(before, after, domains, sides, workers=workers)
        seconds = time.perf_counter() - start
    return seconds, report.to_dict()["summary"]


def _notes(figures: dict[str, int]) -> str:
    return (
        f"{figures['cells']} cells, {figures['minimal_infeasible']} minimal infeasible sets, "
        f"{figures['infeasible']}/{figures['selections']} selections infeasible, {figures['checks']} checks"
    )


if __name__ == "__main__":
    main()
