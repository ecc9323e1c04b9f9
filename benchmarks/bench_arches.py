"""The typical VM on every architecture: in-process Engine.solve time per architecture (issue 14's target:
the same as on x86_64, median <= 5 ms).

The typical VM (typical.xml: one disk, one NIC, machine left open) is solved for each host bundle the
tests ship: the embedded x86_64 KVM host, the TCG hosts captured from this machine's libvirt
(tests/data/hosts/tcg-*), and the real KVM hosts of other architectures (tests/data/hosts/peer-samples).
The guest OS is one osinfo-db lists on that architecture (rhel9.0; riscv64 has none: generic).

Run: .venv/bin/python benchmarks/bench_arches.py [--runs N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from _benchutil import REPO, TYPICAL_XML, emit_json, environment, summary_ms, table

from virtpolicy import Engine

TARGET_MS = 5.0
HOSTS = REPO / "tests" / "data" / "hosts"
PEERS = {  # arch -> (capabilities, domcapabilities, machine family)
    "aarch64": ("kvm-aarch64.xml", "kvm-aarch64-domcaps.xml", "virt"),
    "ppc64le": ("kvm-ppc64le.xml", "kvm-ppc64le-domcaps.xml", "pseries"),
    "s390x": ("kvm-s390x.xml", "kvm-s390x-domcaps.xml", "s390-ccw-virtio"),
    "riscv64": ("qemu-riscv64.xml", "qemu-riscv64-domcaps.xml", "virt"),
}


def _peer_bundle(tmp: Path, arch: str) -> Path:
    caps, domcaps, machine = PEERS[arch]
    bundle = tmp / f"peer-{arch}"
    bundle.mkdir()
    shutil.copy(HOSTS / "peer-samples" / caps, bundle / "capabilities.xml")
    virt = "qemu" if caps.startswith("qemu-") else "kvm"
    shutil.copy(HOSTS / "peer-samples" / domcaps, bundle / f"domcaps-{arch}-{machine}-{virt}.xml")
    return bundle


def _typical(arch: str, virt: str) -> str:
    xml = TYPICAL_XML.read_text().replace("arch='x86_64'", f"arch='{arch}'").replace("type='kvm'", f"type='{virt}'")
    return xml.replace("http://fedoraproject.org/fedora/37", "http://redhat.com/rhel/9.0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-arches-"))
    cases: list[tuple[str, str, Path | None, str]] = [("x86_64", "embedded kvm", None, "kvm")]
    for bundle in sorted(HOSTS.glob("tcg-*")):
        cases.append((bundle.name.removeprefix("tcg-"), "tcg (this machine)", bundle, "qemu"))
    for arch in PEERS:
        cases.append(
            (
                arch,
                "kvm peer sample" if arch != "riscv64" else "tcg peer sample",
                _peer_bundle(tmp, arch),
                "kvm" if arch != "riscv64" else "qemu",
            )
        )
    rows, figures = [], {}
    for arch, kind, bundle, virt in cases:
        engine = Engine(host=bundle) if bundle else Engine()
        xml = _typical(arch, virt)
        os_key = "generic" if arch == "riscv64" else "rhel9.0"
        first = engine.solve(xml, os=os_key)
        if not first.feasible:
            rows.append((arch, kind, "infeasible", "", "", ""))
            continue
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            engine.solve(xml, os=os_key)
            times.append(time.perf_counter() - start)
        s = summary_ms(times)
        figures[f"{arch} {kind}"] = s
        rows.append(
            (arch, kind, s["median_ms"], s["p95_ms"], s["min_ms"], "met" if s["median_ms"] <= TARGET_MS else "MISSED")
        )
    shutil.rmtree(tmp, ignore_errors=True)
    print(table(("arch", "host", "median ms", "p95 ms", "min ms", f"target {TARGET_MS} ms"), rows))
    emit_json({"bench": "arches", "runs": args.runs, "figures": figures, "environment": environment()})


if __name__ == "__main__":
    main()
