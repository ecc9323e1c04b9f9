"""The XML of the devices the engine adds (templates.toml), made fresh for each use."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

from lxml import etree

DATA = Path(__file__).parent / "data" / "templates.toml"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=True)


@cache
def _templates() -> dict[str, dict]:
    return tomllib.loads(DATA.read_text())["template"]


def device_classes() -> tuple[str, ...]:
    """The device classes the engine can add."""
    return tuple(_templates())


def new_device(cls: str, values: dict[str, str]) -> list[etree._Element]:
    """The elements of a new device of class `cls`: the device first, then what follows it."""
    row = _templates()[cls]
    model = values.get("model", "")
    xml = row.get("by_model", {}).get(model) or row["xml"]
    quoted = {k: escape(v, {"'": "&apos;", '"': "&quot;"}) for k, v in values.items()}  # values, not markup
    root = etree.fromstring(f"<devices>{xml.format(**quoted)}</devices>", _PARSER)
    return list(root)
