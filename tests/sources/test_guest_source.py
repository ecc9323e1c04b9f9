"""sources.guest alone: what the guest OS has no driver for, hard when strict and soft when lenient."""

from __future__ import annotations

import pytest
from support import one_source, partial_domain

from virtpolicy.core.problem import Source, Strength
from virtpolicy.sources.guest import GUEST_LENIENT_PRIORITY

DISK = "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/a.qcow2'/><target dev='vda'/></disk>"


def test_rhel5_has_no_modern_virtio_driver(host, osdb) -> None:
    _, added = one_source(partial_domain("g", None, None, DISK), "guest", host, osdb, "rhel5.11")
    assert added
    assert all(c.provenance.source is Source.GUEST and c.strength is Strength.HARD for c in added)
    modern = [c for c in added if "virtio 1.0" in c.message]
    assert modern, [c.message for c in added]
    assert dict(modern[0].provenance.data)["short_id"] == "rhel5.11"


def test_a_modern_guest_constrains_no_virtio_disk(host, osdb) -> None:
    _, added = one_source(partial_domain("g", None, None, DISK), "guest", host, osdb, "rhel9.0")
    assert not [c for c in added if "disk[0]" in " ".join(c.variables)]


def test_lenient_guest_support_is_soft_above_the_engine_defaults(host, osdb) -> None:
    xml = partial_domain("g", None, None, DISK)
    _, added = one_source(xml, "guest", host, osdb, "rhel5.11", guest_support="lenient")
    assert added
    assert all(c.strength is Strength.SOFT and c.priority == GUEST_LENIENT_PRIORITY for c in added)


def test_no_guest_named_no_guest_constraints(host, osdb) -> None:
    ctx, added = one_source(partial_domain("g", None, None, DISK), "guest", host, osdb, "generic")
    assert not ctx.guest.described or added == [] or all(c.provenance.source is Source.GUEST for c in added)


def _solve_on(bundle: str, arch: str, os_key: str, devices: str):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from virtpolicy import Engine

    hosts = Path(__file__).resolve().parents[1] / "data" / "hosts"
    xml = (
        "<domain><name>v</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os><type arch='{arch}'>hvm</type></os><devices>{devices}</devices></domain>"
    )
    return Engine(host=hosts / bundle).solve(xml, os=os_key)


def test_an_arm_guest_without_virtio_gpu_gets_the_firmwares_ramfb_not_vga() -> None:
    """AAVMF drives virtio-gpu and ramfb only (catalog.toml, engine.video-virt): VGA would be dark until the kernel."""
    result = _solve_on("tcg-aarch64", "aarch64", "generic", "<graphics type='vnc'/>")
    assert result.feasible, result.summary()
    assert result.assignment["video.model"] == "ramfb"
    assert result.decisions and any(d.variable == "video.slot" and d.value == "none" for d in result.decisions)


@pytest.mark.parametrize(("bundle", "arch"), [("tcg-riscv64", "riscv64"), ("tcg-ppc64le", "ppc64le")])
def test_ramfb_is_not_assumed_without_uefi(bundle: str, arch: str) -> None:
    """OpenSBI and SLOF set no ramfb up: an app's ramfb there is a guest conflict (riscv64) or a domcaps one."""
    result = _solve_on(bundle, arch, "generic", "<graphics type='vnc'/><video><model type='ramfb'/></video>")
    assert not result.feasible
    kinds = {m.kind for c in result.conflicts for m in c.members}
    assert kinds & {"guest", "host"}, [str(m) for c in result.conflicts for m in c.members]
    if arch == "riscv64":
        assert any("no driver for ramfb" in m.message for c in result.conflicts for m in c.members)


SCSI_DISK = "<disk type='file' device='disk'><source file='/i/a.qcow2'/><target dev='sda' bus='scsi'/></disk>"


def test_a_pseries_guest_without_virtio_scsi_gets_ibmvscsi() -> None:
    """libvirt's own pseries default, which every Linux for POWER drives; virtio-scsi wherever the guest has it."""
    plain = _solve_on("tcg-ppc64le", "ppc64le", "generic", SCSI_DISK)
    assert plain.feasible, plain.summary()
    assert plain.assignment["scsi.model"] == "ibmvscsi" and plain.assignment["scsi.slot"] == "none"
    rhel = _solve_on("tcg-ppc64le", "ppc64le", "rhel9.0", SCSI_DISK)
    assert rhel.assignment["scsi.model"] == "virtio-scsi"


def test_the_engines_scsi_controller_has_a_slot_of_its_own_on_q35() -> None:
    """It used to be added after the topology, and libvirt then put it on the root port kept for hot-plug."""
    from lxml import etree

    from virtpolicy import Engine

    xml = (
        "<domain type='kvm'><name>s</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{SCSI_DISK}</devices></domain>"
    )
    result = Engine().solve(xml, os="rhel9.0")
    assert result.feasible, result.summary()
    root = etree.fromstring(result.xml.encode())
    scsi = root.find("devices/controller[@type='scsi']")
    assert scsi is not None and scsi.get("model") == "virtio-scsi" and scsi.find("address[@type='pci']") is not None
    ports = {int(c.get("index")) for c in root.iterfind("devices/controller[@model='pcie-root-port']")}
    used = {int(a.get("bus"), 16) for a in root.iterfind("devices/*/address[@type='pci']")}
    assert len(ports - used) == int(result.assignment["hotplug.ports"]) >= 1


def test_no_scsi_controller_without_a_scsi_disk() -> None:
    result = _solve_on("tcg-ppc64le", "ppc64le", "rhel9.0", "")
    assert result.assignment["scsi.model"] == "none" and 'type="scsi"' not in (result.xml or "")
