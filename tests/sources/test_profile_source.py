"""sources.profiles alone: a profile's rules become constraints naming the profile file and line."""

from __future__ import annotations

from support import one_source, partial_domain

from virtpolicy.core.problem import Source, Strength


def test_rules_cite_their_file_and_line(host, osdb) -> None:
    _, added = one_source(partial_domain("r", None, None, ""), "profiles", host, osdb, "rhel9.0", ("modern-q35",))
    assert added
    for c in added:
        assert c.provenance.source is Source.PROFILE
        assert ".toml:" in c.provenance.where, c.provenance.where


def test_hard_rules_are_hard(host, osdb) -> None:
    _, added = one_source(partial_domain("r", None, None, ""), "profiles", host, osdb, "win11", ("windows-11",))
    assert any(c.strength is Strength.HARD for c in added)


def test_declared_driver_packs_reach_the_guest(host, osdb) -> None:
    """The windows profile declares virtio-win: after the declare phase the guest drives virtio devices."""
    ns = "http://virtpolicy.org/xmlns/domain/1.0"
    declared = f"<metadata><virtpolicy:guest xmlns:virtpolicy='{ns}' drivers='virtio-win'/></metadata>"
    xml = partial_domain("r", None, None, "").replace("<os>", declared + "<os>")
    ctx, _ = one_source(xml, "profiles", host, osdb, "win10", ("windows",))
    _, without = one_source(partial_domain("r", None, None, ""), "profiles", host, osdb, "win10", ("windows",))
    assert "drivers declared by" in ctx.guest.source
    assert "http://pcisig.com/pci/1af4/1041" in ctx.guest.device_ids
