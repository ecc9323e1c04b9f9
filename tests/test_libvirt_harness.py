"""Prove the real stack works here before any conformance test relies on it.

Each domain is hand-written (no engine involved), so a failure points at the machine or the
harness, not at virtpolicy.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from guest_driver_oracle import virtio_devices_needing_drivers
from libvirt_harness import (
    CAPS_CACHE,
    LibvirtError,
    LibvirtHarness,
    display_ports,
    pid_alive,
    private_tree,
    reap_stale_trees,
    seed_capabilities_cache,
)
from lxml import etree

pytestmark = pytest.mark.libvirt


def q35_domain(name: str, os_attrs: str = "", firmware: str = "", features: str = "", devices: str = "") -> str:
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


def test_virtio_transitional_nic_lands_behind_pcie_to_pci_bridge(libvirt: LibvirtHarness, tmp_path: Path) -> None:
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
        "<firmware><feature enabled='yes' name='secure-boot'/><feature enabled='yes' name='enrolled-keys'/></firmware>"
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
    xml = q35_domain("vp-test-cpu").replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><cpu mode='host-passthrough'/>")
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


# ------------------------------------------- a machine that already runs libvirtd (issue 9)

SYSTEM_URI = "qemu:///system"


def system_virsh(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """virsh against the machine's own daemon (never the harness's)."""
    return subprocess.run(
        ["virsh", "-q", "-c", SYSTEM_URI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@contextmanager
def libvirt_users_daemon(workdir: Path) -> Iterator[bool]:
    """A system libvirtd as a libvirt user's machine runs it: QEMU as ``libvirt-qemu``, dynamic_ownership.

    It is the real ``qemu:///system`` daemon (socket, state, pid file, logs at their usual paths);
    only its ``/etc/libvirt`` is bind-mounted, in a mount namespace of its own, from a directory with
    Debian's libvirt-daemon-system settings (plus ``stdio_handler = "file"``: no virtlogd to start),
    so the machine's qemu.conf is never edited and nothing is left to restore even if this process
    is killed.  As on such a machine (``/dev/kvm`` is ``root:kvm 0660`` there) its QEMU may use KVM:
    here ``/dev/kvm`` is root-only, so the namespace sees a copy of the device node that
    ``libvirt-qemu`` may open.  Without it libvirt 9.0 finds KVM "enabled when probing, but not
    available now" and probes QEMU again on every lookup (a define took 60 s).  Its QEMU capabilities
    cache (``/var/cache/libvirt``) is a private copy seeded from the harness daemons' (libvirt_harness
    CAPS_CACHE, which libvirt re-validates entry by entry): probing the 27 emulators afresh took 45 s of
    the 60 s it has to answer, and the machine's own cache is left alone.  Yields True when this
    context started the daemon, False when a system daemon was already running (then it is used as
    it is and left running).
    """
    if system_virsh("version", timeout=15).returncode == 0:
        yield False
        return
    LibvirtHarness.ensure_qemu_account()
    etc = workdir / "etc-libvirt"
    etc.mkdir()
    (etc / "qemu.conf").write_text(
        'user = "libvirt-qemu"\ngroup = "libvirt-qemu"\ndynamic_ownership = 1\nstdio_handler = "file"\n'
    )
    (etc / "libvirtd.conf").write_text('auth_unix_rw = "none"\n')
    dirs = (Path("/etc/libvirt"), Path("/run/libvirt"), Path("/var/lib/libvirt"), Path("/var/log/libvirt"))
    for d in (*dirs, Path("/var/cache/libvirt")):
        d.mkdir(parents=True, exist_ok=True)
    cache = workdir / "cache-libvirt"
    seed_capabilities_cache(cache / "qemu" / "capabilities")
    kvm = ""
    if Path("/dev/kvm").exists():
        node = workdir / "kvm"
        os.mknod(node, stat.S_IFCHR | 0o660, os.stat("/dev/kvm").st_rdev)
        os.chown(node, 0, pwd.getpwnam("libvirt-qemu").pw_gid)
        node.chmod(0o660)  # mknod's mode went through the umask
        kvm = str(node)
    script = (
        'mount --bind "$1" /etc/libvirt && mount --bind "$3" /var/cache/libvirt && '
        '{ [ -z "$2" ] || mount --bind "$2" /dev/kvm; } && exec libvirtd'
    )
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(etc), kvm, str(cache)]
    with (workdir / "system-libvirtd.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while system_virsh("version", timeout=15).returncode != 0:
            assert proc.poll() is None, (workdir / "system-libvirtd.log").read_text()
            assert time.monotonic() < deadline, "the system libvirtd did not answer within 60 s"
            time.sleep(0.25)
        yield True
    finally:
        for name in system_virsh("list", "--name").stdout.split():
            system_virsh("destroy", name)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            pidfile = Path("/run/libvirtd.pid")  # a killed daemon leaves it; a later libvirtd would trip on it
            if pidfile.exists() and pidfile.read_text().strip() == str(proc.pid):
                pidfile.unlink()


def test_suite_runs_beside_a_libvirt_qemu_system_daemon(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    """Issue 9: with the machine's libvirtd running QEMU as libvirt-qemu, harness domains still start.

    The first half proves the situation is the real one: that daemon cannot start a domain whose
    image the harness made in pytest's 0700 tmp dir (what 378 tests hit when the harness reused it).
    The second half starts the same kind of domain through a harness started after it.
    """
    with libvirt_users_daemon(tmp_path) as started_here:
        if started_here:
            control = libvirt.prepare_disk_sources(q35_domain("vp-test-sysdaemon"), tmp_path / "system")
            (tmp_path / "control.xml").write_text(control)
            assert system_virsh("define", str(tmp_path / "control.xml")).returncode == 0
            try:
                refused = system_virsh("start", "vp-test-sysdaemon", timeout=120)
            finally:
                system_virsh("destroy", "vp-test-sysdaemon")
                system_virsh("undefine", "vp-test-sysdaemon", "--nvram")
            qemu_uid = pwd.getpwnam("libvirt-qemu").pw_uid
            assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused.stderr
            assert f"uid:{qemu_uid}" in refused.stderr, refused.stderr

        harness = LibvirtHarness(private_tree("beside-system-daemon"))
        harness.start()
        try:
            xml = harness.prepare_disk_sources(q35_domain("vp-test-beside"), tmp_path / "harness")
            xml, _notes = harness.runnable_here(xml)
            harness.define(xml)
            try:
                harness.start_domain("vp-test-beside")
                harness.check_running("vp-test-beside")  # running, not paused
                live = etree.fromstring(harness.virsh("dumpxml", "vp-test-beside").encode())
                assert "vp-test-beside" not in system_virsh("list", "--all", "--name").stdout
            finally:
                harness.destroy("vp-test-beside")
                harness.undefine("vp-test-beside")
        finally:
            harness.stop()

        disk = live.find("devices/disk/source")
        assert disk is not None and Path(disk.get("file", "")).parent == tmp_path / "harness"
        assert live.findtext("seclabel[@model='dac']/label") == "+0:+0"  # the harness's QEMU is root
        assert live.get("type") == ("kvm" if harness.kvm_usable() else "qemu")
        lo, hi = display_ports(harness.tree)  # its own VNC ports: no race with other daemons' guests
        assert lo <= int(live.find("devices/graphics").get("port", "0")) <= hi
        assert not harness.tree.exists()
        if started_here:
            assert system_virsh("version").returncode == 0  # the machine's daemon was left alone
    assert libvirt.virsh("version")  # and so was the session's harness daemon


def test_a_killed_runs_daemon_is_reaped_by_the_next_start(libvirt: LibvirtHarness) -> None:
    """A run killed before stop() leaves a root libvirtd behind; the next harness start must end it."""
    script = (
        "import os, sys\n"
        "from libvirt_harness import LibvirtHarness, private_tree\n"
        "h = LibvirtHarness(private_tree('killed'))\n"
        "h.start()\n"
        "print(h.tree, flush=True)\n"
        "os._exit(0)  # as if killed: no stop()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent
    )
    assert done.returncode == 0, done.stderr
    tree = Path(done.stdout.strip())
    pid = int((tree / "libvirtd.pid").read_text())
    assert pid_alive(pid)  # the orphan daemon really outlived its owner
    reap_stale_trees()
    assert not tree.exists() and not pid_alive(pid)
    assert libvirt.virsh("version")  # a live owner's daemon is never reaped


def test_a_new_daemon_reuses_the_probed_qemu_capabilities(libvirt: LibvirtHarness) -> None:
    """The run's daemons share QEMU's probed capabilities (CAPS_CACHE): a daemon started from the cache
    answers without probing the 27 emulators again, and libvirt reports the same guests as the first one."""
    assert sorted(p.name for p in CAPS_CACHE.glob("*.xml")), "the session daemon saved no capabilities"
    seeded = {p.name: p.read_bytes() for p in CAPS_CACHE.glob("*.xml")}
    harness = LibvirtHarness(private_tree("seeded"))
    started = time.monotonic()
    harness.start()
    try:
        took = time.monotonic() - started
        after = {p.name: p.read_bytes() for p in (harness.tree / "cache" / "qemu" / "capabilities").glob("*.xml")}
        guests = etree.fromstring(harness.virsh("capabilities").encode()).findall("guest")
        expected = etree.fromstring(libvirt.virsh("capabilities").encode()).findall("guest")
    finally:
        harness.stop()
    assert after == seeded, "libvirt probed again: a cache entry was rewritten"
    assert [etree.tostring(g) for g in guests] == [etree.tostring(g) for g in expected]
    assert took < 20, f"a seeded daemon took {took:.1f} s to answer"
