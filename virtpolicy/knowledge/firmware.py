"""Which firmware the app's <os> already asks for, read by the rows of firmware.toml in order."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from lxml import etree

DATA = Path(__file__).parent / "data" / "firmware.toml"


@dataclass(frozen=True)
class FirmwareInference:
    id: str
    xpath: etree.XPath
    value: str  # "@attr", "text()" or "." (the matched attribute)
    points_at: str  # "value": the provenance names the attribute; "element": the element
    default: str
    by_value: dict[str, tuple[str, ...]]
    firmware: tuple[str, ...]
    cite: str

    def allowed(self, value: str) -> list[str]:
        return list(self.by_value.get(value, self.firmware)) or [value]

    def read(self, root: etree._Element) -> tuple[etree._Element, str, str] | None:
        """(element, value, the XPath step of the value or "") of the first match below <domain>."""
        found = self.xpath(root)
        if not found:
            return None
        node = found[0]
        if self.value == ".":  # an attribute: lxml gives its value with its element
            return node.getparent(), str(node), f"/@{node.attrname}"
        if self.value == "text()":
            return node, node.text or self.default, ""
        attr = self.value.removeprefix("@")
        return node, node.get(attr, self.default), f"/@{attr}"


@cache
def firmware_inferences() -> tuple[FirmwareInference, ...]:
    rows = tomllib.loads(DATA.read_text())["infer"]
    return tuple(
        FirmwareInference(
            r["id"],
            etree.XPath(r["xpath"]),
            r["value"],
            r.get("points_at", "element"),
            r.get("default", ""),
            {k: tuple(v) for k, v in r.get("by_value", {}).items()},
            tuple(r["firmware"]),
            r["cite"],
        )
        for r in rows
    )
