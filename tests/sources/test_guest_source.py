"""sources.guest alone: what the guest OS has no driver for, hard when strict and soft when lenient."""

from __future__ import annotations

from support import one_source, partial_domain

from virtpolicy.core.problem import Source, Strength
from virtpolicy.sources.guest import GUEST_LENIENT_PRIORITY

DISK = "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/a.qcow2'/><target dev='vda'/></disk>"


def test_rhel5_has_no_modern_virtio_driver(host, osdb) -> None:
    _, added = one_source(partial_domain("g", None, None, DISK), "guest", host, osdb, "rhel5.11")
    assert added
    assert all(c.provenance.source is Source.GUEST and c.strength is Strength.HARD for c in added)
    modern = [c for c in added if "virtio 1.0" in c.message]
    assert modern, [c.message for c in added]
    assert dict(modern[0].provenance.data)["short_id"] == "rhel5.11"


def test_a_modern_guest_constrains_no_virtio_disk(host, osdb) -> None:
    _, added = one_source(partial_domain("g", None, None, DISK), "guest", host, osdb, "rhel9.0")
    assert not [c for c in added if "disk[0]" in " ".join(c.variables)]


def test_lenient_guest_support_is_soft_above_the_engine_defaults(host, osdb) -> None:
    xml = partial_domain("g", None, None, DISK)
    _, added = one_source(xml, "guest", host, osdb, "rhel5.11", guest_support="lenient")
    assert added
    assert all(c.strength is Strength.SOFT and c.priority == GUEST_LENIENT_PRIORITY for c in added)


def test_no_guest_named_no_guest_constraints(host, osdb) -> None:
    ctx, added = one_source(partial_domain("g", None, None, DISK), "guest", host, osdb, "generic")
    assert not ctx.guest.described or added == [] or all(c.provenance.source is Source.GUEST for c in added)
