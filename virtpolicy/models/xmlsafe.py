"""One hardened XML parser for every input the engine reads.

Domain XML comes from management apps and may be hostile: no DTDs, no entity expansion, no network
access, no huge trees. Every parse error is turned into an InputError naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError

_PARSER_OPTIONS = dict(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_comments=False,
    remove_blank_text=True,
)

MAX_INPUT_BYTES = 16 * 1024 * 1024


def _parser() -> etree.XMLParser:
    return etree.XMLParser(**_PARSER_OPTIONS)


def parse_bytes(data: bytes, source: str) -> etree._ElementTree:
    """Parse untrusted XML; `source` names the input in error messages."""
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{source}: input is {len(data)} bytes; the limit is {MAX_INPUT_BYTES}")
    head = data[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in data.lower():
        line = data[: data.lower().find(b"<!")].count(b"\n") + 1
        raise InputError(f"{source}:{line}: DOCTYPE/ENTITY declarations are not accepted (entity expansion is refused)")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno or 0
        msg = (exc.msg or str(exc)).splitlines()[0]
        raise InputError(f"{source}:{line}: malformed XML: {msg}") from None
    tree = root.getroottree()
    # the byte scan above misses other encodings (UTF-16) and late declarations: ask the parser too
    info = tree.docinfo
    if info.doctype or info.internalDTD is not None or info.externalDTD is not None or info.system_url:
        raise InputError(f"{source}:1: DOCTYPE/ENTITY declarations are not accepted (entity expansion is refused)")
    for node in root.iter(etree.Entity):
        raise InputError(f"{source}:{node.sourceline or 1}: entity reference {node.text} is not accepted")
    return tree


def parse_file(path: Path) -> etree._ElementTree:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_bytes(data, str(path))


def expect_root(tree: etree._ElementTree, name: str, source: str) -> etree._Element:
    root = tree.getroot()
    if root.tag != name:
        raise InputError(f"{source}:{root.sourceline or 1}: root element is <{root.tag}>, expected <{name}>")
    return root
