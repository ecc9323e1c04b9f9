"""PCI/PCIe topology, slot types and NUMA placement: explicit addresses, capacity conflicts, ABI stability,
and real libvirt/QEMU accepting the layout (dumpxml keeps every address) with devices on the right cells."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libvirt_harness import LibvirtHarness
from lxml import etree
from qemu_qtree import numa_node_of_devices
from support import assert_minimal, run
from topology_helpers import (
    FEDORA,
    addresses_libvirt_moved,
    disks,
    domain,
    kept,
    nics,
    node_of,
    pci_addresses,
)

REPO = Path(__file__).resolve().parents[2]


def test_every_pci_device_and_controller_gets_an_explicit_unique_address(host, osdb) -> None:
    out = run(domain("t", FEDORA, disks(3) + nics(3)), host, osdb)
    root = etree.fromstring(out.xml)
    for el in root.iterfind("devices/*"):
        if (
            el.tag in ("disk", "interface", "video", "memballoon", "rng")
            or (el.tag == "controller" and el.get("type") in ("usb", "virtio-serial"))
            or (el.tag == "controller" and el.get("model") not in ("pcie-root", "pci-root"))
        ):
            assert el.find("address[@type='pci']") is not None, etree.tostring(el)
    addresses = list(pci_addresses(root).values())
    assert len(addresses) == len(set(addresses)), "two devices share a PCI address"
    ports = root.findall("devices/controller[@model='pcie-root-port']")
    slot2 = [p for p in ports if p.find("address").get("slot") == "0x02"]
    assert len(slot2) == 8 and slot2[0].find("address").get("multifunction") == "on"  # packed like libvirt


def test_transitional_devices_go_behind_one_pcie_to_pci_bridge(host, osdb) -> None:
    out = run(domain("t", "http://redhat.com/rhel/6.10", disks(2) + nics(2), "q35"), host, osdb)
    root = etree.fromstring(out.xml)
    bridges = root.findall("devices/controller[@model='pcie-to-pci-bridge']")
    assert len(bridges) == 1
    index = int(bridges[0].get("index"))
    for el in root.findall("devices/disk") + root.findall("devices/interface"):
        assert int(el.find("address").get("bus"), 16) == index


def test_a_full_pci_root_on_pc_grows_a_pci_bridge(host, osdb) -> None:
    out = run(domain("t", "http://redhat.com/rhel/6.10", nics(40, "e1000"), "pc"), host, osdb)
    root = etree.fromstring(out.xml)
    bridges = root.findall("devices/controller[@model='pci-bridge']")
    assert bridges, "40 NICs do not fit on pci-root"
    assert all(int(b.find("address").get("bus"), 16) == 0 for b in bridges)
    assert len(set(pci_addresses(root).values())) == len(pci_addresses(root))


def two_cell_domain(name: str) -> str:
    """Two disks and two NICs on a two-cell guest, the second of each required on node 1."""
    return domain(
        name,
        FEDORA,
        disks(2) + nics(2),
        cells=2,
        affinity={"/domain/devices/interface[2]": 1, "/domain/devices/disk[2]": 1},
    )


def test_numa_placed_devices_hang_off_expanders_with_their_node(host, osdb) -> None:
    xml = two_cell_domain("t")
    out = run(xml, host, osdb)
    root = etree.fromstring(out.xml)
    assert node_of(root, root.findall("devices/interface")[1]) == 1
    assert node_of(root, root.findall("devices/disk")[1]) == 1
    assert node_of(root, root.findall("devices/interface")[0]) == 0
    expanders = root.findall("devices/controller[@model='pcie-expander-bus']")
    ranges = sorted(int(e.find("target").get("busNr")) for e in expanders)
    assert len(ranges) == 2 and ranges[-1] < 256
    assert len(set(ranges)) == 2


def test_capacity_conflict_names_the_numbers(host, osdb) -> None:
    """40 PCIe-only NICs (e1000e) on node 0, whose expander's bus range only has room for 37 root ports."""
    expanders = (
        "<controller type='pci' index='1' model='pcie-expander-bus'><target busNr='200'><node>0</node></target>"
        "</controller><controller type='pci' index='2' model='pcie-expander-bus'><target busNr='238'>"
        "<node>1</node></target></controller>"
    )
    affinity = {f"/domain/devices/interface[{i}]": 0 for i in range(1, 41)}
    out = run(domain("t", FEDORA, expanders + nics(40, "e1000e"), cells=2, affinity=affinity), host, osdb)
    assert not out.solved
    messages = " ".join(m.message for m in out.result.members)
    assert "range (201-237) allows 37" in messages, messages


def test_uneven_numa_split_is_a_conflict(host, osdb, tmp_path: Path) -> None:
    (tmp_path / "three.toml").write_text(
        'name = "three"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "c"\nstrength = "hard"\n'
        'require = { "numa.cells" = ["3"] }\n'
    )
    xml = domain("t", FEDORA, disks(1), vcpus=4)
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "solve", "-", "--profile-path", str(tmp_path), "--profile", "three"],
        input=xml.encode(),
        capture_output=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 2
    assert b"cannot be split evenly" in done.stderr


def test_resolving_keeps_addresses_adding_takes_a_free_slot_removing_shifts_nothing(host, osdb) -> None:
    first = run(domain("t", FEDORA, disks(2) + nics(3)), host, osdb)
    again = run(first.xml, host, osdb)
    assert again.xml == first.xml
    root = etree.fromstring(first.xml)
    before = pci_addresses(root)
    # add a NIC and ask for the gaps to be filled (--partial: a laid-out domain is otherwise only checked):
    # every existing address stays, the new one is new
    devices = root.find("devices")
    devices.append(etree.fromstring("<interface type='user'/>"))
    added = run(etree.tostring(root), host, osdb, complete=False)
    after_root = etree.fromstring(added.xml)
    new_nic = after_root.findall("devices/interface")[-1].find("address")
    assert new_nic is not None
    old_nics = [i.find("address").attrib for i in etree.fromstring(first.xml).findall("devices/interface")]
    assert [i.find("address").attrib for i in after_root.findall("devices/interface")[:-1]] == old_nics
    assert tuple(int(new_nic.get(k), 16) for k in ("bus", "slot", "function")) not in before.values()
    # remove a disk: nothing else moves
    root = etree.fromstring(first.xml)
    root.find("devices").remove(root.findall("devices/disk")[0])
    removed = etree.fromstring(run(etree.tostring(root), host, osdb, complete=False).xml)
    assert [i.find("address").attrib for i in removed.findall("devices/interface")] == old_nics
    assert (
        removed.findall("devices/disk")[0].find("address").attrib
        == etree.fromstring(first.xml).findall("devices/disk")[1].find("address").attrib
    )


def test_device_add_command_returns_the_device_with_a_hotpluggable_slot(tmp_path: Path, host, osdb) -> None:
    solved = tmp_path / "domain.xml"
    solved.write_bytes(run(domain("t", FEDORA, disks(1) + nics(1)), host, osdb).xml)
    device = tmp_path / "nic.xml"
    device.write_text("<interface type='user'><model type='virtio'/></interface>")
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "device", "add", str(solved), str(device)],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    nic = etree.fromstring(done.stdout)
    bus = int(nic.find("address").get("bus"), 16)
    port = next(
        c
        for c in etree.fromstring(solved.read_bytes()).iterfind("devices/controller[@type='pci']")
        if int(c.get("index")) == bus
    )
    assert port.get("model") == "pcie-root-port"  # the spare root port libvirt-style hotplug uses


# --- real libvirt / QEMU -----------------------------------------------------------------------------


@pytest.mark.libvirt
def test_numa_topology_runs_and_qemu_puts_devices_on_their_nodes(
    host, osdb, libvirt: LibvirtHarness, tmp_path: Path
) -> None:
    xml = two_cell_domain("vp-topo-numa")
    out = run(xml, host, osdb)
    ours = pci_addresses(etree.fromstring(out.xml))
    started = libvirt.define_and_start(out.xml.decode(), tmp_path)
    live = etree.fromstring(started.live_xml.encode())
    assert not kept(ours, pci_addresses(live)), "libvirt moved addresses"
    qtree = started.info_qtree
    pxb_nodes = re.findall(r'dev: pxb-pcie, id "pci\.(\d+)".*?numa_node = (\d+)', qtree, re.S)
    assert {int(node) for _, node in pxb_nodes} == {0, 1}, qtree[:2000]
    assert node_of(live, live.findall("devices/interface")[1]) == 1
    assert node_of(live, live.findall("devices/disk")[1]) == 1
    # and QEMU itself: each device hangs off the pxb of the cell it was placed on
    in_qemu = numa_node_of_devices(qtree)
    for kind, index, node in (("interface", 0, 0), ("interface", 1, 1), ("disk", 0, 0), ("disk", 1, 1)):
        alias = live.findall(f"devices/{kind}")[index].find("alias").get("name")
        assert in_qemu.get(alias) == node, f"{kind}[{index}] ({alias}) is on node {in_qemu.get(alias)} in QEMU"


DEVICE_KINDS = st.sampled_from(["nic", "nic-e1000", "disk"])


@pytest.mark.libvirt
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    kinds=st.lists(DEVICE_KINDS, min_size=1, max_size=20),
    cells=st.sampled_from([0, 2, 4]),
    machine=st.sampled_from(["q35", "pc"]),
    affinity_seed=st.integers(0, 3),
)
def test_random_topologies_are_accepted_unchanged_or_are_capacity_conflicts(
    kinds, cells, machine, affinity_seed, host, osdb, libvirt: LibvirtHarness
) -> None:
    devices = "".join(
        {
            "nic": "<interface type='user'/>",
            "nic-e1000": "<interface type='user'><model type='e1000'/></interface>",
            "disk": "<disk type='file' device='disk'><source file='/x.qcow2'/></disk>",
        }[k]
        for k in kinds
    )
    affinity = {}
    if cells:
        counters = {"interface": 0, "disk": 0}
        for k in kinds:
            tag = "disk" if k == "disk" else "interface"
            counters[tag] += 1
            affinity[f"/domain/devices/{tag}[{counters[tag]}]"] = (counters[tag] + affinity_seed) % cells
    out = run(domain("vp-topo-prop", FEDORA, devices, machine, vcpus=4, cells=cells, affinity=affinity), host, osdb)
    if not out.solved:
        assert_minimal(out)
        assert any("root port" in m.message or "bus" in m.message for m in out.result.members), out.describe()
        return
    assert not addresses_libvirt_moved(libvirt, out.xml, "vp-topo-prop")


def test_a_plain_virtio_device_behind_a_bridge_keeps_its_place(host, osdb) -> None:
    """libvirt accepts a plain virtio NIC on a pcie-to-pci-bridge (it runs transitional there): re-solving
    such a dumpxml is no conflict, and the NIC stays where it is."""
    first = etree.fromstring(run(domain("t", FEDORA, nics(1, "e1000") + nics(1, "virtio")), host, osdb).xml)
    e1000, virtio = first.findall("devices/interface")
    bridge_bus = e1000.find("address").get("bus")
    virtio.find("address").attrib.update({"bus": bridge_bus, "slot": "0x02", "function": "0x0"})
    again = run(etree.tostring(first), host, osdb)
    assert again.solved, again.describe()
    moved = etree.fromstring(again.xml).findall("devices/interface")[1].find("address")
    assert (moved.get("bus"), moved.get("slot")) == (bridge_bus, "0x02")


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_hotplug_ready_keeps_eight_free_hotplug_slots(machine: str, host, osdb) -> None:
    """q35: eight empty root ports; pc: eight free hot-pluggable PCI slots, with a pci-bridge once the
    devices leave fewer on pci-root."""
    from virtpolicy.outputs.topology import TopologyBuilder
    from virtpolicy.profiles.library import find_profile
    from virtpolicy.sources.context import SelectedProfile

    ready = [SelectedProfile(find_profile("hotplug-ready"), 0, "--profile")]
    out = run(domain("t", FEDORA, nics(22, "e1000"), machine=machine), host, osdb, profiles=ready)
    assert out.solved, out.describe()
    root = etree.fromstring(out.xml)
    free = TopologyBuilder(root.find("devices"), machine, 1, 0).hotplug_slots()
    kinds = [s.model for s in free]
    if machine == "q35":
        assert kinds.count("pcie-root-port") == 8
    else:
        assert len(free) >= 8 and root.find("devices/controller[@model='pci-bridge']") is not None
    again = run(out.xml, host, osdb, profiles=ready)
    assert again.xml == out.xml  # a laid-out domain gains nothing on re-solve


def _ich9_usb(devices: str) -> list[etree._Element]:
    """TopologyBuilder alone on q35: an ICH9 EHCI with the companions in `devices` (pci.toml [usb2])."""
    from virtpolicy.outputs.topology import Placement, TopologyBuilder

    root = etree.fromstring(f"<devices><controller type='usb' index='0' model='ich9-ehci1'/>{devices}</devices>")
    ehci, *companions = root.findall("controller[@type='usb']")
    builder = TopologyBuilder(root, "q35", 1, 0)
    builder.place([Placement(ehci, "integrated", 0, (0x1D, 7), companions)])
    return root.findall("controller[@type='usb']")


def test_the_ich9_usb_controllers_take_00_1d_else_00_1a_at_libvirts_functions() -> None:
    """qemuDomainValidateDevicePCISlotsQ35 tries 00:1D, then 00:1A; each companion has its own function."""
    uhci = "".join(f"<controller type='usb' index='0' model='ich9-uhci{n}'/>" for n in (1, 2, 3))
    placed = [
        (c.get("model"), c.find("address").get("slot"), c.find("address").get("function")) for c in _ich9_usb(uhci)
    ]
    assert placed == [("ich9-ehci1", "0x1d", "0x7"), *((f"ich9-uhci{n}", "0x1d", f"0x{n - 1}") for n in (1, 2, 3))]
    taken = "<sound model='ich9'><address type='pci' domain='0x0000' bus='0x00' slot='0x1d' function='0x0'/></sound>"
    ehci, uhci1, *_ = _ich9_usb(taken + uhci)
    assert ehci.find("address").get("slot") == uhci1.find("address").get("slot") == "0x1a"
    assert uhci1.find("address").get("multifunction") == "on"
    (_, uhci2) = _ich9_usb("<controller type='usb' index='0' model='ich9-uhci2'/>")
    assert uhci2.find("address").get("function") == "0x1"  # UHCI2 is function 1 even without UHCI1


def test_new_controllers_get_libvirts_model_names_and_targets(host, osdb) -> None:
    """qemuDomainPCIControllerSetDefaultModelName and qemuDomainAssignPCIAddresses (pci.toml [buses])."""
    root = etree.fromstring(run(domain("t", "http://redhat.com/rhel/6.10", disks(1) + nics(1), "q35"), host, osdb).xml)
    for port in root.findall("devices/controller[@model='pcie-root-port']"):
        addr = port.find("address")
        assert port.find("model").get("name") == "pcie-root-port"
        assert port.find("target").get("chassis") == port.get("index")
        assert int(port.find("target").get("port"), 16) == int(addr.get("slot"), 16) * 8 + int(addr.get("function"), 16)
    (bridge,) = root.findall("devices/controller[@model='pcie-to-pci-bridge']")
    assert bridge.find("model").get("name") == "pcie-pci-bridge" and bridge.find("target") is None
