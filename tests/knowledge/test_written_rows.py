"""structural.toml's `written` rows: what only an app writes (a serial port's target type, an address type, the
ibmvscsi controller), which exists on some machines only (issue 14).

Each row is checked three ways here, without libvirt: its citation quotes the libvirt 9.0.0 source lines it
names; the engine refuses the app's element on a machine the row excludes with a minimal conflict whose
background is that row; and it keeps the element, unchanged, on a machine the row allows. That libvirt or
QEMU really refuses each excluded case, and really runs each allowed one, is test_conformance_arches.py's
(`WRITTEN_EXAMPLES` there names one of each per row).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from corpus import require_corpus
from lxml import etree
from written_examples import ELEMENTS, OS

from virtpolicy import Engine
from virtpolicy.knowledge.tables import structural

REPO = Path(__file__).resolve().parents[2]
HOSTS = REPO / "tests" / "data" / "hosts"
BUNDLES = {
    "x86_64": None,  # the engine's default host: x86_64 KVM
    "aarch64": HOSTS / "tcg-aarch64",
    "ppc64le": HOSTS / "tcg-ppc64le",
    "s390x": HOSTS / "tcg-s390x",
    "riscv64": HOSTS / "tcg-riscv64",
}
ROWS = structural()[1]
WRITTEN = {rule.id: rule for rule in ROWS.values() if rule.written}
_ENGINES: dict[str, Engine] = {}


def solve(arch: str, devices: str):  # type: ignore[no-untyped-def]
    if arch not in _ENGINES:
        bundle = BUNDLES[arch]
        _ENGINES[arch] = Engine(host=bundle) if bundle else Engine()
    xml = (
        f"<domain><name>w</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os><type arch='{arch}'>hvm</type></os><devices>{devices}</devices></domain>"
    )
    return _ENGINES[arch].solve(xml, os=OS[arch], complete=False)


def _canonical(element: etree._Element) -> bytes:
    """The element without the output's indentation."""
    copy = etree.fromstring(etree.tostring(element, with_tail=False), etree.XMLParser(remove_blank_text=True))
    return etree.tostring(copy, method="c14n")


def test_every_written_row_has_an_example() -> None:
    """Every `written` row, and the rows about a machine-specific value an app may write for a variable the
    engine decides (ibmvscsi for scsi.model)."""
    assert set(WRITTEN) <= set(ELEMENTS) <= set(ROWS)


@pytest.mark.parametrize("rule_id", sorted(ELEMENTS))
def test_the_citation_quotes_the_lines_it_names(rule_id: str) -> None:
    """Every `file.c:first-last` of the citation exists in libvirt 9.0.0, and each quoted message ('...' after
    a libvirt function's name) is in the lines cited just before it (QEMU's own words are quoted after 'QEMU' or
    a binary's name, and seen, not cited)."""
    cite = ROWS[rule_id].citation
    corpus = require_corpus()
    spans = re.findall(r"(src/[\w/]+\.c):(\d+)(?:-(\d+))?((?:[^;]|;(?! ))*)", cite)
    assert spans, cite
    for path, first, last, rest in spans:
        lines = (corpus / path).read_text().splitlines()[int(first) - 1 : int(last or first)]
        text = re.sub(r'"\s*\n\s*"', "", "\n".join(lines))  # C string literals continued over lines
        for quoted in re.findall(r"\b(?:qemu|vir)\w+: '(.+?)'(?= \(|$|;)", rest):
            assert quoted in text, f"{rule_id}: {path}:{first}-{last} does not say {quoted!r}"


@pytest.mark.parametrize("rule_id", sorted(ELEMENTS))
def test_the_element_is_refused_where_the_row_excludes_it(rule_id: str) -> None:
    element, refused, _ = ELEMENTS[rule_id]
    for arch in refused:
        result = solve(arch, element)
        assert not result.feasible, f"{rule_id} on {arch}: solved"
        background = {r.where.rpartition(" ")[0] or r.where for r in result.background}
        named = [r for r in result.background if r.kind == "structural" and rule_id in r.where + r.id]
        assert named, f"{rule_id} on {arch}: the conflict's background is {sorted(background)}"
        members = result.conflicts[0].members
        assert [m.kind for m in members] == ["app"], f"{rule_id} on {arch}: {[str(m) for m in members]}"


@pytest.mark.parametrize("rule_id", sorted(ELEMENTS))
def test_the_element_is_kept_as_written_where_the_row_allows_it(rule_id: str) -> None:
    element, _, allowed = ELEMENTS[rule_id]
    written = etree.fromstring(f"<devices>{element}</devices>")[0]
    for arch in allowed:
        result = solve(arch, element)
        assert result.feasible, f"{rule_id} on {arch}: {result.summary()}"
        out = etree.fromstring(result.xml.encode())
        same = [e for e in out.find("devices") if e.tag == written.tag and e.attrib == written.attrib]
        assert same, f"{rule_id} on {arch}: no <{written.tag}> as written in the output"
        for child in written:  # what the row is about (target, address) exactly as the app wrote it
            kept = same[0].find(child.tag)
            assert kept is not None, f"{rule_id} on {arch}: <{child.tag}> dropped"
            assert _canonical(kept) == _canonical(child), f"{rule_id} on {arch}: <{child.tag}> rewritten"


def test_the_rows_name_machine_families_the_engine_knows() -> None:
    machines = tomllib.loads((REPO / "virtpolicy" / "knowledge" / "data" / "machines.toml").read_text())["family"]
    for rule in WRITTEN.values():
        assert set(rule.require.get("machine", ())) <= set(machines), rule.id
