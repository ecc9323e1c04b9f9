"""Machine-type families (q35, pc, virt, ...) and how host machine names map onto them (data/machines.toml)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

DATA = Path(__file__).parent / "data" / "machines.toml"


@dataclass(frozen=True)
class MachineFamily:
    name: str
    arches: tuple[str, ...]
    patterns: tuple[re.Pattern[str], ...]
    root: str  # pcie | pci | ccw
    guest_ids: tuple[str, ...] = ()
    guest_name: str = ""
    topology: bool = False  # the engine lays out this family's PCI topology
    cite: str = ""

    def matches(self, machine: str) -> bool:
        return any(p.match(machine) for p in self.patterns)


@cache
def families() -> tuple[MachineFamily, ...]:
    data = tomllib.loads(DATA.read_text())
    return tuple(
        MachineFamily(
            name=name,
            arches=tuple(row["arches"]),
            patterns=tuple(re.compile(p) for p in row["patterns"]),
            root=row["root"],
            guest_ids=tuple(row.get("guest_ids", ())),
            guest_name=row.get("guest_name", ""),
            topology=row.get("topology", False),
            cite=row.get("cite", ""),
        )
        for name, row in data["family"].items()
    )


@lru_cache(maxsize=512)  # bounded: machine names come from app and host XML
def family_of(machine: str) -> MachineFamily | None:
    """The family whose patterns match a machine name (the table is fixed, so the answer is kept: every
    build and render asks it tens of times, each a scan of regular expressions)."""
    for fam in families():
        if fam.matches(machine):
            return fam
    return None


@cache
def _by_name() -> dict[str, MachineFamily]:
    return {fam.name: fam for fam in reversed(families())}  # reversed: the first of a name wins, as a scan


def lays_out_topology(family: str) -> bool:
    """Does the engine place this family's PCI devices itself (machines.toml `topology`)?"""
    found = _by_name().get(family)
    return found is not None and found.topology


def root_of(family: str) -> str:
    """A family's root bus kind (pcie | pci | ccw); a machine no family names is taken as conventional PCI."""
    found = _by_name().get(family)
    return found.root if found is not None else "pci"


def family_named(name: str) -> MachineFamily:
    try:
        return _by_name()[name]
    except KeyError:
        raise KeyError(name) from None
