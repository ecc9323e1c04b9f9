"""sources.app alone: the values the app's XML pins, each with the XPath that wrote it."""

from __future__ import annotations

from support import one_source, partial_domain

from virtpolicy.core.problem import Source

IDE_TARGET = "<disk type='file' device='disk'><source file='/i/a.img'/><target dev='hda'/></disk>"


def test_every_pin_names_its_xpath(host, osdb) -> None:
    _, added = one_source(partial_domain("a", None, "q35", IDE_TARGET), "app", host, osdb)
    assert added
    for c in added:
        assert c.provenance.source is Source.APP
        assert c.provenance.where.startswith("/domain"), c.provenance.where


def test_a_target_name_implies_its_bus(host, osdb) -> None:
    ctx, added = one_source(partial_domain("a", None, None, IDE_TARGET), "app", host, osdb)
    pin = [c for c in added if c.variables == ("disk[0].bus",)]
    assert pin and pin[0].provenance.where.endswith("/target/@dev")
    assert "ide" in pin[0].message


def test_the_machine_the_app_wrote(host, osdb) -> None:
    _, added = one_source(partial_domain("a", None, "pc-q35-7.2", ""), "app", host, osdb)
    machine = [c for c in added if c.variables == ("machine",)]
    assert machine and machine[0].provenance.where == "/domain/os/type/@machine"


def test_nothing_written_nothing_pinned(host, osdb) -> None:
    _, added = one_source(partial_domain("a", None, None, ""), "app", host, osdb)
    assert not [c for c in added if c.variables in (("machine",), ("firmware",), ("clock.offset",))]
