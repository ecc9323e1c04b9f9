"""Passed-through PCI devices: their host NUMA node (from the bundle's nodedev data) and Nova's PCI NUMA
affinity policies (required / legacy / preferred / socket) decide their guest node; the host says whether
each is PCIe. The host is a two-socket, four-cell server (conftest numa_host)."""

from __future__ import annotations

import pytest
from libvirt_harness import LibvirtHarness
from lxml import etree
from support import assert_minimal, run
from topology_helpers import FEDORA, addresses_libvirt_moved, controllers, domain, node_of

from virtpolicy.core.explain import ConflictExplainer
from virtpolicy.core.solve import Conflict
from virtpolicy.errors import InputError
from virtpolicy.inputs.nodeset import parse_nodeset
from virtpolicy.profiles.library import find_profile
from virtpolicy.sources.context import SelectedProfile

VP = "http://virtpolicy.org/xmlns/domain/1.0"
NIC_NODE2 = "0000:3b:00.0"  # 82599, host node 2 (socket 1)
GPU_NODE3 = "0000:86:00.0"  # Tesla T4, host node 3 (socket 1)
NVME_NODE0 = "0000:17:00.0"  # host node 0 (socket 0)
NO_NODE = "0000:05:01.0"  # conventional PCI, no NUMA node
ALIGNED = [SelectedProfile(find_profile("numa-aligned"), 0, "--profile")]


def hostdev(address: str) -> str:
    dom, bus, rest = address.split(":")
    slot, function = rest.split(".")
    return (
        "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
        f"<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{function}'/></source></hostdev>"
    )


def guest(
    hostdevs: list[str],
    cells: int = 0,
    policies: dict[int, str] | None = None,
    memnodes: dict[int, str] | None = None,
    name: str = "t",
) -> str:
    tune = ""
    if memnodes:
        tune = (
            "<numatune>"
            + "".join(f"<memnode cellid='{c}' mode='strict' nodeset='{n}'/>" for c, n in memnodes.items())
            + "</numatune>"
        )
    wishes = "".join(
        f"<virtpolicy:device xpath='/domain/devices/hostdev[{i + 1}]' policy='{p}'/>"
        for i, p in (policies or {}).items()
    )
    vp = f"<virtpolicy:numa xmlns:virtpolicy='{VP}'>{wishes}</virtpolicy:numa>" if wishes else ""
    devices = "<interface type='user'/>" + "".join(hostdev(a) for a in hostdevs)
    return domain(name, FEDORA, devices, "q35", 8, cells, extra_metadata=vp, memory_mib=4096, numatune=tune)


def hostdev_nodes(xml: bytes) -> list[int | None]:
    root = etree.fromstring(xml)
    return [node_of(root, h) for h in root.findall("devices/hostdev")]


def bus_models(xml: bytes) -> list[str]:
    root = etree.fromstring(xml)
    ctrls = controllers(root)
    return [ctrls[int(h.find("address").get("bus"), 16)].get("model") for h in root.findall("devices/hostdev")]


def test_parse_nodeset() -> None:
    assert parse_nodeset("0-3,^1") == {0, 2, 3}
    assert parse_nodeset("2") == {2}


def test_mirrored_cells_put_each_hostdev_under_the_expander_of_its_host_node(numa_host, osdb) -> None:
    out = run(guest([NIC_NODE2, GPU_NODE3, NVME_NODE0]), numa_host, osdb, profiles=ALIGNED)
    assert out.solved, out.describe()
    assert out.value("numa.cells") == "4"
    assert hostdev_nodes(out.xml) == [2, 3, 0]
    assert bus_models(out.xml) == ["pcie-root-port"] * 3


def test_the_host_says_which_hostdevs_are_conventional_pci(numa_host, osdb) -> None:
    out = run(guest([NO_NODE, NIC_NODE2]), numa_host, osdb)
    assert out.solved, out.describe()
    assert out.value("hostdev[0].link") == "pci" and out.value("hostdev[1].link") == "pcie"
    assert bus_models(out.xml) == ["pcie-to-pci-bridge", "pcie-root-port"]


def test_without_a_guest_numa_topology_no_affinity_applies(numa_host, osdb) -> None:
    out = run(guest([NIC_NODE2]), numa_host, osdb)
    assert out.solved, out.describe()
    assert hostdev_nodes(out.xml) == [None]


@pytest.mark.parametrize("policy", ["required", "legacy"])
def test_required_and_legacy_refuse_a_guest_without_a_cell_on_the_device_node(numa_host, osdb, policy) -> None:
    xml = guest([NIC_NODE2], cells=2, memnodes={0: "0", 1: "1"}, policies={0: policy})
    out = run(xml, numa_host, osdb)
    assert isinstance(out.result, Conflict), out.describe()
    assert_minimal(out)
    member = next(m for m in out.result.members if "hostdev[0]" in m.message)
    assert "host node 2" in member.message and "1->[1]" in member.message


def test_legacy_is_nova_default_for_a_hostdev_without_metadata(numa_host, osdb) -> None:
    out = run(guest([NIC_NODE2], cells=2, memnodes={0: "0", 1: "1"}), numa_host, osdb)
    assert isinstance(out.result, Conflict)
    member = next(m for m in out.result.members if "hostdev[0]" in m.message)
    assert member.provenance.source.value == "host" and "legacy" in member.message
    actions = [a for c in ConflictExplainer(out.built.problem).explain(10).corrections for a in c.actions]
    assert any("looser policy" in a for a in actions), actions


def test_preferred_yields_to_a_guest_without_that_node(numa_host, osdb) -> None:
    xml = guest([NIC_NODE2], cells=2, memnodes={0: "0", 1: "1"}, policies={0: "preferred"})
    out = run(xml, numa_host, osdb)
    assert out.solved, out.describe()
    assert [d.constraint.id for d in out.result.dropped if "hostdev" in d.constraint.message]


def test_memnode_mapping_decides_the_guest_cell(numa_host, osdb) -> None:
    xml = guest([NIC_NODE2], cells=2, memnodes={0: "0", 1: "2"}, policies={0: "required"})
    out = run(xml, numa_host, osdb)
    assert out.solved, out.describe()
    assert hostdev_nodes(out.xml) == [1]


def test_socket_accepts_any_cell_of_the_device_socket(numa_host, osdb) -> None:
    # the T4 sits on host node 3; guest cells are on host nodes 0 and 2: node 2 shares socket 1
    xml = guest([GPU_NODE3], cells=2, memnodes={0: "0", 1: "2"}, policies={0: "socket"})
    out = run(xml, numa_host, osdb)
    assert out.solved, out.describe()
    assert hostdev_nodes(out.xml) == [1]
    required = run(guest([GPU_NODE3], cells=2, memnodes={0: "0", 1: "2"}, policies={0: "required"}), numa_host, osdb)
    assert not required.solved


def test_socket_without_socket_facts_is_a_conflict(host, numa_host, osdb) -> None:
    # the embedded host has one cell: guest cell 1 sits on no host node, so it has no socket
    xml = (
        guest([], cells=2)
        .replace("<devices>", "<devices><interface type='user'/>")
        .replace(
            "</metadata>",
            f"<virtpolicy:numa xmlns:virtpolicy='{VP}'><virtpolicy:device xpath='/domain/devices/interface[1]' "
            "node='1' policy='socket'/></virtpolicy:numa></metadata>",
        )
    )
    out = run(xml, host, osdb)
    assert isinstance(out.result, Conflict), out.describe()
    assert any("reports no socket" in m.message for m in out.result.members)


def test_a_device_without_a_host_node(numa_host, osdb) -> None:
    legacy = run(guest([NO_NODE], cells=2, memnodes={0: "0", 1: "1"}, policies={0: "legacy"}), numa_host, osdb)
    assert legacy.solved, legacy.describe()
    required = run(guest([NO_NODE], cells=2, memnodes={0: "0", 1: "1"}, policies={0: "required"}), numa_host, osdb)
    assert isinstance(required.result, Conflict)
    assert any("needs a host NUMA node" in m.message for m in required.result.members)


def test_a_hostdev_the_host_does_not_have_is_a_conflict(numa_host, osdb) -> None:
    out = run(guest(["0000:99:00.0"]), numa_host, osdb)
    assert isinstance(out.result, Conflict)
    assert any("has no PCI device 0000:99:00.0" in m.message for m in out.result.members)


def test_a_node_less_wish_is_only_for_hostdevs(numa_host, osdb) -> None:
    xml = guest([NIC_NODE2], cells=2).replace(
        "</metadata>",
        f"<virtpolicy:numa xmlns:virtpolicy='{VP}'><virtpolicy:device xpath='/domain/devices/interface[1]' "
        "policy='required'/></virtpolicy:numa></metadata>",
    )
    with pytest.raises(InputError, match="left out only for a hostdev"):
        run(xml, numa_host, osdb)


@pytest.mark.libvirt
def test_libvirt_defines_hostdevs_under_expanders_and_keeps_our_addresses(
    numa_host, osdb, libvirt: LibvirtHarness, domain_schema
) -> None:
    out = run(guest([NIC_NODE2, GPU_NODE3, NO_NODE], name="vp-hostdev"), numa_host, osdb, profiles=ALIGNED)
    assert out.solved, out.describe()
    domain_schema.assertValid(etree.fromstring(out.xml))
    assert not addresses_libvirt_moved(libvirt, out.xml, "vp-hostdev")
