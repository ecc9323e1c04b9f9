"""Every shipped profile alone, and every pair `profiles check` does not flag, solves on the embedded host for
a Linux and a Windows guest, and the result passes the real-libvirt checks: schema, define, start, and
every virtio device in a mode the guest drives."""

from __future__ import annotations

import itertools
import re
from functools import cache
from pathlib import Path

import pytest
from guest_driver_oracle import guest_can_drive, virtio_devices_needing_drivers
from libvirt_harness import LibvirtHarness
from lxml import etree
from support import partial_domain

from virtpolicy import Engine
from virtpolicy.profiles.library import available

pytestmark = pytest.mark.libvirt

GUESTS = {"linux": "fedora37", "windows": "win10"}
DEVICES = (
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/p.qcow2'/></disk><interface type='user'/>"
)
SHIPPED = sorted(available())


@cache
def _incompatible() -> frozenset[frozenset[str]]:
    report = Engine().check_profiles()
    assert not report.errors, report.errors
    return frozenset(frozenset((a, b)) for a, b, _ in report.incompatible)


COMBOS = [(p,) for p in SHIPPED] + list(itertools.combinations(SHIPPED, 2))


@pytest.mark.parametrize("guest_kind", sorted(GUESTS))
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c))
def test_profiles_solve_and_run(
    combo, guest_kind, osdb, host, domain_schema, libvirt: LibvirtHarness, tmp_path: Path
) -> None:
    if len(combo) == 2 and frozenset(combo) in _incompatible():
        pytest.skip(f"profiles check reports {combo[0]} + {combo[1]} as never combinable")
    guest = osdb.lookup(GUESTS[guest_kind])
    name = "vp-p-" + re.sub(r"[^a-z0-9]+", "-", "-".join(combo) + "-" + guest_kind)[:60]
    result = Engine(host, osinfo_db=osdb).solve(partial_domain(name, guest.id, None, DEVICES), profiles=combo)
    assert result.feasible, [str(m) for c in result.conflicts for m in c.members]
    xml = result.xml_bytes
    assert domain_schema.validate(etree.ElementTree(etree.fromstring(xml))), domain_schema.error_log
    started = libvirt.define_and_start(xml.decode(), tmp_path)
    undrivable = [
        d
        for d in virtio_devices_needing_drivers(started.live_xml)
        if not guest_can_drive(d, set(result.guest.device_ids))
    ]
    assert not undrivable, f"{guest.short_id} cannot drive {undrivable}; adaptations: {started.adaptations}"
