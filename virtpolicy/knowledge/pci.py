"""PCI placement facts (data/pci.toml) and the vocabulary of the PCI/NUMA solver variables.

Kept in the knowledge layer so that profiles can name `numa.cells`, `hotplug.ports`,
`interface.slot` or `interface.node` without depending on the solver.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lxml import etree

DATA = Path(__file__).parent / "data" / "pci.toml"
SLOT_VALUES = ("pcie", "integrated", "pci", "none")  # libvirt's own order of preference
MAX_CELLS = 8
HOTPLUG_PORTS = ("1", "0", "2", "4", "8", "16", "32")
POLICIES = ("required", "preferred", "legacy", "socket")  # Nova's PCI NUMA affinity policies
TAKES = ("pcie", "pci", "virtio", "host", "bus", "none")  # what an [[addressing]] row says a device takes


@cache
def table() -> dict[str, Any]:
    return tomllib.loads(DATA.read_text())


@dataclass(frozen=True)
class BusRule:
    """One [buses] row: a PCI controller model's slot range, whether endpoints plug in, what hot-plugs in."""

    model: str
    first_slot: int
    last_slot: int
    endpoints: bool
    hotplug: str  # "pcie" | "pci" | "" (no hot-plug)


@cache
def bus_rules() -> dict[str, BusRule]:
    return {
        model: BusRule(model, row["slots"][0], row["slots"][1], row["endpoints"], row.get("hotplug", ""))
        for model, row in table()["buses"].items()
    }


def bus_rule(model: str) -> BusRule:
    """The row of a controller model; a model libvirt's table does not name is taken as a conventional
    bridge (slots 1-31, endpoints, no hot-plug)."""
    return bus_rules().get(model) or BusRule(model, 1, 31, True, "")


def controller_families(model: str, arch: str, families: tuple[str, ...]) -> tuple[str, ...] | None:
    """The machine families (of `families`) on which an app's PCI controller of `model` can exist, or None
    when the table says nothing about the model."""
    row = table().get("controllers", {}).get(model)
    if row is None:
        return None
    if arch not in row.get("arches", [arch]):
        return ()
    return tuple(f for f in families if f in row["families"])


@dataclass(frozen=True)
class Capacity:
    limit: int
    where: str  # pci.toml:line
    cite: str


def _line_of(marker: str) -> int:
    lines = DATA.read_text().splitlines()
    return next((n for n, line in enumerate(lines, 1) if line.strip() == marker), 0)


@cache
def root_port_capacity(family: str = "q35") -> Capacity:
    """The pcie-root-ports pcie-root holds on a family, derived from the bus's slot range and the slots
    the family keeps fixed (q35: 216; virt, with no chipset devices on bus 0: 248)."""
    row = table()["capacity"]["pcie-root-ports"]
    if family not in row["families"]:
        raise KeyError(family)
    bus = bus_rule(row["bus"])
    fixed = table()["fixed"][family]
    taken = {int(s, 16) for s in (fixed.get("video"), *fixed["reserved"]) if s}
    slots = [s for s in range(bus.first_slot, bus.last_slot + 1) if s not in taken]
    where = f"pci.toml:{_line_of('[capacity.pcie-root-ports]')}"
    return Capacity(len(slots) * row["functions_per_slot"], where, row["cite"])


def first_port_slot(family: str) -> int:
    """The first bus-0 slot the engine gives a new controller, after the chipset's fixed devices."""
    return int(table()["fixed"].get(family, {}).get("first_port_slot", "0x02"), 16)


def pci_variables() -> dict[str, tuple[str, ...]]:
    """Every PCI/NUMA variable a profile may name, with its values."""
    variables: dict[str, tuple[str, ...]] = {
        "numa.cells": tuple(str(n) for n in range(1, MAX_CELLS + 1)),
        "hotplug.ports": HOTPLUG_PORTS,
    }
    for key in table()["slots"]:
        cls = key.split(".")[0]
        variables[f"{cls}.slot"] = SLOT_VALUES
        variables[f"{cls}.node"] = tuple(str(n) for n in range(MAX_CELLS))
    return variables


@dataclass(frozen=True)
class Addressing:
    """One [[addressing]] row: what libvirt gives a kind of device (a PCI slot of some type, or never one)."""

    element: str
    takes: str
    cite: str
    fixed: str = ""
    test: etree.XPath | None = None

    def matches(self, element: etree._Element) -> bool:
        return bool(self.test(element)) if self.test is not None else False


@cache
def addressing_rows() -> tuple[Addressing, ...]:
    """The rows in file order, each with its XPath compiled once (the first match wins)."""
    rows = []
    for row in table().get("addressing", []):
        if row["takes"] not in TAKES:
            raise ValueError(f"{DATA}: [[addressing]] {row['element']}: takes='{row['takes']}' (one of {TAKES})")
        test = etree.XPath(" | ".join(f"self::{part.strip()}" for part in row["element"].split(" | ")))
        rows.append(Addressing(row["element"], row["takes"], row["cite"], row.get("fixed", ""), test))
    return tuple(rows)


@cache
def _rows_by_tag() -> tuple[dict[str, tuple[Addressing, ...]], tuple[Addressing, ...]]:
    """The rows that can match an element of each tag (file order kept), and those for any other tag.

    A row's XPath is `self::tag[...]` (or `self::*[...]`, or a union of such), so a row naming other tags
    can never match: `addressing` runs once per device per build, and testing only these rows spares it
    most of the ~60 XPath evaluations.
    """
    rows = addressing_rows()
    tags_of: list[set[str] | None] = []  # None: the row may match any tag
    for row in rows:
        names = {re.split(r"[\[\s]", part.strip(), maxsplit=1)[0] for part in row.element.split(" | ")}
        plain = all(re.fullmatch(r"[A-Za-z_][\w.-]*", n) for n in names)  # else: a form this reading does not know
        tags_of.append(names if plain else None)
    named = {t for tags in tags_of if tags is not None for t in tags}
    by_tag = {
        tag: tuple(r for r, tags in zip(rows, tags_of, strict=True) if tags is None or tag in tags) for tag in named
    }
    return by_tag, tuple(r for r, tags in zip(rows, tags_of, strict=True) if tags is None)


def addressing(element: etree._Element) -> Addressing | None:
    """The row for a device element of <devices>, or None for a kind libvirt's tables (and ours) do not
    name: such a device is carried through untouched, neither placed nor moved."""
    tag = element.tag
    if not isinstance(tag, str):
        return None
    by_tag, any_tag = _rows_by_tag()
    return next((row for row in by_tag.get(tag, any_tag) if row.matches(element)), None)


def never_pci(element: etree._Element) -> Addressing | None:
    """The row saying this device never takes a PCI address (so it gets none and uses no bus), if one does."""
    row = addressing(element)
    return row if row is not None and row.takes == "none" else None
