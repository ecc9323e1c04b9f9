"""When a domain is complete: the documented rule (data/completeness.toml) and the app's own say.

A complete domain's XML is its ABI. Adding a device, a feature or a timer to it changes the guest
(libvirt runs a domain without <features><acpi/> with acpi=off), so the engine only checks it; a partial
domain is one the engine completes. The distinction must be a rule an app can predict, not a heuristic
buried in the builder, hence one table of libvirt-written signals and an explicit override.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import VIRTPOLICY_NS, xpath_of

DATA = Path(__file__).parent / "data" / "completeness.toml"
COMPLETE_TAG = f"{{{VIRTPOLICY_NS}}}complete"


@dataclass(frozen=True)
class Signal:
    id: str
    xpath: str
    why: str
    citation: str


@dataclass(frozen=True)
class Completeness:
    """Whether the domain is complete, and the evidence (shown in reports and the decision record)."""

    complete: bool
    reason: str  # "signal <id>: <why> (<xpath>)", "metadata <xpath>", "--complete", or why it is partial
    signal: str = ""


@cache
def signals() -> tuple[Signal, ...]:
    rows = tomllib.loads(DATA.read_text())["signal"]
    return tuple(Signal(r["id"], r["xpath"], r["why"], r["citation"]) for r in rows)


@cache
def _compiled(xpath: str) -> etree.XPath:
    """A signal's XPath compiled once (only the table's rows reach here): every solve asks, partial ones
    through every signal."""
    return etree.XPath(xpath)


def _metadata_flag(root: etree._Element, source: str) -> Completeness | None:
    flags = root.findall(f"metadata/{COMPLETE_TAG}")
    if not flags:
        return None
    flag = flags[-1]
    value = flag.get("value", "yes")
    if value not in ("yes", "no"):
        raise InputError(f"{source}:{flag.sourceline}: {xpath_of(flag)}/@value='{value}': use 'yes' or 'no'")
    return Completeness(value == "yes", f"metadata {xpath_of(flag)} value='{value}'", "metadata")


def completeness(root: etree._Element, source: str, override: bool | None = None) -> Completeness:
    """The app's word first (CLI, then metadata), then the first libvirt-written signal present."""
    if override is not None:
        flag = "--complete" if override else "--partial"
        return Completeness(override, f"the caller said {flag}", flag)
    said = _metadata_flag(root, source)
    if said is not None:
        return said
    for signal in signals():
        found = _compiled(signal.xpath)(root)
        if found:
            return Completeness(True, f"{signal.why} ({xpath_of(found[0])})", signal.id)
    return Completeness(False, "no device address, root PCI controller or emulator: a partial domain")
