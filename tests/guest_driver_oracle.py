"""Independent oracle: which virtio devices in a libvirt domain need which guest drivers.

Conformance tests use this to check the engine's output, so it is deliberately written from
libvirt/QEMU placement facts and osinfo-db ids, sharing no code or data with ``virtpolicy``: a bug
copied into both would otherwise go unnoticed.

Facts (libvirt 9.0 / QEMU 7.2, confirmed on this machine with ``info pci``):

* ``virtio-non-transitional`` is modern (virtio 1.0 only); ``virtio-transitional`` exposes the
  legacy interface too (legacy PCI device id 1af4:10xx), and libvirt only places it in a
  conventional PCI slot (on q35 it adds a pcie-to-pci-bridge for it).
* Plain ``virtio`` is decided by QEMU from the slot: ``disable-legacy=auto`` turns legacy off when
  the device sits on a PCI Express port that is not a root bus (pcie-root-port,
  pcie-switch-downstream-port), so it is modern there; in a conventional PCI slot (pci-root,
  pci-bridge, pcie-to-pci-bridge, pci-expander-bus, dmi-to-pci-bridge) or directly on a root
  complex (pcie-root, where it would be an integrated endpoint) it stays transitional.
* virtio-gpu/virtio-vga and virtio-input force virtio 1.0: always modern.
* Off PCI (issue 14): a virtio-ccw device (s390x, ``<address type='ccw'>``) lets the driver pick the
  revision with CCW_CMD_SET_VIRTIO_REV (QEMU hw/s390x/virtio-ccw.c: revision 0 is legacy virtio,
  1 and up virtio 1.0), so a legacy or a 1.0 driver works: transitional.  A virtio-mmio device
  (``<address type='virtio-mmio'>``, aarch64/riscv64 virt without PCIe) is legacy only: QEMU's
  virtio-mmio transport defaults to ``force-legacy=on`` (hw/virtio/virtio-mmio.c, the version 1
  register layout), so only a legacy driver binds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lxml import etree

Mode = Literal["modern", "transitional", "legacy"]
Kind = Literal["net", "blk", "scsi", "balloon", "rng", "console", "gpu", "input"]

_PCIE_PORT_MODELS = frozenset({"pcie-root-port", "pcie-switch-downstream-port"})
_CONVENTIONAL_OR_ROOT_MODELS = frozenset(
    {"pci-root", "pci-bridge", "pcie-to-pci-bridge", "pci-expander-bus", "dmi-to-pci-bridge", "pcie-root"}
)
_VIRTIO_MODELS = frozenset({"virtio", "virtio-transitional", "virtio-non-transitional"})
_SCSI_VIRTIO_MODELS = frozenset({"virtio-scsi", "virtio-transitional", "virtio-non-transitional"})

# osinfo-db spells PCI ids as http://pcisig.com/pci/<vendor>/<device>.
_LEGACY_ID: dict[str, str] = {
    "net": "1000", "blk": "1001", "balloon": "1002", "console": "1003", "scsi": "1004", "rng": "1005",
}
_MODERN_ID: dict[str, str] = {
    "net": "1041", "blk": "1042", "console": "1043", "rng": "1044", "balloon": "1045",
    "scsi": "1048", "gpu": "1050", "input": "1052",
}


def pci_id_url(device: str, vendor: str = "1af4") -> str:
    """The osinfo-db spelling, so callers can build id sets without knowing the URL scheme."""
    return f"http://pcisig.com/pci/{vendor}/{device}"


@dataclass(frozen=True)
class VirtioDevice:
    """One guest-visible virtio function, located like the engine's provenance (``xpath``)."""

    xpath: str
    kind: Kind
    mode: Mode


def _xpath(el: etree._Element) -> str:
    # Covered devices are children of the single <devices>; the form matches DESIGN.md's
    # provenance paths (/domain/devices/disk[1]) so reports can be compared as strings.
    parent = el.getparent()
    assert parent is not None
    index = [c for c in parent if c.tag == el.tag].index(el) + 1
    return f"/domain/devices/{el.tag}[{index}]"


def _candidates(devices: etree._Element) -> Iterator[tuple[etree._Element, Kind, str | None, bool]]:
    """Yield (element, kind, model, always_modern) for every virtio device the brief covers."""
    for el in devices:
        tag = el.tag
        if tag == "disk":
            target = el.find("target")
            if target is not None and target.get("bus") == "virtio":
                yield el, "blk", el.get("model"), False
        elif tag == "interface":
            model = el.find("model")
            mtype = model.get("type") if model is not None else None
            if mtype in _VIRTIO_MODELS:
                yield el, "net", mtype, False
        elif tag == "controller":
            ctype, model = el.get("type"), el.get("model")
            if ctype == "scsi" and model in _SCSI_VIRTIO_MODELS:
                yield el, "scsi", model, False
            elif ctype == "virtio-serial":
                yield el, "console", model, False
        elif tag == "memballoon":
            if el.get("model") in _VIRTIO_MODELS:
                yield el, "balloon", el.get("model"), False
        elif tag == "rng":
            if el.get("model") in _VIRTIO_MODELS:
                yield el, "rng", el.get("model"), False
        elif tag == "video":
            model = el.find("model")
            if model is not None and model.get("type") == "virtio":
                yield el, "gpu", None, True
        elif tag == "input" and el.get("bus") == "virtio":
            yield el, "input", None, True


def _mode_from_slot(el: etree._Element, controllers: dict[int, str], xpath: str) -> Mode:
    addr = el.find("address")
    if addr is not None and addr.get("type") == "ccw":
        return "transitional"
    if addr is not None and addr.get("type") == "virtio-mmio":
        return "legacy"
    if addr is None or addr.get("type") != "pci":
        raise ValueError(
            f"{xpath}: plain virtio without a PCI address; its mode depends on the slot, "
            "so pass libvirt's dumpxml (which has addresses)"
        )
    bus = int(addr.get("bus", "0"), 0)
    model = controllers.get(bus)
    if model in _PCIE_PORT_MODELS:
        return "modern"
    if model in _CONVENTIONAL_OR_ROOT_MODELS:
        return "transitional"
    raise ValueError(f"{xpath}: PCI bus {bus} is {model or 'not a defined controller'}; mode unknown")


def virtio_devices_needing_drivers(dumpxml: str) -> list[VirtioDevice]:
    """Every virtio device in a (libvirt-addressed) domain, with the virtio revision it exposes."""
    root = etree.fromstring(dumpxml.encode())
    devices = root.find("devices")
    if devices is None:
        return []
    controllers = {
        int(c.get("index", "0")): c.get("model", "")
        for c in devices.iterfind("controller")
        if c.get("type") == "pci"
    }
    found: list[VirtioDevice] = []
    for el, kind, model, always_modern in _candidates(devices):
        xpath = _xpath(el)
        mode: Mode
        if always_modern or model == "virtio-non-transitional":
            mode = "modern"
        elif model == "virtio-transitional":
            mode = "transitional"
        else:
            mode = _mode_from_slot(el, controllers, xpath)
        found.append(VirtioDevice(xpath=xpath, kind=kind, mode=mode))
    return found


def guest_can_drive(dev: VirtioDevice, osinfo_device_ids: set[str]) -> bool:
    """A transitional device works with a legacy or a 1.0 driver; a modern one needs 1.0, a legacy one a
    legacy driver."""
    ids = {i.lower().rstrip("/") for i in osinfo_device_ids}
    modern = _MODERN_ID.get(dev.kind)
    if dev.mode != "legacy" and modern is not None and pci_id_url(modern) in ids:
        return True
    legacy = _LEGACY_ID.get(dev.kind)
    return dev.mode != "modern" and legacy is not None and pci_id_url(legacy) in ids


__all__ = ["VirtioDevice", "guest_can_drive", "pci_id_url", "virtio_devices_needing_drivers"]
