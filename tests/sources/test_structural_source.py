"""sources.structural alone: libvirt/QEMU structure as hard constraints citing structural.toml rows."""

from __future__ import annotations

from support import one_source, partial_domain

from virtpolicy.core.problem import AtMost, Source, Strength

DISK = "<disk type='file' device='disk'><source file='/i/{0}'/><target dev='hd{0}' bus='ide'/></disk>"
IDE = "".join(DISK.format(n) for n in "abcde")


def test_every_constraint_cites_a_structural_row(host, osdb) -> None:
    _, added = one_source(partial_domain("s", None, "pc", IDE), "structural", host, osdb)
    assert added
    for c in added:
        assert c.provenance.source is Source.STRUCTURAL and c.strength is Strength.HARD
        file = dict(c.provenance.data)["file"]
        assert file.endswith("structural.toml") and dict(c.provenance.data)["line"] > 0


def test_ide_units_are_a_capacity(host, osdb) -> None:
    _, added = one_source(partial_domain("s", None, "pc", IDE), "structural", host, osdb)
    capacities = [c for c in added if isinstance(c, AtMost)]
    assert capacities and all(len(c.variables) == 5 for c in capacities)
