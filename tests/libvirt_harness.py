"""A real libvirtd + QEMU for the test-suite.

The engine's promise is "libvirt accepts it and QEMU starts it"; only a real daemon can check that, so
the conformance tests drive one through ``virsh``.  This module owns everything about *this* machine
(how to get a daemon running as root without systemd, nested-virt quirks, missing disk images) so that
tests stay about the engine.  Every subprocess has a timeout: a wedged daemon must fail a test, never
hang CI.

Facts this module encodes (Debian 12, libvirt 9.0, QEMU 7.2, no systemd, nested virtualisation):

* Debian's ``libvirt-daemon-driver-qemu`` ships neither ``/etc/libvirt/qemu.conf`` nor the
  ``libvirt-qemu`` account (``libvirt-daemon-system`` does, and it wants systemd).  The QEMU driver
  resolves its compiled-in default ``libvirt-qemu:libvirt-qemu`` *before* reading qemu.conf, so
  without that user and group the driver fails to initialise ("Failed to parse user
  'libvirt-qemu'") even when qemu.conf says ``user = "root"``.
* ``/dev/kvm`` is ``root:root 0600`` here, so QEMU has to run as root (qemu.conf) to use KVM.
* Under KVM, ``<cpu mode='host-passthrough'>`` and ``host-model`` abort QEMU at start
  (``kvm_buf_set_msrs`` assertion on MSR 0x10a); TCG refuses ``host-passthrough``.
* /dev/kvm here is PVM (``kvm_pvm`` module, KVM inside a VM without hardware virtualisation).
  It has no SMM ("System Management Mode not supported by this hypervisor", which kills every
  secure-boot OVMF, and plain ``firmware='efi'`` too because libvirt's auto-selection picks the
  secure-boot build first), and even OVMF without SMM dies in its SEC phase ("KVM internal error.
  Suberror: 1 ... emulation failure" on an x87 FNINIT) while libvirt reports the start as a success
  and the domain sits "paused".  So UEFI/SMM guests run under TCG here, and every start is checked
  to leave the domain actually running.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
VIRTLOGD_SOCK = Path("/var/run/libvirt/virtlogd-sock")
DAEMON_LOG_DIR = Path("/var/log/libvirt")
# The QEMU driver's compiled-in default account on Debian (see module docstring).
QEMU_DEFAULT_ACCOUNT = "libvirt-qemu"

_UNNUMBERED_BRIDGE = re.compile(r"(?m)^\s*secondary bus 0\.\s*$")
_SCAN_IN_PROGRESS = re.compile(r"(?m)^\s*subordinate bus 255\.\s*$")  # the firmware is still numbering
_CPU_MODES_BROKEN_UNDER_KVM = frozenset({"host-passthrough", "host-model"})
_CPU_MODES_BROKEN_UNDER_TCG = frozenset({"host-passthrough"})


class LibvirtError(RuntimeError):
    """libvirt (or virsh) refused something; ``message`` is libvirt's own text for the report."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class StartResult:
    """Everything a conformance test may want to assert on after one real start."""

    inactive_xml: str
    live_xml: str
    info_pci: str
    adaptations: list[str] = field(default_factory=list)
    info_qtree: str = ""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _virsh_error_text(stderr: str) -> str:
    """Strip virsh's ``error:`` prefixes so messages compare equal to libvirt's error strings."""
    lines = [re.sub(r"^error:\s*", "", ln).strip() for ln in stderr.strip().splitlines()]
    return "\n".join(ln for ln in lines if ln)


class LibvirtHarness:
    """Starts (or reuses) libvirtd + virtlogd and runs domains through ``virsh``.

    Only daemons started by this object are stopped by :meth:`stop`, so a developer's own
    libvirtd survives a test run.
    """

    def __init__(
        self,
        uri: str = URI,
        ready_timeout: float = 30.0,
        command_timeout: float = 60.0,
        start_timeout: float = 180.0,
    ) -> None:
        self.uri = uri
        self.ready_timeout = ready_timeout
        self.command_timeout = command_timeout
        # TCG boots and swtpm set-up are slow; a start gets more time than a define.
        self.start_timeout = start_timeout
        self._started: list[subprocess.Popen[bytes]] = []
        self._undefine_flags: list[str] | None = None

    # ----------------------------------------------------------------- daemons

    def start(self) -> None:
        """Make ``virsh -c qemu:///system`` answer, starting daemons only if none answers."""
        if self._answers():
            return
        for d in (DAEMON_LOG_DIR, Path("/var/run/libvirt"), Path("/var/lib/libvirt")):
            d.mkdir(parents=True, exist_ok=True)
        self._ensure_qemu_account()
        self._ensure_qemu_runs_as_root()
        if not self._virtlogd_answers():
            self._spawn(["virtlogd"], DAEMON_LOG_DIR / "virtlogd-harness.log")
            self._wait_for(self._virtlogd_answers, "virtlogd", DAEMON_LOG_DIR / "virtlogd-harness.log")
        log = DAEMON_LOG_DIR / "libvirtd-harness.log"
        self._spawn(["libvirtd"], log)
        self._wait_for(self._answers, "libvirtd", log)

    def stop(self) -> None:
        """Stop the daemons this harness started (libvirtd first: it holds virtlogd's socket)."""
        for proc in reversed(self._started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._started.clear()

    def _spawn(self, argv: list[str], log: Path) -> None:
        # Foreground mode under Popen (not ``-d``) keeps the real pid, so stop() can end exactly it.
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._started.append(proc)

    def _wait_for(self, ready: Callable[[], bool], what: str, log: Path) -> None:
        proc = self._started[-1]
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc.poll() is not None:
                raise LibvirtError(f"{what} exited with status {proc.returncode}; log {log}:\n{_tail(log)}")
            time.sleep(0.25)
        raise LibvirtError(f"{what} did not answer within {self.ready_timeout:.0f} s; log {log}:\n{_tail(log)}")

    def _answers(self) -> bool:
        try:
            r = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0

    @staticmethod
    def _virtlogd_answers() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(str(VIRTLOGD_SOCK))
            except OSError:
                return False
        return True

    @staticmethod
    def _ensure_qemu_account() -> None:
        """Create the QEMU driver's compiled-in default account, without which it will not load."""
        try:
            grp.getgrnam(QEMU_DEFAULT_ACCOUNT)
        except KeyError:
            subprocess.run(["groupadd", "--system", QEMU_DEFAULT_ACCOUNT], check=True, timeout=30)
        try:
            pwd.getpwnam(QEMU_DEFAULT_ACCOUNT)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/var/lib/libvirt",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--gid",
                    QEMU_DEFAULT_ACCOUNT,
                    QEMU_DEFAULT_ACCOUNT,
                ],
                check=True,
                timeout=30,
            )

    @staticmethod
    def _ensure_qemu_runs_as_root() -> None:
        """QEMU must be root to open a root-only /dev/kvm; an admin's explicit choice is respected."""
        text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
        additions = [f'{key} = "root"\n' for key in ("user", "group") if not re.search(rf"(?m)^\s*{key}\s*=", text)]
        if additions:
            QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
            sep = "" if not text or text.endswith("\n") else "\n"
            marker = "# added by virtpolicy tests/libvirt_harness.py\n"
            QEMU_CONF.write_text(text + sep + marker + "".join(additions))

    # ------------------------------------------------------------------- virsh

    def virsh(self, *args: str, timeout: float | None = None) -> str:
        """Run one virsh command; libvirt's error text becomes a :class:`LibvirtError`."""
        argv = ["virsh", "-q", "-c", self.uri, *args]
        limit = self.command_timeout if timeout is None else timeout
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired as exc:
            raise LibvirtError(f"timed out after {limit:.0f} s: {' '.join(argv)}") from exc
        if r.returncode != 0:
            fallback = f"virsh exited {r.returncode}: {' '.join(argv)}"
            raise LibvirtError(_virsh_error_text(r.stderr) or fallback)
        return r.stdout

    @staticmethod
    def kvm_usable() -> bool:
        """True when QEMU (running as root) can use KVM; otherwise domains must fall back to TCG."""
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        os.close(fd)
        return True

    def define(self, xml: str) -> str:
        """Define from a file (as management apps do) and return libvirt's completed inactive XML."""
        name = _domain_name(xml)
        with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="virtpolicy-") as f:
            f.write(xml)
            f.flush()
            self.virsh("define", f.name)
        return self.virsh("dumpxml", "--inactive", name)

    def start_domain(self, name: str) -> None:
        self.virsh("start", name, timeout=self.start_timeout)

    def monitor(self, name: str, hmp_cmd: str) -> str:
        return self.virsh("qemu-monitor-command", name, "--hmp", hmp_cmd)

    def enumerated_info_pci(self, name: str, timeout: float = 60.0) -> str:
        """``info pci`` once the guest firmware has numbered the bridges.

        Right after start every bridge reports ``secondary bus 0`` and HMP lists nothing behind
        root ports or bridges (i.e. no virtio device on q35) until SeaBIOS/OVMF assigns bus
        numbers, so poll.  On timeout the last output is returned for the test to judge.
        """
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            out = self.monitor(name, "info pci")
            settled = not _UNNUMBERED_BRIDGE.search(out) and not _SCAN_IN_PROGRESS.search(out)
            if (settled and out == previous) or time.monotonic() > deadline:
                return out
            previous = out if settled else None
            time.sleep(0.3)

    def _check_running(self, name: str) -> None:
        """``virsh start`` succeeds even when the guest died at once (KVM emulation failure leaves
        the domain "paused"), so a test must not count that as a start."""
        state = self.virsh("domstate", "--reason", name).strip()
        if not state.startswith("running"):
            log = Path("/var/log/libvirt/qemu") / f"{name}.log"
            raise LibvirtError(f"domain {name} is '{state}' after start, not running; {log}:\n{_tail(log)}")

    def destroy(self, name: str) -> None:
        """Stop a domain; one that is not running is already in the wanted state."""
        try:
            self.virsh("destroy", name)
        except LibvirtError as exc:
            if "not running" not in exc.message:
                raise

    def undefine(self, name: str) -> None:
        """Remove a domain with its NVRAM and TPM state, which otherwise leak into /var/lib/libvirt."""
        self.virsh("undefine", name, *self._undefine_extra_flags())

    def _undefine_extra_flags(self) -> list[str]:
        if self._undefine_flags is None:
            try:
                help_text = self.virsh("help", "undefine")
            except LibvirtError:
                help_text = ""
            self._undefine_flags = [f for f in ("--nvram", "--tpm") if re.search(rf"{f}\b", help_text)]
        return self._undefine_flags

    # ------------------------------------------------------ machine adaptations

    def prepare_disk_sources(self, xml: str, workdir: Path) -> str:
        """Give every file-backed disk a real image inside ``workdir`` and empty every cdrom.

        Engine output names images the test machine does not have; creating them elsewhere than the
        test's tmp dir would leak files, so paths are rewritten (basename kept, made unique).
        """
        root = etree.fromstring(xml.encode())
        workdir.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for n, disk in enumerate(root.iterfind("devices/disk"), start=1):
            device = disk.get("device", "disk")
            source = disk.find("source")
            if device in ("cdrom", "floppy"):
                if source is not None:
                    disk.remove(source)
                continue
            if disk.get("type", "file") != "file" or device != "disk":
                continue
            if source is None:
                source = etree.Element("source")
                disk.insert(_index_after(disk, ("driver",)), source)
            target = disk.find("target")
            stem = target.get("dev") if target is not None and target.get("dev") else f"disk{n}"
            base = Path(source.get("file") or f"{stem}.img").name
            if base in used:
                base = f"{n}-{base}"
            used.add(base)
            path = workdir / base
            driver = disk.find("driver")
            fmt = driver.get("type") if driver is not None else None
            fmt = fmt if fmt in ("raw", "qcow2") else "qcow2"
            if not path.exists():
                _run(["qemu-img", "create", "-q", "-f", fmt, str(path), "64M"], timeout=30)
            source.set("file", str(path))
        return etree.tostring(root, encoding="unicode")

    def runnable_here(self, xml: str) -> tuple[str, list[str]]:
        """Changes needed only because of this test machine, each explained in a sentence.

        They are reported, never hidden: a conformance test that needed one says so.
        """
        root = etree.fromstring(xml.encode())
        notes: list[str] = []
        if root.get("type") == "kvm" and not self.kvm_usable():
            root.set("type", "qemu")
            notes.append(
                "KVM is not usable on this machine (/dev/kvm missing or not read/write): "
                "domain type 'kvm' changed to 'qemu' (TCG)."
            )
        if root.get("type") == "kvm" and _kvm_is_pvm():
            why_efi = _needs_uefi_or_smm(root)
            if why_efi:
                root.set("type", "qemu")
                notes.append(
                    f"{why_efi}: domain type 'kvm' changed to 'qemu' (TCG) because KVM here is PVM "
                    "(kvm_pvm), which has no SMM and on which OVMF dies with a KVM emulation failure."
                )
        virt_type = root.get("type")
        broken = _CPU_MODES_BROKEN_UNDER_KVM if virt_type == "kvm" else _CPU_MODES_BROKEN_UNDER_TCG
        cpu = root.find("cpu")
        mode = cpu.get("mode") if cpu is not None else None
        if cpu is not None and mode in broken:
            why = (
                "under KVM on this nested-virt machine QEMU aborts at start (kvm_buf_set_msrs, MSR 0x10a)"
                if virt_type == "kvm"
                else "TCG refuses it"
            )
            if cpu.find("numa") is None and cpu.find("topology") is None:
                root.remove(cpu)
                notes.append(f"<cpu mode='{mode}'> removed ({why}); QEMU's default CPU model is used.")
            else:
                for attr in ("mode", "match", "check", "migratable"):
                    cpu.attrib.pop(attr, None)
                for child in cpu.findall("model") + cpu.findall("feature") + cpu.findall("cache"):
                    cpu.remove(child)
                notes.append(
                    f"<cpu mode='{mode}'>: mode and model/feature/cache children removed ({why}); "
                    "topology/numa kept, QEMU's default CPU model is used."
                )
        return etree.tostring(root, encoding="unicode"), notes

    def define_and_start(self, xml: str, workdir: Path, hotplug: Sequence[str] = ()) -> StartResult:
        """One full real-world cycle; the domain is always destroyed and undefined afterwards.

        `hotplug`: device XMLs attached to the running domain (`virsh attach-device --live`) before the
        live XML is read, as a management app hot-plugs them."""
        xml = self.prepare_disk_sources(xml, workdir)
        xml, notes = self.runnable_here(xml)
        name = _domain_name(xml)
        inactive = self.define(xml)
        try:
            self.start_domain(name)
            info_pci = self.enumerated_info_pci(name)
            self._check_running(name)
            for i, device in enumerate(hotplug):
                path = workdir / f"hotplug-{i}.xml"
                path.write_text(device)
                self.virsh("attach-device", name, str(path), "--live")
            live = self.virsh("dumpxml", name)
            info_qtree = self.monitor(name, "info qtree")
        finally:
            try:
                self.destroy(name)
            finally:
                self.undefine(name)
        return StartResult(
            inactive_xml=inactive, live_xml=live, info_pci=info_pci, adaptations=notes, info_qtree=info_qtree
        )


def _domain_name(xml: str) -> str:
    name = etree.fromstring(xml.encode()).findtext("name")
    if not name:
        raise ValueError("domain XML has no <name>")
    return name.strip()


def _kvm_is_pvm() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


def _needs_uefi_or_smm(root: etree._Element) -> str | None:
    """Why the domain needs what PVM cannot do, as a phrase for the note; None if it does not."""
    os_el = root.find("os")
    if os_el is not None and os_el.get("firmware") == "efi":
        return "<os firmware='efi'> (OVMF)"
    loader = root.find("os/loader")
    if loader is not None and (loader.get("type") == "pflash" or "OVMF" in (loader.text or "")):
        return "a pflash/OVMF <loader>"
    smm = root.find("features/smm")
    if smm is not None and smm.get("state", "on") == "on":
        return "<smm state='on'>"
    return None


def _index_after(parent: etree._Element, tags: Sequence[str]) -> int:
    """Insert position after the last child with one of ``tags`` (libvirt's schema wants order)."""
    pos = 0
    for i, child in enumerate(parent):
        if child.tag in tags:
            pos = i + 1
    return pos


def _run(argv: list[str], timeout: float) -> None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from exc
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")


def missing_binaries() -> list[str]:
    """What keeps the harness from running here; the session fixture skips or fails on it."""
    needed = ("virsh", "libvirtd", "virtlogd", "qemu-img")
    return [b for b in needed if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


__all__ = ["LibvirtError", "LibvirtHarness", "StartResult", "missing_binaries"]
