"""sources.host alone: what a host's capabilities and domcapabilities forbid, and where each fact is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostvariants import no_tpm, variant
from support import one_source, partial_domain

from virtpolicy.core.problem import Forbid, Source
from virtpolicy.inputs.host import EMBEDDED_BUNDLE, load_host_bundle

TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


def _tpm_facts(constraints: list) -> list[Forbid]:
    return [c for c in constraints if isinstance(c, Forbid) and c.variables[0].startswith("tpm.")]


def test_every_constraint_is_a_host_fact_naming_its_file(host, osdb) -> None:
    _, added = one_source(partial_domain("h", None, "q35", TPM), "host", host, osdb)
    assert added
    for c in added:
        assert c.provenance.source is Source.HOST, c.id
        assert c.id.startswith("host:"), c.id
        assert c.provenance.where, c.id


def test_a_host_without_swtpm_forbids_the_emulator_once_for_both_types(host, osdb, tmp_path: Path) -> None:
    """Lacking for kvm and for qemu, the fact is one constraint naming both domcapabilities files."""
    bare = load_host_bundle(variant(EMBEDDED_BUNDLE, tmp_path / "no-tpm", no_tpm))
    xml = partial_domain("h", None, "q35", TPM)
    _, on_real = one_source(xml, "host", host, osdb)
    _, on_bare = one_source(xml, "host", bare, osdb)
    assert not [c for c in _tpm_facts(on_real) if "emulator" in c.message]
    lacking = [c for c in _tpm_facts(on_bare) if "'emulator'" in c.message]
    assert lacking, [c.message for c in on_bare]
    files = dict(lacking[0].provenance.data)["files"]
    assert {Path(f).name for f in files} >= {"domcaps-x86_64-q35-kvm.xml", "domcaps-x86_64-q35-qemu.xml"}
    assert "domain.type" not in lacking[0].variables  # merged: not one constraint per domain type


@pytest.mark.parametrize("vcpus, expect", [(4, False), (5000, True)])
def test_vcpus_above_the_machine_maximum(host, osdb, vcpus: int, expect: bool) -> None:
    xml = partial_domain("h", None, "q35", "").replace("<vcpu>1</vcpu>", f"<vcpu>{vcpus}</vcpu>")
    _, added = one_source(xml, "host", host, osdb)
    assert any("vcpu-max" in c.id for c in added) is expect


def test_an_unknown_machine_version_is_a_host_fact(host, osdb) -> None:
    _, added = one_source(partial_domain("h", None, "pc-q35-99.0", ""), "host", host, osdb)
    named = [c for c in added if "machine-name" in c.id]
    assert named and "pc-q35-99.0" in named[0].message
