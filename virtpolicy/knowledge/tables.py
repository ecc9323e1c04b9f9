"""Loaders for the rule tables in knowledge/data: structural facts, host enums, engine defaults.

Every row keeps its id and the file:line it was read from, so explanations can point at it.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

DATA = Path(__file__).parent / "data"


def _line_of(text: str, marker: str, key: str, value: str, start: int = 0) -> int:
    """The 1-based line where `key = "value"` occurs at or after `start` (for file:line provenance)."""
    match = re.compile(rf'^{re.escape(key)}\s*=\s*"{re.escape(value)}"', re.M).search(text, start)
    return text.count("\n", 0, match.start()) + 1 if match else 0


@dataclass(frozen=True)
class VirtioMode:
    model: str
    root: str  # pcie | pci | ccw | *
    mode: str  # modern | transitional
    rule: str


@dataclass(frozen=True)
class StructuralRule:
    id: str
    text: str
    citation: str
    where: str  # file:line
    forbid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    when: dict[str, tuple[str, ...]] = field(default_factory=dict)
    require: dict[str, tuple[str, ...]] = field(default_factory=dict)
    forbid_values: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()
    at_most: dict[str, object] = field(default_factory=dict)
    only_where_missing: str = ""  # applies only to device instances lacking this child element
    arches: tuple[str, ...] = ()  # applies only to guests of these architectures (none: every one)
    # A row about something only the app writes (a serial port's target type, an address type): the
    # elements this XPath (under /domain) selects, each shown as `shows` (an XPath string of the element),
    # exist only where `require` allows and, with `needs_arch`, only on guests of those architectures.
    written: str = ""
    shows: str = ""
    needs_arch: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostEnum:
    variable: str
    key: str
    not_a_device: tuple[str, ...] = ()
    value_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Preference:
    id: str
    variable: str
    order: tuple[str, ...]
    why: str
    where: str
    when: dict[str, tuple[str, ...]] = field(default_factory=dict)
    when_guest: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cite: str = ""  # where libvirt does the same, when it does


@dataclass(frozen=True)
class HypervFeature:
    feature: str
    domcaps: str
    attributes: dict[str, str] = field(default_factory=dict)
    timer: bool = False


def _tuple_map(d: dict[str, list[str]] | None) -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in (d or {}).items()}


@cache
def structural() -> tuple[tuple[VirtioMode, ...], dict[str, StructuralRule]]:
    path = DATA / "structural.toml"
    text = path.read_text()
    data = tomllib.loads(text)
    modes = tuple(VirtioMode(r["model"], r["root"], r["mode"], r["rule"]) for r in data["virtio_mode"])
    rules = {}
    for r in data["rule"]:
        rules[r["id"]] = StructuralRule(
            id=r["id"],
            text=r["text"],
            citation=r["citation"],
            where=f"{path.name}:{_line_of(text, '[[rule]]', 'id', r['id'])}",
            forbid=_tuple_map(r.get("forbid")),
            when=_tuple_map(r.get("when")),
            require=_tuple_map(r.get("require")),
            forbid_values=tuple(r.get("forbid_values", ())),
            variables=tuple(r.get("variables", ())),
            at_most=dict(r.get("at_most", {})),
            only_where_missing=r.get("only_where_missing", ""),
            arches=tuple(r.get("arches", ())),
            written=r.get("written", ""),
            shows=r.get("shows", ""),
            needs_arch=tuple(r.get("needs_arch", ())),
        )
    return modes, rules


@cache
def host_enums() -> tuple[HostEnum, ...]:
    data = tomllib.loads((DATA / "host-enums.toml").read_text())
    return tuple(
        HostEnum(r["variable"], r["key"], tuple(r.get("not_a_device", ())), dict(r.get("value_map", {})))
        for r in data["enum"]
    )


@cache
def engine_defaults() -> tuple[tuple[Preference, ...], tuple[HypervFeature, ...]]:
    path = DATA / "engine-defaults.toml"
    text = path.read_text()
    data = tomllib.loads(text)
    prefs = tuple(
        Preference(
            id=r["id"],
            variable=r["variable"],
            order=tuple(r["order"]),
            why=r["why"],
            where=f"{path.name}:{_line_of(text, '[[prefer]]', 'id', r['id'])}",
            when=_tuple_map(r.get("when")),
            when_guest=_tuple_map(r.get("when_guest")),
        )
        for r in data["prefer"]
    )
    hyperv = tuple(
        HypervFeature(r["feature"], r["domcaps"], dict(r.get("attributes", {})), r.get("timer", False))
        for r in data["hyperv"]
    )
    return prefs, hyperv


@cache
def placement_preferences() -> dict[str, Preference]:
    """engine-defaults.toml's [[placement_prefer]] rows by id: the preferences the placement source applies
    itself, after every [[prefer]] row (a device's slot follows from its model)."""
    path = DATA / "engine-defaults.toml"
    text = path.read_text()
    start = text.index("[[placement_prefer]]")  # ids are looked up from there: the first [[prefer]] rows come first
    return {
        r["id"]: Preference(
            id=r["id"],
            variable=r["variable"],
            order=tuple(r["order"]),
            why=r["why"],
            where=f"{path.name}:{_line_of(text, '[[placement_prefer]]', 'id', r['id'], start)}",
            cite=r.get("cite", ""),
        )
        for r in tomllib.loads(text).get("placement_prefer", [])
    }
