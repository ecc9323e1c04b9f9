"""PCI placement facts (data/pci.toml) and the vocabulary of the PCI/NUMA solver variables.

Kept in the models layer so that profiles (rules) can name `numa.cells`, `hotplug.ports`,
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
