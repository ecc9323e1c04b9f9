"""Prove the real stack works here before any conformance test relies on it.

Each domain is hand-written (no engine involved), so a failure points at the machine or the
harness, not at virtpolicy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from guest_driver_oracle import virtio_devices_needing_drivers
from libvirt_harness import LibvirtError, LibvirtHarness
from lxml import etree

pytestmark = pytest.mark.libvirt


def q35_domain(
    name: str, os_attrs: str = "", firmware: str = "", features: str = "", devices: str = ""
) -> str:
    """A small q35 guest; the disk path is deliberately foreign so the harness must relocate it."""
    return f"""
<domain type='kvm'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os{os_attrs}><type arch='x86_64' machine='q35'>hvm</type>{firmware}</os>
  <features><acpi/>{features}</features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio-transitional'/></interface>
    <graphics type='vnc'/>
    {devices}
  </devices>
</domain>
"""


def pci_ids(info_pci: str) -> list[str]:
    return re.findall(r"PCI device ([0-9a-f]{4}:[0-9a-f]{4})", info_pci)


def controller_model(root: etree._Element, bus: str) -> str | None:
    for c in root.iterfind("devices/controller[@type='pci']"):
        if int(c.get("index", "-1")) == int(bus, 0):
            return c.get("model")
    return None


def test_virtio_transitional_nic_lands_behind_pcie_to_pci_bridge(
    libvirt: LibvirtHarness, tmp_path: Path
) -> None:
    result = libvirt.define_and_start(q35_domain("vp-test-virtio"), tmp_path)

    ids = pci_ids(result.info_pci)
    assert "1af4:1000" in ids, result.info_pci  # transitional NIC shows the legacy device id
    assert "1af4:1042" in ids, result.info_pci  # plain virtio disk on a root port is modern
    assert "1b36:000e" in ids, result.info_pci  # the pcie-to-pci-bridge libvirt added

    live = etree.fromstring(result.live_xml.encode())
    nic_addr = live.find("devices/interface/address")
    assert nic_addr is not None
    assert controller_model(live, nic_addr.get("bus", "")) == "pcie-to-pci-bridge"

    kinds = {d.kind: d.mode for d in virtio_devices_needing_drivers(result.live_xml)}
    assert kinds["net"] == "transitional"
    assert kinds["blk"] == "modern"
    # The disk image was created inside the test's tmp dir, not under /var/lib/libvirt.
    assert (tmp_path / "vp-test-virtio.qcow2").is_file()
    assert live.get("type") == ("kvm" if libvirt.kvm_usable() else "qemu")


def test_uefi_with_tpm_crb_emulator_starts(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    tpm = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
    xml = q35_domain("vp-test-uefi-tpm", " firmware='efi'", devices=tpm)
    result = libvirt.define_and_start(xml, tmp_path)
    live = etree.fromstring(result.live_xml.encode())
    # libvirt 9.0 resolves firmware='efi' only at start: the inactive XML has no <loader>.
    assert etree.fromstring(result.inactive_xml.encode()).find("os/loader") is None
    assert "OVMF" in (live.findtext("os/loader") or "")
    backend = live.find("devices/tpm/backend")
    assert backend is not None and backend.get("type") == "emulator"
    assert "1af4:1042" in pci_ids(result.info_pci)  # OVMF numbered the bridges: the guest really ran


def test_uefi_secure_boot_with_enrolled_keys_starts(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    firmware = (
        "<firmware><feature enabled='yes' name='secure-boot'/>"
        "<feature enabled='yes' name='enrolled-keys'/></firmware>"
    )
    xml = q35_domain("vp-test-secboot", " firmware='efi'", firmware, features="<smm state='on'/>")
    result = libvirt.define_and_start(xml, tmp_path)
    loader = etree.fromstring(result.live_xml.encode()).find("os/loader")
    assert loader is not None and loader.get("secure") == "yes", result.live_xml
    assert "1af4:1042" in pci_ids(result.info_pci)


def test_define_error_carries_libvirts_text(libvirt: LibvirtHarness) -> None:
    bad = q35_domain("vp-test-bad").replace("bus='virtio'/>", "bus='ide'/>")  # q35 has no IDE bus
    with pytest.raises(LibvirtError) as err:
        libvirt.define(bad)
    assert "IDE controllers are unsupported" in err.value.message


def test_runnable_here_reports_every_change(libvirt: LibvirtHarness) -> None:
    xml = q35_domain("vp-test-cpu").replace(
        "<vcpu>1</vcpu>", "<vcpu>1</vcpu><cpu mode='host-passthrough'/>"
    )
    adapted, notes = libvirt.runnable_here(xml)
    root = etree.fromstring(adapted.encode())
    assert root.find("cpu") is None
    assert any("host-passthrough" in n for n in notes)
    assert libvirt.runnable_here(adapted) == (adapted, [])


def test_oracle_modes_match_the_device_ids_qemu_exposes(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    """Plain virtio on the root complex keeps legacy (1af4:1000); on a root port it is modern."""
    nic = (
        "<interface type='user'><model type='virtio'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></interface>"
    )
    result = libvirt.define_and_start(q35_domain("vp-test-oracle", devices=nic), tmp_path)
    modes = {d.xpath: d.mode for d in virtio_devices_needing_drivers(result.live_xml)}
    ids = pci_ids(result.info_pci)
    # interface[1] is the template's virtio-transitional NIC, interface[2] the plain one on pcie-root.
    assert modes["/domain/devices/interface[2]"] == "transitional"
    assert ids.count("1af4:1000") == 2, result.info_pci
    assert modes["/domain/devices/disk[1]"] == "modern" and "1af4:1042" in ids  # on a pcie-root-port
