"""The host's PCI devices (a bundle's nodedev-pci.xml): where a passed-through device sits on the host.

A hostdev's NUMA locality and whether it is PCI Express are facts of the host, not of the domain XML;
libvirt reads them from sysfs when it places a device, and `virsh nodedev-dumpxml` prints them. The bundle
keeps those printouts, so the engine can place a hostdev on the right guest node without the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.xmlsafe import expect_root, parse_file

NODEDEV_FILE = "nodedev-pci.xml"


@dataclass(frozen=True)
class HostPciDevice:
    address: str  # 0000:3b:00.0
    numa_node: int | None  # None: the host reports no locality (libvirt prints no <numa>)
    pcie: bool  # a <pci-express> capability: libvirt puts it in a PCIe slot
    product: str
    where: str  # file:line of its <device>


def pci_address(domain: int, bus: int, slot: int, function: int) -> str:
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


def source_address(hostdev: etree._Element) -> str | None:
    """The host address a <hostdev type='pci'> passes through, or None when it names none."""
    addr = hostdev.find("source/address")
    if addr is None:
        return None
    try:
        return pci_address(*(int(addr.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")))
    except ValueError:
        return None


def read_nodedevs(path: Path) -> dict[str, HostPciDevice]:
    """<devices> holding `virsh nodedev-dumpxml` printouts; only PCI devices are kept."""
    root = expect_root(parse_file(path), "devices", str(path))
    found = {}
    for device in root.iterfind("device"):
        cap = device.find("capability[@type='pci']")
        if cap is None:
            continue
        try:
            address = pci_address(*(int(cap.findtext(k) or "0", 0) for k in ("domain", "bus", "slot", "function")))
            numa = cap.find("numa")
            node = int(numa.get("node", "-1")) if numa is not None else None
        except ValueError:
            raise InputError(f"{path}:{cap.sourceline}: a PCI device's address or NUMA node is not a number") from None
        found[address] = HostPciDevice(
            address=address,
            numa_node=node if node is not None and node >= 0 else None,
            pcie=cap.find("pci-express") is not None,
            product=(cap.findtext("product") or "").strip(),
            where=f"{path.parent.name}/{path.name}:{device.sourceline}",
        )
    return found
