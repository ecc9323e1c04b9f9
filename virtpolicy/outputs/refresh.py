"""`solve --refresh`: re-decide what earlier solves decided, keep what the app wrote, show the difference.

An existing domain keeps its ABI by default: every value in its XML is explicit, so re-solving changes
nothing even when a shipped profile changed. --refresh removes the values the engine's record says the
engine or a profile decided, solves again, and prints a unified diff with the new reasons.
"""

from __future__ import annotations

import copy
import difflib

from lxml import etree

from virtpolicy.inputs.domain import Domain
from virtpolicy.knowledge.catalog import catalog


def forget_engine_decisions(domain: Domain) -> Domain:
    """A copy of the domain without the device-model values earlier solves chose (not the app's)."""
    previous = domain.previous_decisions()
    tree = copy.deepcopy(domain.tree)
    fresh = Domain(tree, domain.source)
    decided = {name for name, (_, reason) in previous.items() if not reason.startswith("app:")}
    for cls in catalog().classes.values():
        for index, element in enumerate(fresh.devices(cls.element)):
            prefix = cls.name if cls.singleton else f"{cls.name}[{index}]"
            for var in cls.variables.values():
                if f"{prefix}.{var.name}" not in decided:
                    continue
                path, _, attr = var.xml.rpartition("@")
                path = path.rstrip("/")
                if path.startswith(".."):
                    continue
                target = element.find(path) if path else element
                if target is not None and attr in target.attrib:
                    del target.attrib[attr]
    for name, path, attr in (
        ("machine", "os/type", "machine"),
        ("clock.offset", "clock", "offset"),
        ("cpu.mode", "cpu", "mode"),
    ):
        el = tree.getroot().find(path)
        if name in decided and el is not None and attr in el.attrib:
            del el.attrib[attr]
    return fresh


def diff(before: Domain, after_xml: bytes) -> str:
    tree = copy.deepcopy(before.tree)
    etree.indent(tree, space="  ")
    old = etree.tostring(tree, encoding="unicode").splitlines()
    new = after_xml.decode().splitlines()
    strip = [line for line in old if "virtpolicy:decision" not in line]
    new_strip = [line for line in new if "virtpolicy:decision" not in line]
    return "\n".join(difflib.unified_diff(strip, new_strip, "before", "after --refresh", lineterm=""))
