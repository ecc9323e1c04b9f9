"""libvirt's CPU model definitions (/usr/share/libvirt/cpu_map, Debian libvirt0): model -> features.

Planning one CPU for many hosts needs to know what each named model implies: the baseline of several
host-model CPUs is the richest model every host can run, plus the features all of them add on top of it.
libvirt computes the same from these files (src/cpu/cpu_x86.c x86ModelFind / virCPUx86Baseline); the
files are read here rather than copied, so the answer follows the installed libvirt.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from virtpolicy.errors import HostError
from virtpolicy.inputs.xmlsafe import parse_file

CPU_MAP = Path("/usr/share/libvirt/cpu_map")


@dataclass(frozen=True)
class CpuModel:
    name: str
    vendor: str
    features: frozenset[str]


@cache
def cpu_models(arch_prefix: str = "x86", directory: Path = CPU_MAP) -> dict[str, CpuModel]:
    """Every model of one architecture family, with its features resolved through `<model name=...>`."""
    if not directory.is_dir():
        raise HostError(f"{directory}: libvirt's CPU map is not installed (Debian package libvirt0)")
    raw: dict[str, tuple[str, str | None, set[str]]] = {}
    for file in sorted(directory.glob(f"{arch_prefix}_*.xml")):
        root = parse_file(file).getroot()
        for model in root.iterfind("model"):
            parent = model.find("model")
            vendor = model.find("vendor")
            raw[model.get("name", "")] = (
                vendor.get("name", "") if vendor is not None else "",
                parent.get("name") if parent is not None else None,
                {f.get("name", "") for f in model.iterfind("feature")},
            )

    def resolve(name: str, seen: tuple[str, ...] = ()) -> frozenset[str]:
        vendor, parent, features = raw[name]
        inherited = resolve(parent, seen + (name,)) if parent in raw and parent not in seen else frozenset()
        return frozenset(features) | inherited

    return {name: CpuModel(name, raw[name][0], resolve(name)) for name in raw}
