"""A real libvirtd + QEMU for the test-suite, in a private daemon the harness owns.

The engine's promise is "libvirt accepts it and QEMU starts it"; only a real daemon can check that, so
the conformance tests drive one through ``virsh``.  This module owns everything about *this* machine
(how to get a daemon running as root without systemd, nested-virt quirks, missing disk images) so that
tests stay about the engine.  Every subprocess has a timeout: a wedged daemon must fail a test, never
hang CI.

Why a private daemon, never the machine's own (issue 9).  Reusing a libvirtd that already runs made
the suite depend on how that daemon was configured.  On the normal machine of a libvirt user its
QEMU runs as ``libvirt-qemu`` (qemu.conf ``user``/``group``, dynamic_ownership on), which cannot
enter pytest's 0700 tmp dir, so hundreds of tests failed with "Cannot access storage file ...
Permission denied"; AppArmor/SELinux labelling, a root-only ``/dev/kvm`` the ``kvm`` group cannot
open, or somebody's own domains called ``vp-test-*`` would break it in other ways.  Moving the images
to a directory that user can reach would fix only the first of these and still edit a shared machine.
So :meth:`LibvirtHarness.start` always runs its own privileged ``libvirtd`` (QEMU driver, KVM where
usable), whatever else runs:

* libvirt 9.0 has no switch that relocates a privileged daemon: ``--config`` names only
  libvirtd.conf, while qemu.conf, the QEMU driver's state/lock file (``/run/libvirt/qemu/driver.pid``),
  domain configs, NVRAM, TPM state, logs and the capabilities cache sit at compiled-in paths under
  ``/etc/libvirt``, ``/var/lib/libvirt``, ``/run/libvirt``, ``/var/log/libvirt`` and
  ``/var/cache/libvirt``.  A second daemon on those paths fails to take the driver lock or, worse,
  reconnects to the other daemon's domains.  Session mode (``qemu:///session``) would relocate them
  (XDG dirs) but needs a non-root user, whose QEMU cannot open a root-only ``/dev/kvm``; the embedded
  driver (``qemu:///embed?root=``) lives inside one client process, which per-command ``virsh`` is not.
* So the daemon runs in a private mount namespace (``unshare --mount --propagation private``) in
  which each of those directories is bind-mounted from a per-harness tree
  ``/run/virtpolicy-libvirt-<pytest pid>[-tag]/`` (root-only, 0700): it sees only its own configs,
  lock files and domains, and the machine's daemon (if any) never sees the harness's.  ``/run``, not
  ``/tmp``: it is writable by root alone, so nobody can plant the predictable path.
* Outside the namespace only sockets matter: libvirtd.conf puts them in ``<tree>/sock``
  (``unix_sock_dir``, auth ``none``; the tree is 0700) and ``--pid-file`` moves ``/run/libvirtd.pid``,
  which is outside ``/run/libvirt`` and would otherwise clash.  Clients connect with
  ``qemu:///system?socket=<tree>/sock/libvirt-sock`` (:data:`URI` for the session's harness).
* Each daemon gets its own VNC/SPICE port range (:func:`display_ports`): port allocators are
  per daemon, and concurrent runs (several developers, CI jobs) otherwise all start at 5900.
* The private qemu.conf makes QEMU run as root (so it can use a root-only ``/dev/kvm`` and read
  images in any tmp dir), turns off the MAC security driver (a host AppArmor/SELinux policy is not
  what the tests are about) and writes QEMU's output straight to its log (``stdio_handler = "file"``),
  so no virtlogd is needed.  The machine's own qemu.conf is never read or written.
* QEMU's probed capabilities are the one thing the daemons share (:data:`CAPS_CACHE`).  A libvirtd
  probes every ``qemu-system-*`` binary before it answers: with the other architectures' emulators
  (issue 14) that is 27 binaries and about 45 s per daemon, for each of the run's daemons.  So the
  cache the first daemon wrote (``/var/cache/libvirt/qemu/capabilities``, one file per binary) is
  kept in a root-only directory under ``/run`` and copied into each new tree before its daemon
  starts.  libvirt itself checks every entry (the binary's and libvirtd's ctime, libvirt's version,
  KVM usability, host CPU, microcode, kernel) and probes again whatever is stale, so a seeded
  daemon reports exactly what a fresh one would; it just answers in under a second.
* :meth:`LibvirtHarness.stop` destroys what still runs in its daemon, stops the daemon and removes the
  tree.  A tree left by a run that was killed is reaped by the next :meth:`LibvirtHarness.start`
  (its libvirtd only after ``/proc`` confirms it is that tree's daemon).  ``VIRTPOLICY_KEEP_LIBVIRT=1``
  keeps the tree for a post-mortem.
* Known limit: domain cgroups and systemd-machined names (``qemu-<id>-<name>``) stay global; two
  harnesses starting the same domain name with the same id at the same moment could collide there.

Facts this module encodes (Debian 12, libvirt 9.0, QEMU 7.2, no systemd, nested virtualisation):

* Debian's ``libvirt-daemon-driver-qemu`` ships neither ``/etc/libvirt/qemu.conf`` nor the
  ``libvirt-qemu`` account (``libvirt-daemon-system`` does, and it wants systemd).  The QEMU driver
  resolves its compiled-in default ``libvirt-qemu:libvirt-qemu`` *before* reading qemu.conf, so
  without that user and group the driver fails to initialise ("Failed to parse user
  'libvirt-qemu'") even when qemu.conf says ``user = "root"``; the harness creates the account.
* ``/dev/kvm`` is ``root:root 0600`` here, so QEMU has to run as root to use KVM; since the private
  QEMU runs as root, :meth:`LibvirtHarness.kvm_usable` asks whether *this* (root) process can open it.
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

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

# Where per-harness trees live (root-only tmpfs on Debian), and how their names start.
RUN_DIR = Path("/run")
TREE_PREFIX = "virtpolicy-libvirt-"
# QEMU capabilities probed by earlier harness daemons on this machine (see the module docstring); not a
# TREE_PREFIX name, so never taken for a stale tree.
CAPS_CACHE = RUN_DIR / "virtpolicy-qemu-capabilities"
# Where libvirt's QEMU driver keeps that cache, inside a harness tree.
_TREE_CAPS = Path("cache") / "qemu" / "capabilities"
# The QEMU driver's compiled-in default account on Debian (see module docstring).
QEMU_DEFAULT_ACCOUNT = "libvirt-qemu"
# Every directory a privileged libvirtd/QEMU driver uses, and its name inside a harness tree.  The
# daemon sees the tree's copy in place of the machine's (bind mounts in its own mount namespace).
PRIVATE_DIRS: dict[str, Path] = {
    "etc": Path("/etc/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "run": Path("/run/libvirt"),
    "log": Path("/var/log/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "swtpm-log": Path("/var/log/swtpm/libvirt"),
}
# Why each qemu.conf line is there: see the module docstring.
PRIVATE_QEMU_CONF = """\
# Written by virtpolicy tests/libvirt_harness.py for its private libvirtd; removed with it.
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
security_driver = "none"
remember_owner = 0
stdio_handler = "file"
"""
_DISPLAY_PORTS_PER_TREE = 64
_DISPLAY_PORT_SLOTS = 400  # 5900 + 400 * 64 = 31500: below Linux's ephemeral ports (32768-60999)
# Mounts each (source, target) pair given after the two fixed arguments, then becomes libvirtd: exec
# keeps the pid Popen knows, so stop() ends exactly the daemon it started.
_DAEMON_SCRIPT = (
    'set -e; conf="$1"; pidfile="$2"; shift 2; '
    'while [ "$#" -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done; '
    'exec libvirtd --config "$conf" --pid-file "$pidfile"'
)

_UNNUMBERED_BRIDGE = re.compile(r"(?m)^\s*secondary bus 0\.\s*$")
_SCAN_IN_PROGRESS = re.compile(r"(?m)^\s*subordinate bus 255\.\s*$")  # the firmware is still numbering
_CPU_MODES_BROKEN_UNDER_KVM = frozenset({"host-passthrough", "host-model"})
_CPU_MODES_BROKEN_UNDER_TCG = frozenset({"host-passthrough"})


def private_tree(tag: str = "") -> Path:
    """The tree of a harness owned by this process; ``tag`` tells apart several in one process.

    The owner's pid is part of the name so that a later run can tell a tree whose owner died.
    """
    return RUN_DIR / (f"{TREE_PREFIX}{os.getpid()}" + (f"-{tag}" if tag else ""))


def display_ports(tree: Path) -> tuple[int, int]:
    """The VNC/SPICE autoport range of the daemon in ``tree``.

    Each daemon's port allocator knows only its own guests, so two private daemons starting a
    graphical domain at the same moment both chose 5900 and one QEMU died ("binding socket to
    127.0.0.1:5900 failed").  Each tree gets its own 64 ports between 5900 (libvirt's minimum) and
    31499, below the ephemeral range; a clash needs two runs hashed alike *and* starting at once.
    """
    slot = zlib.crc32(tree.name.encode()) % _DISPLAY_PORT_SLOTS
    lo = 5900 + slot * _DISPLAY_PORTS_PER_TREE
    return lo, lo + _DISPLAY_PORTS_PER_TREE - 1


def uri_for(tree: Path) -> str:
    """The connection URI of the private daemon living in ``tree``."""
    return f"qemu:///system?socket={tree / 'sock' / 'libvirt-sock'}"


# The session fixture's daemon; known at import time so that tests can pass it to the CLI.
DEFAULT_TREE = private_tree()
URI = uri_for(DEFAULT_TREE)


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
    """Runs a private libvirtd (see the module docstring) and domains in it through ``virsh``.

    Nothing outside its tree is changed apart from the ``libvirt-qemu`` account and the empty mount
    points, so a developer's own libvirtd and its domains neither affect nor see a test run.
    """

    def __init__(
        self,
        tree: Path = DEFAULT_TREE,
        ready_timeout: float = 60.0,
        command_timeout: float = 60.0,
        start_timeout: float = 180.0,
    ) -> None:
        self.tree = tree
        self.uri = uri_for(tree)
        # A fresh daemon probes QEMU's capabilities (an empty cache) before it answers: seconds.
        self.ready_timeout = ready_timeout
        self.command_timeout = command_timeout
        # TCG boots and swtpm set-up are slow; a start gets more time than a define.
        self.start_timeout = start_timeout
        self._daemon: subprocess.Popen[bytes] | None = None
        self._undefine_flags: list[str] | None = None

    # ----------------------------------------------------------------- daemons

    def start(self) -> None:
        """Start the private libvirtd and wait until ``virsh -c self.uri`` answers."""
        if self._daemon is not None and self._daemon.poll() is None:
            return
        if os.geteuid() != 0:
            raise LibvirtError("the libvirt harness runs a privileged libvirtd and must run as root")
        reap_stale_trees()
        self.ensure_qemu_account()
        self._make_tree()
        seed_capabilities_cache(self.tree / _TREE_CAPS)
        log = self.tree / "libvirtd.log"  # its stderr: libvirt logs there in the foreground
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _DAEMON_SCRIPT, "sh"]
        argv += [str(self.tree / "etc" / "libvirtd.conf"), str(self.tree / "libvirtd.pid")]
        for name, target in PRIVATE_DIRS.items():
            argv += [str(self.tree / name), str(target)]
        with log.open("ab") as out:
            self._daemon = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_for_daemon(log)
        except BaseException:
            self.stop()  # the caller gets no harness to stop; the error already quotes the log
            raise
        save_capabilities_cache(self.tree / _TREE_CAPS)  # it answers: every binary has been probed

    def stop(self) -> None:
        """Destroy what still runs in the private daemon, stop it and remove its tree.

        Domains go first: a QEMU outliving its daemon would keep the namespace and its files alive.
        """
        proc, self._daemon = self._daemon, None
        if proc is not None and proc.poll() is None:
            _stop_daemon(proc.pid, self.uri, wait=_child_waiter(proc))
        _kill_leftover_qemu(self.tree)
        if not os.environ.get("VIRTPOLICY_KEEP_LIBVIRT"):
            shutil.rmtree(self.tree, ignore_errors=True)

    def host_path(self, path: Path) -> Path:
        """Where a path the private daemon uses (e.g. a QEMU log) is found from outside its namespace."""
        for name, target in PRIVATE_DIRS.items():
            if path.is_relative_to(target):
                return self.tree / name / path.relative_to(target)
        return path

    def _make_tree(self) -> None:
        if self.tree.exists():
            if self._answers():
                raise LibvirtError(f"{self.tree} belongs to a running harness daemon; pass another tree")
            shutil.rmtree(self.tree)
        self.tree.mkdir(mode=0o700, parents=True)
        for name, target in PRIVATE_DIRS.items():
            (self.tree / name).mkdir(mode=0o755)
            target.mkdir(parents=True, exist_ok=True)  # a bind mount needs its mount point
        (self.tree / "sock").mkdir(mode=0o700)
        lo, hi = display_ports(self.tree)
        (self.tree / "etc" / "qemu.conf").write_text(
            PRIVATE_QEMU_CONF + f"remote_display_port_min = {lo}\nremote_display_port_max = {hi}\n"
        )
        (self.tree / "etc" / "libvirtd.conf").write_text(
            "# Written by virtpolicy tests/libvirt_harness.py for its private libvirtd.\n"
            f'unix_sock_dir = "{self.tree / "sock"}"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
        )

    def _wait_for_daemon(self, log: Path) -> None:
        proc = self._daemon
        assert proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._answers():
                return
            if proc.poll() is not None:
                raise LibvirtError(f"libvirtd exited with status {proc.returncode}; log {log}:\n{_tail(log)}")
            time.sleep(0.25)
        raise LibvirtError(f"libvirtd did not answer within {self.ready_timeout:.0f} s; log {log}:\n{_tail(log)}")

    def _answers(self) -> bool:
        return _answers(self.uri)

    @staticmethod
    def ensure_qemu_account() -> None:
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
        """True when QEMU (root in the private daemon) can use KVM; otherwise domains fall back to TCG."""
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

    def check_running(self, name: str) -> None:
        """``virsh start`` succeeds even when the guest died at once (KVM emulation failure leaves
        the domain "paused"), so a test must not count that as a start."""
        state = self.virsh("domstate", "--reason", name).strip()
        if not state.startswith("running"):
            log = self.host_path(Path("/var/log/libvirt/qemu") / f"{name}.log")
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
            self.check_running(name)
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


def _answers(uri: str) -> bool:
    try:
        r = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as gone (a container's init may never reap it)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _wait_gone(pid: int, timeout: float) -> bool:
    """For a daemon that is not our child (a stale tree's): no zombie of ours will linger."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _child_waiter(proc: subprocess.Popen[bytes]) -> Callable[[int, float], bool]:
    """A waiter for a daemon that is our child: waiting also reaps it, so no zombie stays."""

    def wait(_pid: int, timeout: float) -> bool:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    return wait


def _stop_daemon(pid: int, uri: str, wait: Callable[[int, float], bool]) -> None:
    """Destroy the daemon's running domains, then SIGTERM it (SIGKILL after 15 s)."""
    try:
        argv = ["virsh", "-q", "-c", uri, "list", "--name"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        for name in r.stdout.split():
            subprocess.run(["virsh", "-q", "-c", uri, "destroy", name], capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        pass  # a wedged daemon: SIGTERM/SIGKILL it anyway, _kill_leftover_qemu ends its guests
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        if not wait(pid, 15.0):
            os.kill(pid, signal.SIGKILL)
            wait(pid, 5.0)


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _kill_leftover_qemu(tree: Path) -> None:
    """SIGKILL a QEMU of this tree's daemon that is still alive (the daemon died or hung).

    A pid file may be stale and its pid reused, so a process is killed only when its stderr is
    this tree's log of that domain (``stdio_handler = "file"``): proof that it is ours.
    """
    for pidfile in (tree / "run" / "qemu").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        if _same_file(Path(f"/proc/{pid}/fd/2"), tree / "log" / "qemu" / f"{pidfile.stem}.log"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)


def _tree_daemon_pid(tree: Path) -> int | None:
    """The pid of the tree's libvirtd if it still runs, checked on its command line, else None."""
    try:
        pid = int((tree / "libvirtd.pid").read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    conf = str(tree / "etc" / "libvirtd.conf").encode()
    return pid if argv and argv[0].endswith(b"libvirtd") and conf in argv else None


def reap_stale_trees() -> None:
    """Stop the daemons and remove the trees of harnesses whose owning process is gone.

    A run that was killed (CI timeout, ^C twice) cannot stop its daemon; without this every such
    run would leave a root libvirtd and its guests behind.
    """
    for tree in RUN_DIR.glob(f"{TREE_PREFIX}*"):
        owner = tree.name[len(TREE_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        pid = _tree_daemon_pid(tree)
        if pid is not None:
            _stop_daemon(pid, uri_for(tree), wait=_wait_gone)
        _kill_leftover_qemu(tree)
        shutil.rmtree(tree, ignore_errors=True)


def _private_dir(path: Path) -> bool:
    """A real directory only root can write (so nobody else can plant capabilities libvirt would trust)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def seed_capabilities_cache(target: Path, cache: Path | None = None) -> int:
    """Copy the shared QEMU capabilities cache into a daemon's cache directory; how many files were copied."""
    cache = CAPS_CACHE if cache is None else cache
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not _private_dir(cache):
        return 0
    copied = 0
    for entry in cache.glob("*.xml"):
        if entry.is_file() and not entry.is_symlink():
            shutil.copy2(entry, target / entry.name)
            copied += 1
    return copied


def save_capabilities_cache(source: Path, cache: Path | None = None) -> None:
    """Keep a daemon's QEMU capabilities for the next harness daemons (each file replaced atomically, so
    concurrent runs never read half a file)."""
    cache = CAPS_CACHE if cache is None else cache
    if not cache.exists():
        with contextlib.suppress(FileExistsError):
            cache.mkdir(mode=0o700)
    if not _private_dir(cache):
        return
    for entry in source.glob("*.xml"):
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".", suffix=".tmp", delete=False) as tmp:
            tmp.write(entry.read_bytes())
        os.chmod(tmp.name, 0o600)
        os.replace(tmp.name, cache / entry.name)


def missing_binaries() -> list[str]:
    """What keeps the harness from running here; the session fixture skips or fails on it."""
    needed = ("virsh", "libvirtd", "qemu-img", "unshare", "mount")
    return [b for b in needed if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


__all__ = [
    "CAPS_CACHE",
    "URI",
    "LibvirtError",
    "LibvirtHarness",
    "StartResult",
    "display_ports",
    "missing_binaries",
    "pid_alive",
    "private_tree",
    "reap_stale_trees",
    "save_capabilities_cache",
    "seed_capabilities_cache",
    "uri_for",
]
