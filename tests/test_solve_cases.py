"""The cases the project exists for, solved in-process against the real osinfo-db and the embedded host."""

from __future__ import annotations

from lxml import etree
from support import assert_minimal, partial_domain, run

DISK = "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/d.qcow2'/></disk>"
NIC = "<interface type='network'><source network='default'/></interface>"


def _root(xml: bytes) -> etree._Element:
    return etree.fromstring(xml)


def test_rhel6_on_required_q35_gets_transitional_virtio(host, osdb):
    out = run(partial_domain("r6", "http://redhat.com/rhel/6.10", "q35", DISK + NIC), host, osdb)
    assert out.solved, out.describe()
    root = _root(out.xml)
    assert root.find("os/type").get("machine") == "pc-q35-7.2"
    disk = root.find("devices/disk")
    assert disk.find("target").get("bus") == "virtio"
    assert disk.get("model") == "virtio-transitional"
    assert root.find("devices/interface/model").get("type") == "virtio-transitional"
    # the guest agent rides on a transitional virtio-serial controller; RHEL 6 ships virtio_balloon (osinfo-db
    # does not say so, osinfo-supplement.toml does), but no virtio-rng driver
    assert root.find("devices/controller[@type='virtio-serial']").get("model") == "virtio-transitional"
    assert root.find("devices/memballoon").get("model") == "virtio-transitional"
    assert root.find("devices/rng") is None


def test_rhel6_machine_left_open_still_drivable(host, osdb):
    out = run(partial_domain("r6", "http://redhat.com/rhel/6.10", None, DISK + NIC), host, osdb)
    assert out.solved
    assert out.value("machine") == "q35"
    assert out.value("disk[0].model") == "virtio-transitional"


def test_rhel6_on_pc_keeps_plain_virtio(host, osdb):
    out = run(partial_domain("r6", "http://redhat.com/rhel/6.10", "pc", DISK + NIC), host, osdb)
    assert out.value("disk[0].model") == "virtio"  # transitional on conventional PCI by itself
    assert out.value("interface[0].model") == "virtio"


def test_modern_linux_gets_plain_virtio_everywhere(host, osdb):
    out = run(partial_domain("f", "http://fedoraproject.org/fedora/37", None, DISK + NIC), host, osdb)
    for var in ("disk[0].model", "interface[0].model", "memballoon.model", "rng.model", "video.model"):
        assert out.value(var) == "virtio", var
    assert out.value("usb.model") == "qemu-xhci"


def test_windows_without_virtio_drivers_gets_sata_and_e1000e(host, osdb):
    out = run(partial_domain("w", "http://microsoft.com/win/10", None, DISK + NIC), host, osdb)
    assert out.value("machine") == "q35"
    assert out.value("disk[0].bus") == "sata"
    assert out.value("interface[0].model") == "e1000e"
    assert out.value("memballoon.model") == "none"
    assert out.value("clock.offset") == "localtime"
    root = _root(out.xml)
    hyperv = root.find("features/hyperv")
    # the embedded host's domcaps list only spinlocks and vendor_id: relaxed/vapic would abort QEMU
    assert [child.tag for child in hyperv] == ["spinlocks"]
    assert hyperv.find("spinlocks").get("retries") == "8191"
    assert root.find("clock/timer[@name='hypervclock']") is None


def test_windows_explicit_virtio_disk_is_a_conflict(host, osdb):
    disk = "<disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    out = run(partial_domain("w", "http://microsoft.com/win/10", None, disk), host, osdb)
    assert not out.solved
    ids = {m.id for m in out.result.members}
    assert ids == {"app:/domain/devices/disk[1]/target/@bus", "guest:disk[0].bus=virtio"}
    assert_minimal(out, only_conflict=True)


def test_windows_lenient_guest_support_accepts_virtio(host, osdb):
    disk = "<disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda' bus='virtio'/></disk>"
    out = run(partial_domain("w", "http://microsoft.com/win/10", None, disk), host, osdb, guest_support="lenient")
    assert out.solved
    assert out.value("disk[0].bus") == "virtio"
    assert out.value("interface[0].model") if "interface[0].model" in out.result.assignment else True


def test_rhel5_forced_to_q35_is_a_two_member_conflict(host, osdb):
    out = run(partial_domain("r5", "http://redhat.com/rhel/5.11", "q35", DISK), host, osdb)
    assert not out.solved
    members = out.result.members
    assert {m.provenance.source.value for m in members} == {"app", "guest"}
    assert any(m.provenance.where == "/domain/os/type/@machine" for m in members)
    assert any("does not support the q35 chipset" in m.message for m in members)
    assert_minimal(out, only_conflict=True)


def test_windows_xp_lands_on_pc_with_ide_and_e1000(host, osdb):
    out = run(partial_domain("xp", "http://microsoft.com/win/xp", None, DISK + NIC), host, osdb)
    assert out.value("machine") == "pc"
    assert out.value("disk[0].bus") == "ide"
    assert out.value("interface[0].model") == "e1000"


def test_windows_xp_explicit_sata_conflicts_with_missing_ahci_driver(host, osdb):
    disk = "<disk type='file' device='disk'><source file='/x.qcow2'/><target dev='sda' bus='sata'/></disk>"
    out = run(partial_domain("xp", "http://microsoft.com/win/xp", None, disk), host, osdb)
    assert not out.solved
    assert any("AHCI" in m.message for m in out.result.members)
    assert_minimal(out)


def test_windows_11_gets_uefi_and_tpm(host, osdb):
    out = run(partial_domain("w11", "http://microsoft.com/win/11", None, DISK), host, osdb)
    assert out.value("firmware") == "efi"
    assert out.value("tpm.model") == "tpm-crb"
    root = _root(out.xml)
    assert root.find("os").get("firmware") == "efi"
    assert root.find("devices/tpm/backend").get("type") == "emulator"
    assert root.find("devices/tpm/backend").get("version") == "2.0"


def test_secure_boot_on_pc_is_a_conflict(host, osdb):
    extra = ""
    xml = partial_domain("sb", "http://fedoraproject.org/fedora/37", "pc", DISK, extra)
    xml = xml.replace("<os>", "<os firmware='efi'>").replace(
        "</type>", "</type><firmware><feature enabled='yes' name='secure-boot'/></firmware>"
    )
    out = run(xml, host, osdb)
    assert not out.solved
    assert_minimal(out)


def test_secure_boot_on_q35_adds_smm(host, osdb):
    xml = partial_domain("sb", "http://fedoraproject.org/fedora/37", None, DISK)
    xml = xml.replace("<os>", "<os firmware='efi'>").replace(
        "</type>", "</type><firmware><feature enabled='yes' name='secure-boot'/></firmware>"
    )
    out = run(xml, host, osdb)
    assert out.value("machine") == "q35"
    assert _root(out.xml).find("features/smm").get("state") == "on"


def test_app_values_are_kept_and_versioned_machine_survives(host, osdb):
    devices = DISK + "<interface type='user'><model type='rtl8139'/></interface><graphics type='vnc'/>"
    out = run(partial_domain("k", "http://fedoraproject.org/fedora/37", "pc-q35-6.2", devices), host, osdb)
    root = _root(out.xml)
    assert root.find("os/type").get("machine") == "pc-q35-6.2"
    assert root.find("devices/interface/model").get("type") == "rtl8139"
    assert root.find("devices/graphics").get("type") == "vnc"


def test_unknown_versioned_machine_is_a_host_conflict(host, osdb):
    out = run(partial_domain("k", "http://fedoraproject.org/fedora/37", "pc-q35-99.0", DISK), host, osdb)
    assert not out.solved
    assert {m.provenance.source.value for m in out.result.members} == {"app", "host"}
    assert len(out.result.members) == 2
    assert_minimal(out, only_conflict=True)


def test_too_many_ide_disks_on_pc_is_a_capacity_conflict(host, osdb):
    disks = "".join(
        f"<disk type='file' device='disk'><source file='/d{i}.img'/><target bus='ide'/></disk>" for i in range(5)
    )
    out = run(partial_domain("ide", "http://microsoft.com/win/xp", None, disks), host, osdb)
    assert not out.solved
    assert any(m.id.startswith("structural:ide") for m in out.result.background) or len(out.result.members) >= 5
    assert_minimal(out)


def test_solving_is_deterministic_and_idempotent(host, osdb):
    xml = partial_domain("r6", "http://redhat.com/rhel/6.10", "q35", DISK + NIC + DISK)
    first = run(xml, host, osdb)
    assert run(xml, host, osdb).xml == first.xml
    again = run(first.xml, host, osdb)
    assert again.xml == first.xml


def test_engine_record_is_written_and_preserved(host, osdb):
    first = run(partial_domain("f", "http://fedoraproject.org/fedora/37", None, DISK), host, osdb)
    ns = {"vp": "http://virtpolicy.org/xmlns/domain/1.0"}
    record = _root(first.xml).find("metadata/vp:policy", ns)
    decisions = {d.get("variable"): d.get("reason") for d in record.findall("vp:decision", ns)}
    assert decisions["machine"].startswith("engine.machine")
    again = run(first.xml, host, osdb)
    record2 = _root(again.xml).find("metadata/vp:policy", ns)
    assert {d.get("variable"): d.get("reason") for d in record2.findall("vp:decision", ns)} == decisions


def test_app_metadata_and_unknown_elements_survive(host, osdb):
    extra = "<metadata><app:info xmlns:app='urn:example:app'>keep me</app:info></metadata>"
    xml = partial_domain("m", "http://fedoraproject.org/fedora/37", None, DISK + "<watchdog model='i6300esb'/>")
    xml = xml.replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu>" + extra) if "<metadata>" not in xml else xml
    xml = xml.replace("<metadata>", "<metadata><app:info xmlns:app='urn:example:app'>keep me</app:info>", 1)
    out = run(xml, host, osdb)
    root = _root(out.xml)
    assert root.find("metadata/{urn:example:app}info").text == "keep me"
    assert root.find("devices/watchdog").get("model") == "i6300esb"
