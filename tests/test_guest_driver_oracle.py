"""The oracle judges the engine, so it gets its own small, hand-checkable cases."""

from __future__ import annotations

import pytest
from guest_driver_oracle import (
    VirtioDevice,
    guest_can_drive,
    pci_id_url,
    virtio_devices_needing_drivers,
)

Q35_CONTROLLERS = """
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='pci' index='2' model='pcie-to-pci-bridge'>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='3' model='pcie-root-port'/>
    <controller type='pci' index='4' model='pcie-switch-upstream-port'>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='5' model='pcie-switch-downstream-port'>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='6' model='dmi-to-pci-bridge'/>
    <controller type='pci' index='7' model='pci-bridge'/>
"""


def addr(bus: int, slot: int = 0) -> str:
    return f"<address type='pci' domain='0x0000' bus='{bus:#04x}' slot='{slot:#04x}' function='0x0'/>"


def domain(devices: str, controllers: str = Q35_CONTROLLERS) -> str:
    return f"<domain type='kvm'><name>t</name><devices>{controllers}{devices}</devices></domain>"


def one(devices: str, controllers: str = Q35_CONTROLLERS) -> VirtioDevice:
    found = virtio_devices_needing_drivers(domain(devices, controllers))
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    ("bus", "mode"),
    [
        (1, "modern"),  # pcie-root-port
        (5, "modern"),  # pcie-switch-downstream-port
        (2, "transitional"),  # pcie-to-pci-bridge
        (6, "transitional"),  # dmi-to-pci-bridge
        (7, "transitional"),  # pci-bridge
        (0, "transitional"),  # pcie-root: integrated endpoint, QEMU keeps legacy on a root bus
    ],
)
def test_plain_virtio_mode_follows_the_slot(bus: int, mode: str) -> None:
    dev = one(f"<interface type='user'><model type='virtio'/>{addr(bus, 1)}</interface>")
    assert (dev.kind, dev.mode) == ("net", mode)


def test_plain_virtio_on_i440fx_root_is_transitional() -> None:
    ctl = "<controller type='pci' index='0' model='pci-root'/>"
    disk = f"<disk type='file' device='disk'><target dev='vda' bus='virtio'/>{addr(0, 4)}</disk>"
    assert one(disk, ctl) == VirtioDevice("/domain/devices/disk[1]", "blk", "transitional")


def test_explicit_model_wins_over_slot() -> None:
    found = virtio_devices_needing_drivers(
        domain(
            f"<disk type='file' device='disk' model='virtio-non-transitional'>"
            f"<target dev='vda' bus='virtio'/>{addr(2, 1)}</disk>"
            f"<disk type='file' device='disk' model='virtio-transitional'>"
            f"<target dev='vdb' bus='virtio'/>{addr(2, 2)}</disk>"
        )
    )
    assert [(d.xpath, d.mode) for d in found] == [
        ("/domain/devices/disk[1]", "modern"),
        ("/domain/devices/disk[2]", "transitional"),
    ]


def test_every_covered_element_kind() -> None:
    xml = domain(
        f"""
        <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
        <disk type='file' device='disk'><target dev='vda' bus='virtio'/>{addr(1)}</disk>
        <controller type='scsi' index='0' model='virtio-scsi'>{addr(3)}</controller>
        <controller type='scsi' index='1' model='lsilogic'>{addr(7, 2)}</controller>
        <controller type='virtio-serial' index='0' model='virtio-transitional'>{addr(2, 3)}</controller>
        <controller type='usb' index='0' model='qemu-xhci'>{addr(5)}</controller>
        <interface type='user'><model type='e1000e'/>{addr(5)}</interface>
        <interface type='user'><model type='virtio-non-transitional'/>{addr(2, 4)}</interface>
        <input type='tablet' bus='usb'/>
        <input type='keyboard' bus='virtio'>{addr(6, 5)}</input>
        <video><model type='virtio' heads='1' primary='yes'/>{addr(0, 1)}</video>
        <video><model type='qxl'/>{addr(0, 2)}</video>
        <memballoon model='virtio'>{addr(7, 6)}</memballoon>
        <rng model='virtio'><backend model='random'>/dev/urandom</backend>{addr(1)}</rng>
        """
    )
    got = [(d.kind, d.mode) for d in virtio_devices_needing_drivers(xml)]
    assert got == [
        ("blk", "modern"),
        ("scsi", "modern"),
        ("console", "transitional"),
        ("net", "modern"),
        ("input", "modern"),  # virtio-input is modern even in a conventional PCI slot
        ("gpu", "modern"),  # so is virtio-gpu, even on the root complex
        ("balloon", "transitional"),
        ("rng", "modern"),
    ]


def test_memballoon_none_and_missing_model_are_not_virtio() -> None:
    assert virtio_devices_needing_drivers(domain("<memballoon model='none'/>")) == []
    assert virtio_devices_needing_drivers(domain("<controller type='scsi' index='0'/>")) == []


def test_plain_virtio_without_address_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="without a PCI address"):
        virtio_devices_needing_drivers(domain("<interface type='user'><model type='virtio'/></interface>"))


def test_unknown_bus_is_refused() -> None:
    with pytest.raises(ValueError, match="bus 9"):
        virtio_devices_needing_drivers(domain(f"<memballoon model='virtio'>{addr(9)}</memballoon>"))


LEGACY_ONLY = {pci_id_url(d) for d in ("1000", "1001", "1002", "1003", "1004", "1005")}
MODERN_ONLY = {pci_id_url(d) for d in ("1041", "1042", "1043", "1044", "1045", "1048", "1050", "1052")}


@pytest.mark.parametrize("kind", ["net", "blk", "scsi", "balloon", "rng", "console"])
def test_transitional_needs_either_driver_modern_needs_10(kind: str) -> None:
    transitional = VirtioDevice("/x", kind, "transitional")  # type: ignore[arg-type]
    modern = VirtioDevice("/x", kind, "modern")  # type: ignore[arg-type]
    assert guest_can_drive(transitional, LEGACY_ONLY)
    assert guest_can_drive(transitional, MODERN_ONLY)
    assert not guest_can_drive(modern, LEGACY_ONLY)
    assert guest_can_drive(modern, MODERN_ONLY)
    assert not guest_can_drive(transitional, set())


def test_gpu_and_input_have_no_legacy_driver() -> None:
    for kind in ("gpu", "input"):
        dev = VirtioDevice("/x", kind, "modern")  # type: ignore[arg-type]
        assert not guest_can_drive(dev, LEGACY_ONLY)
        assert guest_can_drive(dev, MODERN_ONLY)


def test_ids_match_osinfo_spelling_exactly() -> None:
    blk = VirtioDevice("/x", "blk", "modern")
    assert guest_can_drive(blk, {"http://pcisig.com/pci/1af4/1042"})
    assert not guest_can_drive(blk, {"http://pcisig.com/pci/1af4/1041"})  # net, not blk
    assert not guest_can_drive(blk, {"http://pcisig.com/pci/1b36/1042"})  # wrong vendor


def test_virtio_ccw_is_transitional_and_virtio_mmio_legacy() -> None:
    """Off PCI the transport decides: CCW negotiates the revision, virtio-mmio is legacy only; virtio-gpu and
    virtio-input stay modern on CCW (they force virtio 1.0 on every transport)."""
    ccw = "<address type='ccw' cssid='0xfe' ssid='0x0' devno='0x0001'/>"
    s390 = "<controller type='pci' index='0' model='pci-root'/>"
    assert one(f"<interface type='user'><model type='virtio'/>{ccw}</interface>", s390).mode == "transitional"
    assert one(f"<video><model type='virtio'/>{ccw}</video>", s390).mode == "modern"
    mmio = one("<disk type='file' device='disk'><target dev='vda' bus='virtio'/><address type='virtio-mmio'/></disk>")
    assert (mmio.kind, mmio.mode) == ("blk", "legacy")
    assert guest_can_drive(mmio, LEGACY_ONLY)
    assert not guest_can_drive(mmio, MODERN_ONLY)
