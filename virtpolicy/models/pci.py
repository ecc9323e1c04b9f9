"""PCI placement facts (data/pci.toml) and the vocabulary of the PCI/NUMA solver variables.

Kept in the models layer so that profiles (rules) can name `numa.cells`, `hotplug.ports`,
`interface.slot` or `interface.node` without depending on the solver.
"""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "pci.toml"
SLOT_VALUES = ("pcie", "integrated", "pci", "none")  # libvirt's own order of preference
MAX_CELLS = 8
HOTPLUG_PORTS = ("1", "0", "2", "4", "8", "16", "32")
POLICIES = ("required", "preferred", "legacy", "socket")  # Nova's PCI NUMA affinity policies


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
