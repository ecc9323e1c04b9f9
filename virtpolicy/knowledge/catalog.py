"""The device catalog (data/catalog.toml): device classes, their variables, values and guest identities."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class VirtioFamily:
    key: str
    name: str
    legacy: str | None
    modern: str


@dataclass(frozen=True)
class GuestDevice:
    """What a guest must drive for one value of one variable."""

    virtio: str | None = None  # virtio family key
    mode_from: str | None = None  # variable (of the same instance) whose virtio model sets the mode
    fixed_mode: str | None = None  # 'modern' for modern-only devices, 'virtio' for the scsi controller
    ids: tuple[str, ...] = ()
    name: str = ""
    assumed: str = ""
    supplement: str = ""
    not_on: tuple[str, ...] = ()  # architectures where `assumed` does not hold: there the OS has no driver


@dataclass(frozen=True)
class ClassVariable:
    name: str
    values: tuple[str, ...]
    xml: str
    guest: dict[str, GuestDevice] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceClass:
    name: str
    element: str  # XPath under /domain/devices
    label: str
    singleton: bool
    explicit_none: bool
    explicit_none_with: str  # a class whose presence makes libvirt add this one (then "none" is written)
    variables: dict[str, ClassVariable]
    auxiliary_values: frozenset[str] = frozenset()  # guest severity: a missing driver makes these inert

    def auxiliary(self, value: str) -> bool:
        """Without a driver the device is inert, not unrunnable (balloon, RNG, agent, QXL's VGA fallback)."""
        return value in self.auxiliary_values


@dataclass(frozen=True)
class Supplement:
    device: str
    name: str
    short_ids: tuple[re.Pattern[str], ...]
    why: str


@dataclass(frozen=True)
class Provides:
    """A driver osinfo-db does not list but the OS ships (the supplement's `[[has]]` rows)."""

    device_ids: tuple[str, ...]
    name: str
    short_ids: tuple[re.Pattern[str], ...]
    why: str

    def matches(self, short_id: str) -> bool:
        return any(p.match(short_id) for p in self.short_ids)


@dataclass(frozen=True)
class Catalog:
    virtio: dict[str, VirtioFamily]
    classes: dict[str, DeviceClass]
    supplements: tuple[Supplement, ...]
    target_prefix: dict[str, str]  # bus -> disk target name prefix
    provides: tuple[Provides, ...] = ()

    def buses_for_target(self, dev: str) -> list[str]:
        """The buses libvirt would infer from a target name (vdb -> virtio; sdb -> sata/scsi/usb)."""
        return [bus for bus, prefix in self.target_prefix.items() if dev.startswith(prefix)]

    def lacks(self, short_id: str, device: str) -> Supplement | None:
        """A fact osinfo does not record: this OS lacks `device`."""
        for s in self.supplements:
            if s.device == device and any(p.match(short_id) for p in s.short_ids):
                return s
        return None


@cache
def catalog() -> Catalog:
    data = tomllib.loads((DATA / "catalog.toml").read_text())
    virtio = {
        key: VirtioFamily(key, row["name"], row.get("legacy"), row["modern"]) for key, row in data["virtio"].items()
    }
    classes = {}
    for cname, row in data["class"].items():
        variables = {}
        for vname, vrow in row["variables"].items():
            guest = {
                value: GuestDevice(
                    virtio=g.get("virtio"),
                    mode_from=g.get("mode_from"),
                    fixed_mode=g.get("fixed_mode"),
                    ids=tuple(g.get("ids", ())),
                    name=g.get("name", ""),
                    assumed=g.get("assumed", ""),
                    supplement=g.get("supplement", ""),
                    not_on=tuple(g.get("not_on", ())),
                )
                for value, g in vrow.get("guest", {}).items()
            }
            variables[vname] = ClassVariable(vname, tuple(vrow["values"]), vrow["xml"], guest)
        classes[cname] = DeviceClass(
            name=cname,
            element=row["element"],
            label=row["label"],
            singleton=row.get("singleton", False),
            explicit_none=row.get("explicit_none", False),
            explicit_none_with=row.get("explicit_none_with", ""),
            variables=variables,
            auxiliary_values=frozenset(row.get("auxiliary", ())),
        )
    sup = tomllib.loads((DATA / "osinfo-supplement.toml").read_text())
    supplements = tuple(
        Supplement(r["device"], r["name"], tuple(re.compile(p) for p in r["short_ids"]), r["why"])
        for r in sup.get("lacks", ())
    )
    provides = tuple(
        Provides(tuple(r["device_ids"]), r["name"], tuple(re.compile(p) for p in r["short_ids"]), r["why"])
        for r in sup.get("has", ())
    )
    return Catalog(virtio, classes, supplements, dict(data["target_prefix"]), provides)


@cache
def driver_packs() -> dict[str, tuple[str, ...]]:
    """The driver packs a profile may declare (osinfo-supplement.toml [[pack]]): each pack's osinfo device ids,
    a row's own `device_ids` or its catalog [virtio.*] family's legacy and modern ids, in file order."""
    families = catalog().virtio
    sup = tomllib.loads((DATA / "osinfo-supplement.toml").read_text())
    packs: dict[str, list[str]] = {}
    for row in sup.get("pack", ()):
        if "virtio" in row:
            family = families[row["virtio"]]
            ids = [i for i in (family.legacy, family.modern) if i]
        else:
            ids = list(row["device_ids"])
        packs.setdefault(row["name"], []).extend(ids)
    return {name: tuple(ids) for name, ids in packs.items()}
