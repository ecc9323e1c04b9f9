"""Domains with PCI topology and NUMA wishes, and readers of the addresses libvirt keeps: shared by the
topology, hot-plug and locality suites."""

from __future__ import annotations

import pytest
from libvirt_harness import LibvirtError, LibvirtHarness
from lxml import etree

VP = "http://virtpolicy.org/xmlns/domain/1.0"
LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"


def domain(
    name: str,
    os_id: str,
    devices: str,
    machine: str | None = None,
    vcpus: int = 4,
    cells: int = 0,
    affinity: dict[str, int] | None = None,
    extra_metadata: str = "",
    memory_mib: int = 1024,
    numatune: str = "",
) -> str:
    machine_attr = f" machine='{machine}'" if machine else ""
    numa = ""
    if cells:
        per = vcpus // cells
        numa = (
            "<cpu><numa>"
            + "".join(
                f"<cell id='{i}' cpus='{i * per}-{i * per + per - 1}' memory='{memory_mib // cells}' unit='MiB'/>"
                for i in range(cells)
            )
            + "</numa></cpu>"
        )
    wishes = "".join(
        f"<virtpolicy:device xpath='{xpath}' node='{node}' policy='required'/>"
        for xpath, node in (affinity or {}).items()
    )
    meta = f"<virtpolicy:numa xmlns:virtpolicy='{VP}'>{wishes}</virtpolicy:numa>" if wishes else ""
    return (
        f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
        f"<metadata><libosinfo:libosinfo xmlns:libosinfo='{LIBOSINFO}'><libosinfo:os id='{os_id}'/>"
        f"</libosinfo:libosinfo>{meta}{extra_metadata}</metadata>{numatune}"
        f"<os><type arch='x86_64'{machine_attr}>hvm</type></os>{numa}<devices>{devices}</devices></domain>"
    )


def nics(n: int, model: str | None = None) -> str:
    m = f"<model type='{model}'/>" if model else ""
    return "".join(f"<interface type='user'>{m}</interface>" for _ in range(n))


def disks(n: int) -> str:
    return "".join(f"<disk type='file' device='disk'><source file='/d{i}.qcow2'/></disk>" for i in range(n))


def pci_addresses(root: etree._Element) -> dict[str, tuple[int, int, int]]:
    """PCI addresses keyed by element kind and its position among elements of that kind."""
    found: dict[str, tuple[int, int, int]] = {}
    seen: dict[str, int] = {}
    for el in root.iterfind("devices/*"):
        kind = f"{el.tag}:{el.get('type', '')}:{el.get('model', '')}"
        seen[kind] = seen.get(kind, 0) + 1
        addr = el.find("address[@type='pci']")
        if addr is not None:
            found[f"{kind}#{seen[kind]}"] = tuple(int(addr.get(k), 16) for k in ("bus", "slot", "function"))
    return found


def kept(ours: dict[str, tuple[int, int, int]], theirs: dict[str, tuple[int, int, int]]) -> dict[str, object]:
    """Our addresses libvirt changed or dropped (devices libvirt adds on its own are not ours to check)."""
    return {k: theirs.get(k) for k, v in ours.items() if theirs.get(k) != v}


def controllers(root: etree._Element) -> dict[int, etree._Element]:
    return {int(c.get("index")): c for c in root.iterfind("devices/controller[@type='pci']")}


def addresses_libvirt_moved(libvirt: LibvirtHarness, xml: bytes, name: str) -> dict[str, object]:
    """Define the domain, read libvirt's XML back, undefine it: the PCI addresses libvirt changed."""
    try:
        dumped = libvirt.define(xml.decode())
    except LibvirtError as exc:
        pytest.fail(f"libvirt rejected the topology: {exc}\n{xml.decode()}")
    finally:
        libvirt.undefine(name)
    return kept(pci_addresses(etree.fromstring(xml)), pci_addresses(etree.fromstring(dumped.encode())))


def node_of(root: etree._Element, el: etree._Element) -> int | None:
    ctrls = controllers(root)
    bus = int(el.find("address").get("bus"), 16)
    while bus in ctrls:
        node = ctrls[bus].findtext("target/node")
        if node is not None:
            return int(node)
        addr = ctrls[bus].find("address")
        if addr is None:
            return None
        bus = int(addr.get("bus"), 16)
    return None


FEDORA = "http://fedoraproject.org/fedora/37"
