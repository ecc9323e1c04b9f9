"""The domain-wide solver variables and their values, read once from vocabulary.toml.

The builder declares exactly these, and the profile language accepts exactly these (with the catalog's
device variables and pci.toml's), so a profile cannot name a value the engine has never heard of, and
the two can no longer disagree.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from virtpolicy.knowledge.catalog import catalog
from virtpolicy.knowledge.machines import families
from virtpolicy.knowledge.pci import pci_variables
from virtpolicy.knowledge.tables import engine_defaults

DATA = Path(__file__).parent / "data" / "vocabulary.toml"


@dataclass(frozen=True)
class GlobalVariable:
    name: str
    label: str
    decides: tuple[str, ...]  # what the engine may choose
    accepts: tuple[str, ...]  # what an app or a profile may name (libvirt's schema)
    element: str  # "path/@attr" below /domain, or "" when it is not one attribute
    absent: str  # its value when the attribute is absent from a laid-out domain
    citation: str

    @property
    def path(self) -> str:
        return self.element.partition("/@")[0]

    @property
    def attribute(self) -> str:
        return self.element.partition("/@")[2]


@cache
def global_variables() -> dict[str, GlobalVariable]:
    rows = tomllib.loads(DATA.read_text())["variable"]
    return {
        r["name"]: GlobalVariable(
            name=r["name"],
            label=r["label"],
            decides=tuple(r["decides"]),
            accepts=tuple(r["accepts"]),
            element=r.get("element", ""),
            absent=r.get("absent", ""),
            citation=r["citation"],
        )
        for r in rows
    }


@cache
def profile_vocabulary() -> dict[str, tuple[str, ...]]:
    """Every solver variable a profile may name, with the values it may name."""
    _, hyperv = engine_defaults()
    variables = {name: var.accepts for name, var in global_variables().items()}
    variables["machine"] = tuple(f.name for f in families())
    for feature in hyperv:
        variables[f"hyperv.{feature.feature}"] = ("on", "off")
    for cls in catalog().classes.values():
        for var in cls.variables.values():
            variables[f"{cls.name}.{var.name}"] = var.values
    variables.update(pci_variables())
    return dict(sorted(variables.items(), key=lambda kv: _ORDER.get(kv[0], 99)))


_ORDER = {"domain.type": 0, "machine": 1, "firmware": 2, "clock.offset": 3, "cpu.mode": 4}
