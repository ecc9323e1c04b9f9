"""`device add`: one new device into a laid-out domain, deciding only that device, into a slot the running
domain already has; and real libvirt hot-plugging it at that address."""

from __future__ import annotations

from pathlib import Path

import pytest
from libvirt_harness import LibvirtHarness
from lxml import etree
from support import run
from topology_helpers import FEDORA, controllers, disks, domain, nics, node_of

from virtpolicy.core.solve import Conflict
from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import Domain
from virtpolicy.outputs.hotplug import Hotplugged, add_device

NIC = "<interface type='user'><model type='virtio'/></interface>"


def laid_out(host, osdb, xml: str) -> bytes:  # type: ignore[no-untyped-def]
    out = run(xml, host, osdb)
    assert out.xml is not None, out.describe()
    return out.xml


def add(host, osdb, xml: bytes, device: str = NIC, **kwargs: object) -> Hotplugged | tuple:  # type: ignore[no-untyped-def]
    dom = Domain.from_bytes(xml, "<domain>")
    return add_device(dom, etree.fromstring(device), host, osdb.lookup(FEDORA), **kwargs)  # type: ignore[arg-type]


def bus_model(xml: bytes, device: etree._Element) -> str:
    bus = int(device.find("address").get("bus"), 16)
    return controllers(etree.fromstring(xml))[bus].get("model")


def test_the_new_device_alone_is_decided_and_takes_the_spare_root_port(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, disks(2) + nics(2)))
    done = add(host, osdb, xml)
    assert isinstance(done, Hotplugged)
    assert [inst.prefix for inst in done.built.instances] == ["interface[2]"]
    assert bus_model(xml, done.device) == "pcie-root-port"
    assert done.device.find("model").get("type") == "virtio"
    taken = {
        tuple(a.get(k) for k in ("bus", "slot", "function"))
        for a in etree.fromstring(xml).iterfind("devices/*/address[@type='pci']")
    }
    assert tuple(done.device.find("address").get(k) for k in ("bus", "slot", "function")) not in taken


def test_no_free_slot_left_is_a_conflict_naming_the_free_slots(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, disks(1) + nics(1)))
    first = add(host, osdb, xml)
    assert isinstance(first, Hotplugged)
    root = etree.fromstring(xml)
    root.find("devices").append(first.device)  # the running domain now has it: its one spare port is taken
    second = add(host, osdb, etree.tostring(root))
    assert isinstance(second, tuple), "a second device found a slot that does not exist"
    _, conflict = second
    assert isinstance(conflict, Conflict)
    hotplug = [m for m in conflict.members if m.id.startswith("app:hotplug-slots")]
    assert hotplug, [m.id for m in conflict.members]
    assert "none" in hotplug[0].message and "pcie-root slots never hot-plug" in hotplug[0].message


def test_a_conventional_device_takes_a_bridge_slot_on_q35(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, nics(1, "e1000")))
    done = add(host, osdb, xml, "<interface type='user'><model type='e1000'/></interface>")
    assert isinstance(done, Hotplugged)
    assert bus_model(xml, done.device) == "pcie-to-pci-bridge"


def test_pc_hotplugs_into_a_free_pci_root_slot(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, disks(1) + nics(1), machine="pc"))
    done = add(host, osdb, xml)
    assert isinstance(done, Hotplugged)
    assert done.device.find("address").get("bus") == "0x00"
    assert bus_model(xml, done.device) == "pci-root"


def test_each_cell_keeps_a_spare_port_and_a_required_node_takes_its_own(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, nics(2), cells=2, affinity={"/domain/devices/interface[2]": 1}))
    first = add(host, osdb, xml, node=1, policy="required")
    assert isinstance(first, Hotplugged)
    assert node_of(etree.fromstring(xml), first.device) == 1
    root = etree.fromstring(xml)
    root.find("devices").append(first.device)  # node 1's spare port is taken now
    grown = etree.tostring(root)
    required = add(host, osdb, grown, node=1, policy="required")
    assert isinstance(required, tuple), "node 1 has no spare port left"
    assert any(m.id.startswith("app:hotplug-slots") for m in required[1].members)
    preferred = add(host, osdb, grown, node=1, policy="preferred")
    assert isinstance(preferred, Hotplugged)
    assert node_of(root, preferred.device) == 0  # the wish yields to the spare port node 0 still has


def test_a_second_rng_and_an_unlaid_domain_are_input_errors(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, nics(1)))
    with pytest.raises(InputError, match="decides one per domain"):
        add(host, osdb, xml, "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>")
    with pytest.raises(InputError, match="solve the domain first"):
        add(host, osdb, domain("t", FEDORA, nics(1)).encode())


@pytest.mark.libvirt
@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_libvirt_hotplugs_the_device_at_the_address_we_chose(
    machine: str, host, osdb, libvirt: LibvirtHarness, tmp_path: Path
) -> None:
    xml = laid_out(host, osdb, domain(f"vp-hotplug-{machine}", FEDORA, disks(1) + nics(1), machine=machine))
    done = add(host, osdb, xml)
    assert isinstance(done, Hotplugged)
    ours = {k: done.device.find("address").get(k) for k in ("bus", "slot", "function")}
    started = libvirt.define_and_start(
        xml.decode(), tmp_path, hotplug=[etree.tostring(done.device, encoding="unicode")]
    )
    live = etree.fromstring(started.live_xml.encode())
    nics_live = live.findall("devices/interface")
    assert len(nics_live) == 2, "the hot-plugged NIC is not in the live domain"
    addr = nics_live[-1].find("address")
    assert {k: f"0x{int(addr.get(k), 16):0{len(ours[k]) - 2}x}" for k in ours} == ours


def test_only_what_libvirt_attaches_live(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, disks(1) + nics(1)))
    disk = add(host, osdb, xml, "<disk type='file' device='disk'><source file='/n.qcow2'/></disk>")
    assert isinstance(disk, Hotplugged)
    assert disk.device.find("target").get("bus") == "virtio" and disk.device.find("target").get("dev") == "vdb"
    sata = add(host, osdb, xml, "<disk type='file' device='disk'><source file='/s.qcow2'/><target bus='sata'/></disk>")
    assert isinstance(sata, tuple)
    assert any("cannot be hotplugged" in m.message for m in [*sata[1].members, *sata[1].background])
    with pytest.raises(InputError, match="cannot hot-plug a video"):
        add(host, osdb, xml, "<video><model type='vga'/></video>")


def test_a_node_wish_does_not_give_a_laid_out_domain_numa_cells(host, osdb) -> None:
    xml = laid_out(host, osdb, domain("t", FEDORA, nics(1)))
    required = add(host, osdb, xml, node=1, policy="required")
    assert isinstance(required, tuple)
    assert any("single NUMA cell" in m.message for m in required[1].members), required[1].members
    preferred = add(host, osdb, xml, node=1, policy="preferred")
    assert isinstance(preferred, Hotplugged)
    assert preferred.solution.assignment["numa.cells"] == "1"
