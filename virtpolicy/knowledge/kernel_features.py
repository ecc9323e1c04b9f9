"""Host-kernel-dependent domain features (data/host-kernel-features.toml): what they are, how a host tells
whether it has them, which machine versions offer them, and what XML (if any) turns them off.

A host's status for a feature is "has", "lacks" or "unknown": a declaration (`kernel_features`) wins; else
the kernel release decides where the row names a first mainline release; else it is unknown, which each
row interprets (`unknown`): USO is assumed missing (EL9 and Ubuntu 22.04 GA kernels lack it), UFO present
(every current kernel has it).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from virtpolicy.errors import InputError

DATA = Path(__file__).parent / "data" / "host-kernel-features.toml"
STATUSES = ("has", "lacks", "unknown")
_UPSTREAM_MACHINE = re.compile(r"-(\d+)\.(\d+)$")  # pc-q35-8.2, pc-i440fx-9.0, virt-8.2; not pc-q35-rhel9.6.0


@dataclass(frozen=True)
class KernelFeature:
    id: str
    title: str
    qemu_properties: tuple[str, ...]
    kernel: tuple[int, ...] | None  # first mainline release whose tap has it
    unknown: str  # "has" | "lacks": what an unknown host is taken to do
    interface_types: frozenset[str]
    models: frozenset[str]
    on_from_machine: tuple[int, int] | None  # None: every machine version offers it
    off_up_to_machine: str  # "8.1": the newest version whose compat turns it off ("" = none)
    pin: str  # "machine" | "none"
    libvirt_xml: str
    libvirt: str
    detect: str
    citation: str
    see_also: tuple[str, ...]
    line: int  # where the row starts in the data file

    @property
    def where(self) -> str:
        return f"{DATA.name}:{self.line}"

    def status(self, kernel: str, declared: Mapping[str, bool]) -> str:
        """has | lacks | unknown for a host with this kernel release and these declarations."""
        if self.id in declared:
            return "has" if declared[self.id] else "lacks"
        release = kernel_version(kernel)
        if self.kernel is None or release is None:
            return "unknown"
        return "has" if release >= self.kernel else "lacks"

    def assumed_has(self, status: str) -> bool:
        """Whether a host with this status counts as having it when a plan needs every host to."""
        return status == "has" or (status == "unknown" and self.unknown == "has")

    def offered_by(self, machine: str) -> bool | None:
        """Whether QEMU offers it by default on this machine type: True, False, or None when the name is not
        an upstream versioned one (a downstream pc-q35-rhel9.6.0 follows its vendor's compat tables)."""
        if self.on_from_machine is None:
            return True
        version = machine_version(machine)
        if version is None:
            return None
        return version >= self.on_from_machine

    def uses(self, interface_type: str, model: str) -> bool:
        return interface_type in self.interface_types and model in self.models


def kernel_version(release: str) -> tuple[int, ...] | None:
    """The numeric mainline part of a kernel release: '5.14.0-427.13.1.el9_4.x86_64' -> (5, 14, 0)."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", release or "")
    if not match:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


def machine_version(machine: str) -> tuple[int, int] | None:
    match = _UPSTREAM_MACHINE.search(machine or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _version(text: str, where: str) -> tuple[int, ...] | None:
    if not text:
        return None
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        raise InputError(f"{where}: '{text}' is not a version like 6.2")
    return tuple(int(n) for n in text.split("."))


@cache
def kernel_features() -> tuple[KernelFeature, ...]:
    text = DATA.read_text()
    rows = []
    starts = [m.start() for m in re.finditer(r"^\[\[feature\]\]", text, re.M)]
    for row, start in zip(tomllib.loads(text)["feature"], starts, strict=True):
        line = text.count("\n", 0, start) + 1
        where = f"{DATA}:{line}"
        on_from = _version(row["on_from_machine"], where)
        unknown = row["unknown"]
        if unknown not in ("has", "lacks") or row["pin"] not in ("machine", "none"):
            raise InputError(f"{where}: unknown must be has|lacks and pin machine|none")
        rows.append(
            KernelFeature(
                id=row["id"],
                title=row["title"],
                qemu_properties=tuple(row["qemu_properties"]),
                kernel=_version(row["kernel"], where),
                unknown=unknown,
                interface_types=frozenset(row["interface_types"]),
                models=frozenset(row["models"]),
                on_from_machine=(on_from[0], on_from[1]) if on_from else None,
                off_up_to_machine=row["off_up_to_machine"],
                pin=row["pin"],
                libvirt_xml=row["libvirt_xml"],
                libvirt=row["libvirt"],
                detect=row["detect"],
                citation=row["citation"],
                see_also=tuple(row.get("see_also", ())),
                line=line,
            )
        )
    return tuple(rows)


def feature_ids() -> tuple[str, ...]:
    return tuple(f.id for f in kernel_features())


def statuses(kernel: str, declared: Mapping[str, bool]) -> dict[str, str]:
    """Every feature's status for one host."""
    return {f.id: f.status(kernel, declared) for f in kernel_features()}
