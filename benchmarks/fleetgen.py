"""Generate large fleets from real capability data, for the planning benchmarks.

Each host class starts from one of libvirt's own QEMU test hosts (tests/domaincapsdata 4.2.0 to 8.0.0,
assembled by tests/corpus.py; needs scripts/fetch-libvirt-corpus.sh) and varies what differs between real
hosts: firmware without the secure-boot loader, no TPM emulator, fewer Hyper-V enlightenments, and the
NUMA layout (1, 2 or 4 host cells over the same CPUs and memory). Hosts are then spread over the classes
with counts in an inventory TOML, as an operator would write it.

    .venv/bin/python benchmarks/fleetgen.py DIR --hosts 1000 [--seed S]   # writes DIR/fleet.toml
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from lxml import etree

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import corpus  # noqa: E402  (test-support modules: libvirt's QEMU test hosts, and their real-world variants)
import hostvariants  # noqa: E402

VERSIONS = ("4.2.0", "5.2.0", "6.0.0", "6.2.0", "7.0.0", "7.1.0", "7.2.0", "8.0.0")


def _numa(cells: int) -> Callable[[Path], None]:
    def regroup(bundle: Path) -> None:
        caps = etree.parse(str(bundle / "capabilities.xml"))
        old = caps.find("host/topology/cells")
        cpus = [c for cell in old.findall("cell") for c in cell.findall("cpus/cpu")]
        memory = sum(int(cell.findtext("memory") or 0) for cell in old.findall("cell"))
        new = etree.Element("cells", num=str(cells))
        per = len(cpus) // cells
        for i in range(cells):
            cell = etree.SubElement(new, "cell", id=str(i))
            etree.SubElement(cell, "memory", unit="KiB").text = str(memory // cells)
            group = etree.SubElement(cell, "cpus", num=str(per))
            for cpu in cpus[i * per : (i + 1) * per]:
                cpu.set("socket_id", str(i))
                group.append(cpu)
        old.getparent().replace(old, new)
        caps.write(str(bundle / "capabilities.xml"))

    return regroup


VARIANTS: dict[str, Callable[[Path], object]] = {
    "stock": lambda b: None,
    "no-secboot": lambda b: hostvariants.edit_domcaps(b, hostvariants.no_secure_boot),
    "no-tpm": lambda b: hostvariants.edit_domcaps(b, hostvariants.no_tpm),
    "few-hyperv": lambda b: hostvariants.edit_domcaps(b, hostvariants.fewer_hyperv),
}
LAYOUTS = {"numa1": _numa(1), "numa2": _numa(2), "numa4": _numa(4)}


def generate(directory: Path, hosts: int, seed: int = 7) -> Path:
    """Write bundles (one per class) and DIR/fleet.toml naming `hosts` hosts; returns the inventory."""
    if corpus.corpus_dir() is None:
        raise SystemExit("fleetgen: the libvirt corpus is needed: bash scripts/fetch-libvirt-corpus.sh")
    directory.mkdir(parents=True, exist_ok=True)
    bases = directory / "_bases"
    classes = []
    for version, variant, layout in itertools.product(VERSIONS, VARIANTS, LAYOUTS):
        name = f"qemu{version}-{variant}-{layout}"
        bundle = directory / name
        if not bundle.exists():
            base = bases / f"libvirt-tests-qemu{version}-x86_64"
            if not base.exists():
                corpus.corpus_host_bundle(bases, version)
            shutil.copytree(base, bundle)
            VARIANTS[variant](bundle)
            LAYOUTS[layout](bundle)
        classes.append(name)
    rng = random.Random(seed)
    weights = [rng.randint(1, 10) for _ in classes]
    counts = [max(1, round(hosts * w / sum(weights))) for w in weights]
    counts[-1] += hosts - sum(counts)  # exactly `hosts` in total
    lines = []
    for name, count in zip(classes, counts, strict=True):
        if count < 1:
            continue
        rack = f"r{rng.randint(1, 20):02d}"
        lines.append(f'[[host]]\nname = "{name}"\nbundle = "{name}"\ncount = {count}\nlabels = {{ rack = "{rack}" }}\n')
    inventory = directory / "fleet.toml"
    inventory.write_text("\n".join(lines))
    return inventory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(generate(args.directory, args.hosts, args.seed))


if __name__ == "__main__":
    main()
