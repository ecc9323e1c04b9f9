"""One hardened XML parser for every input the engine reads.

Domain XML comes from management apps and may be hostile: no DTDs, no entity expansion, no network
access, no huge trees. Every parse error is turned into an InputError naming the file and line.

Every read is bounded too: at most MAX_INPUT_BYTES (16 MiB) from any file or stream (domains, device XML,
profiles, host bundles, osinfo files), so `virtpolicy solve /dev/zero` stops after 16 MiB instead of
reading gigabytes, and a FIFO nobody writes to is an empty input, not a hang.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

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
_TOO_BIG = "is larger than 16 MiB (the limit for any input virtpolicy reads)"


def read_stream(stream: BinaryIO, source: str) -> bytes:
    """At most MAX_INPUT_BYTES from an open stream (stdin); one byte more tells it is over-size."""
    try:
        data = stream.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{source}: input {_TOO_BIG}")
    return data


def read_file(path: Path) -> bytes:
    """A whole file, bounded: regular files, pipes and devices alike read at most MAX_INPUT_BYTES + 1.

    A FIFO is opened non-blocking (open() on a FIFO without a writer would wait forever) and then read
    blocking: with no writer the read ends at once, empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{path}: cannot read: Is a directory")
        os.set_blocking(fd, True)
        if stat.S_ISREG(mode) and os.fstat(fd).st_size > MAX_INPUT_BYTES:
            raise InputError(f"{path}: file {_TOO_BIG}")
        chunks, size = [], 0
        while size <= MAX_INPUT_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_INPUT_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > MAX_INPUT_BYTES:
        raise InputError(f"{path}: input {_TOO_BIG}")
    return b"".join(chunks)


def _parser() -> etree.XMLParser:
    return etree.XMLParser(**_PARSER_OPTIONS)


def parse_bytes(data: bytes, source: str) -> etree._ElementTree:
    """Parse untrusted XML; `source` names the input in error messages."""
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{source}: input is {len(data)} bytes, larger than 16 MiB (the limit is {MAX_INPUT_BYTES})")
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
    """A file's XML, read bounded (read_file) and parsed hardened (parse_bytes)."""
    return parse_bytes(read_file(path), str(path))


def expect_root(tree: etree._ElementTree, name: str, source: str) -> etree._Element:
    root = tree.getroot()
    if root.tag != name:
        raise InputError(f"{source}:{root.sourceline or 1}: root element is <{root.tag}>, expected <{name}>")
    return root
