"""PCI topology and NUMA placement: solve + topology for 64 PCI devices over 4 guest NUMA cells, and adding
one device to a laid-out 64-device domain (`device add`: only the new device is decided), against
re-solving the whole grown domain.

Targets (issue 5): 64 devices over 4 nodes, median <= 100 ms; adding one device <= 20 ms.

Run: .venv/bin/python benchmarks/bench_topology.py [--runs N]
"""

from __future__ import annotations

import argparse
import time

from _benchutil import emit_json, environment, summary_ms, table
from lxml import etree

from virtpolicy import Engine

VP = "http://virtpolicy.org/xmlns/domain/1.0"
TARGET_SOLVE_MS = 100.0
TARGET_ADD_MS = 20.0
NEW_NIC = "<interface type='user'><model type='virtio'/></interface>"


def sixty_four() -> bytes:
    """32 NICs and 32 disks, each pinned to one of 4 guest cells (required affinity)."""
    devices, wishes = [], []
    for i in range(1, 33):
        devices.append("<interface type='user'/>")
        wishes.append(f"<virtpolicy:device xpath='/domain/devices/interface[{i}]' node='{i % 4}' policy='required'/>")
    for i in range(1, 33):
        devices.append(f"<disk type='file' device='disk'><source file='/d{i}.qcow2'/></disk>")
        wishes.append(f"<virtpolicy:device xpath='/domain/devices/disk[{i}]' node='{(i + 1) % 4}' policy='required'/>")
    cells = "".join(f"<cell id='{c}' cpus='{2 * c}-{2 * c + 1}' memory='2048' unit='MiB'/>" for c in range(4))
    return (
        "<domain type='kvm'><name>big</name><memory unit='GiB'>8</memory><vcpu>8</vcpu>"
        f"<metadata><virtpolicy:numa xmlns:virtpolicy='{VP}'>{''.join(wishes)}</virtpolicy:numa></metadata>"
        f"<os><type arch='x86_64'>hvm</type></os><cpu><numa>{cells}</numa></cpu>"
        f"<devices>{''.join(devices)}</devices></domain>"
    ).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    engine = Engine()
    data = sixty_four()
    solve_times, out = [], b""
    for _ in range(args.runs):
        start = time.perf_counter()
        result = engine.solve(data, os="fedora37", source="big")
        assert result.feasible and result.xml_bytes is not None
        out = result.xml_bytes
        solve_times.append(time.perf_counter() - start)
    root = etree.fromstring(out)
    placed = len(root.findall("devices/*/address[@type='pci']"))
    expanders = len(root.findall("devices/controller[@model='pcie-expander-bus']"))
    add_times, address = [], ""
    for _ in range(args.runs):
        start = time.perf_counter()
        done = engine.add_device(out, NEW_NIC, os="fedora37", source="big")
        assert done.feasible and done.device_xml is not None
        address = etree.tostring(etree.fromstring(done.device_xml).find("address"), encoding="unicode")
        add_times.append(time.perf_counter() - start)
    root.find("devices").append(etree.fromstring(NEW_NIC))
    grown = etree.tostring(root)
    resolve_times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        assert engine.solve(grown, os="fedora37", source="big+1").feasible
        resolve_times.append(time.perf_counter() - start)
    solved, added, resolved = summary_ms(solve_times), summary_ms(add_times), summary_ms(resolve_times)
    print(
        table(
            ["measure", "median ms", "p95 ms", "target ms", "notes"],
            [
                [
                    "64 devices over 4 NUMA cells: solve + topology",
                    solved["median_ms"],
                    solved["p95_ms"],
                    TARGET_SOLVE_MS,
                    f"{placed} PCI addresses, {expanders} expander buses",
                ],
                [
                    "add one device to the laid-out domain (device add)",
                    added["median_ms"],
                    added["p95_ms"],
                    TARGET_ADD_MS,
                    "hot-plug slot " + " ".join(address.split()[3:5]),
                ],
                [
                    "re-solve the whole grown domain (solve)",
                    resolved["median_ms"],
                    resolved["p95_ms"],
                    "",
                    "every existing address kept",
                ],
            ],
        )
    )
    emit_json(
        {
            "bench": "topology",
            "solve_64": solved,
            "add_one": added,
            "resolve_grown": resolved,
            "pci_addresses": placed,
            "expanders": expanders,
            "targets": {"solve_ms": TARGET_SOLVE_MS, "add_ms": TARGET_ADD_MS},
            **environment(),
        }
    )


if __name__ == "__main__":
    main()
