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
POLICIES = ("required", "preferred", "legacy", "socket")  # Nova's PCI NUMA affinity policies


@cache
def table() -> dict[str, Any]:
    return tomllib.loads(DATA.read_text())


def _address(text: str) -> tuple[int, int]:
    """A [fixed.*] address, "slot.function" with the slot in hex ("0x01.2")."""
    slot, _, function = text.partition(".")
    return int(slot, 16), int(function)


# --- limits ----------------------------------------------------------------------------------------
@cache
def pci_address_limits() -> dict[str, int]:
    """The highest value of each PCI address field (domain, bus, slot, function), from [limits]."""
    rows = table()["limits"]
    return {field: rows[field]["last"] for field in ("domain", "bus", "slot", "function")}


def bus_numbers() -> int:
    """The bus numbers of a PCI domain: a new expander's busNr counts down from this ([limits.bus-numbers])."""
    return int(table()["limits"]["bus-numbers"]["count"])


# --- the variables' vocabulary ------------------------------------------------------------------------
@cache
def slot_values() -> tuple[str, ...]:
    """Every `X.slot` value, in the order the search tries them ([variables] slot)."""
    return tuple(table()["variables"]["slot"])


@cache
def hotplug_port_values() -> tuple[str, ...]:
    """The `hotplug.ports` values ([variables] hotplug_ports)."""
    return tuple(table()["variables"]["hotplug_ports"])


def max_cells() -> int:
    """The guest NUMA cells the engine may decide on its own ([variables] max_cells)."""
    return int(table()["variables"]["max_cells"])


# --- buses ------------------------------------------------------------------------------------------
_TERM = re.compile(r"\s*(index|slot|function)\s*(?:\*\s*([0-9]+))?\s*")


def _terms(expr: str, model: str) -> tuple[tuple[str, int], ...]:
    """A [buses] `target` expression as (name, factor) terms; refused at load when it is not a sum of them."""
    terms = []
    for part in expr.split("+"):
        match = _TERM.fullmatch(part)
        if match is None:
            raise ValueError(f"{DATA}: [buses] {model} target '{expr}': a sum of index, slot, function (times N)")
        terms.append((match.group(1), int(match.group(2) or 1)))
    return tuple(terms)


@dataclass(frozen=True)
class BusRule:
    """One [buses] row: a PCI controller model's slot range, whether endpoints plug in, what hot-plugs in,
    the slot type a device on it has, the QEMU device libvirt names it and the <target> it fills in."""

    model: str
    first_slot: int
    last_slot: int
    endpoints: bool
    hotplug: str  # "pcie" | "pci" | "" (no hot-plug)
    slot_types: tuple[str, ...] = ("pci",)
    model_name: str = ""
    target: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # attribute -> (name, factor) terms

    def target_attributes(self, index: int, slot: int, function: int) -> dict[str, str]:
        """The <target> attributes libvirt fills in for a new controller of this model at (slot, function),
        written as libvirt's format table says ([target] format)."""
        values = {"index": index, "slot": slot, "function": function}
        formats = table()["target"]["format"]
        found = {}
        for attribute, terms in self.target:
            number = sum(values[name] * factor for name, factor in terms)
            found[attribute] = f"0x{number:02x}" if formats[attribute] == "hex" else str(number)
        return found


@cache
def bus_rules() -> dict[str, BusRule]:
    return {
        model: BusRule(
            model,
            row["slots"][0],
            row["slots"][1],
            row["endpoints"],
            row.get("hotplug", ""),
            tuple(row.get("slot_type", ("pci",))),
            row.get("model_name", ""),
            tuple((attr, _terms(expr, model)) for attr, expr in row.get("target", {}).items()),
        )
        for model, row in table()["buses"].items()
    }


def bus_rule(model: str) -> BusRule:
    """The row of a controller model; a model libvirt's table does not name is taken as a conventional
    bridge (pci-bridge's slots, endpoints and slot type, no hot-plug, no model name or target)."""
    found = bus_rules().get(model)
    if found is not None:
        return found
    bridge = bus_rules()["pci-bridge"]
    return BusRule(model, bridge.first_slot, bridge.last_slot, bridge.endpoints, "", bridge.slot_types)


def controller_families(model: str, arch: str, families: tuple[str, ...]) -> tuple[str, ...] | None:
    """The machine families (of `families`) on which an app's PCI controller of `model` can exist, or None
    when the table says nothing about the model."""
    row = table().get("controllers", {}).get(model)
    if row is None:
        return None
    if arch not in row.get("arches", [arch]):
        return ()
    return tuple(f for f in families if f in row["families"])


# --- bus 0 --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FixedLayout:
    """One [fixed.*] row: a family's bus-0 addresses. A family no row names has nothing fixed."""

    family: str
    video: tuple[int, int] | None = None  # (slot, function) of the primary video card
    reserved: frozenset[int] = frozenset()  # slots no new controller takes
    usb2_slots: tuple[int, ...] = ()  # the slots the ICH9 USB2 controller tries, in order
    piix3_usb: tuple[int, int] | None = None
    first_port_slot: int = 0  # the first bus-0 slot for a new controller (0: the bus's own first slot)
    cite: str = ""


@cache
def fixed_layout(family: str) -> FixedLayout:
    row = table()["fixed"].get(family)
    if row is None:
        return FixedLayout(family)
    return FixedLayout(
        family,
        _address(row["video"]) if "video" in row else None,
        frozenset(int(s, 16) for s in row.get("reserved", ())),
        tuple(int(s, 16) for s in row.get("ich9_usb", ())),
        _address(row["piix3_usb"]) if "piix3_usb" in row else None,
        int(row["first_port_slot"], 16) if "first_port_slot" in row else 0,
        row.get("cite", ""),
    )


@dataclass(frozen=True)
class Usb2Layout:
    """One [usb2.*] row: a USB2 controller's function and its companions' functions, in one bus-0 slot."""

    controller: str
    function: int
    companions: tuple[tuple[str, int], ...]  # (model, function), in the row's order
    cite: str


@cache
def usb2_layouts() -> dict[str, Usb2Layout]:
    return {
        model: Usb2Layout(model, row["function"], tuple(row["companions"].items()), row["cite"])
        for model, row in table().get("usb2", {}).items()
    }


# --- what a device takes ------------------------------------------------------------------------------
@cache
def takes_values() -> tuple[str, ...]:
    """What an [[addressing]] row may say a device takes (the [takes] rows)."""
    return tuple(table()["takes"])


@cache
def pci_roots() -> frozenset[str]:
    """The root bus kinds (machines.toml `root`) on which the engine lays out PCI slots: [takes]'s columns."""
    return frozenset(root for row in table()["takes"].values() for root in row)


def takes_slots(takes: str, root: str) -> tuple[str, ...]:
    """The slot types a device libvirt gives `takes` may have on a root bus of kind `root` (one of
    `pci_roots()`)."""
    return tuple(table()["takes"][takes][root])


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
    fixed = fixed_layout(family)
    taken = {fixed.video[0], *fixed.reserved} if fixed.video is not None else set(fixed.reserved)
    slots = [s for s in range(bus.first_slot, bus.last_slot + 1) if s not in taken]
    where = f"pci.toml:{_line_of('[capacity.pcie-root-ports]')}"
    return Capacity(len(slots) * row["functions_per_slot"], where, row["cite"])


def root_port_functions() -> int:
    """The pcie-root-ports one multifunction slot holds (libvirt aggregates them: one per function)."""
    return int(table()["capacity"]["pcie-root-ports"]["functions_per_slot"])


@dataclass(frozen=True)
class BridgeCost:
    """What conventional devices cost in bus numbers on a PCIe machine ([capacity.pci-bridges])."""

    slots: int  # devices behind one bridge
    buses: int  # bus numbers one bridge takes (its own and its root port's)
    cite: str


@cache
def bridge_cost() -> BridgeCost:
    row = table()["capacity"]["pci-bridges"]
    bridge = bus_rule(row["bridge"])
    return BridgeCost(bridge.last_slot - bridge.first_slot + 1, row["buses_per_bridge"], row["cite"])


def pci_variables() -> dict[str, tuple[str, ...]]:
    """Every PCI/NUMA variable a profile may name, with its values."""
    variables: dict[str, tuple[str, ...]] = {
        "numa.cells": tuple(str(n) for n in range(1, max_cells() + 1)),
        "hotplug.ports": hotplug_port_values(),
    }
    for key in table()["slots"]:
        cls = key.split(".")[0]
        variables[f"{cls}.slot"] = slot_values()
        variables[f"{cls}.node"] = tuple(str(n) for n in range(max_cells()))
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
        if row["takes"] not in takes_values():
            raise ValueError(
                f"{DATA}: [[addressing]] {row['element']}: takes='{row['takes']}' (one of {takes_values()})"
            )
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
