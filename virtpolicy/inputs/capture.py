"""Capturing a host bundle from a live libvirt (`virtpolicy host capture`, `--connect URI`), and asking a
live libvirt for a CPU baseline (`virsh hypervisor-cpu-baseline`).

Uses the `virsh` client rather than libvirt's Python binding, so the package keeps its three
dependencies; what is captured is exactly what `virsh capabilities` / `domcapabilities` print. The
bundle's host.toml records the URI (planning asks that libvirt again), the libvirt and hypervisor
versions (`virsh version --daemon`) and, when the URI names this machine, the kernel release
(`uname -r`): libvirt itself reports no kernel release.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from virtpolicy.errors import HostError, InputError
from virtpolicy.inputs.host import Host, load_host_bundle
from virtpolicy.inputs.hostdevices import NODEDEV_FILE
from virtpolicy.inputs.hostmeta import HOST_META, HostMeta, format_meta
from virtpolicy.knowledge.machines import families

VIRSH_TIMEOUT = 60


class Unreachable(HostError):
    """The libvirt at a URI does not answer at all (as opposed to answering with an error)."""


def _virsh(uri: str, *args: str) -> str:
    if shutil.which("virsh") is None:
        raise HostError(f"--connect {uri}: virsh is not installed (Debian package libvirt-clients)")
    try:
        done = subprocess.run(
            ["virsh", "-c", uri, *args],
            capture_output=True,
            text=True,
            timeout=VIRSH_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise HostError(f"--connect {uri}: virsh {' '.join(args)} did not answer in {VIRSH_TIMEOUT} s") from None
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise HostError(f"--connect {uri}: virsh {args[0]}: {message}")
    return done.stdout


def _write(path: Path, text: str) -> None:
    """An unwritable bundle directory is the user's to fix: one line naming the path, not a traceback."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the host bundle: {exc.strerror or exc}") from None


def capture(uri: str, directory: Path) -> list[Path]:
    """Write capabilities.xml, the host's PCI devices and one domcaps file per machine family and virt type;
    return the files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{directory}: cannot create the host bundle directory: {exc.strerror or exc}") from None
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory (host capture writes a bundle directory)")
    caps_file = directory / "capabilities.xml"
    _write(caps_file, _virsh(uri, "capabilities"))
    written = [caps_file]
    written.append(_capture_nodedevs(uri, directory / NODEDEV_FILE))
    host = load_host_bundle_caps_only(caps_file)
    for (arch, vt), machines in sorted(host.items()):
        for fam in families():
            if arch not in fam.arches:
                continue
            canonical = next((m for m, alias in machines if fam.matches(alias) and m != alias), None)
            canonical = canonical or next((m for m, _ in machines if fam.matches(m)), None)
            if canonical is None:
                continue
            out = directory / f"domcaps-{arch}-{fam.name}-{vt}.xml"
            _write(out, _virsh(uri, "domcapabilities", "--arch", arch, "--machine", canonical, "--virttype", vt))
            written.append(out)
    meta, notes = describe(uri)
    _write(directory / HOST_META, format_meta(meta, notes))
    written.append(directory / HOST_META)
    return written


def is_local(uri: str) -> bool:
    """Whether the URI's daemon runs on this machine (no host part, or localhost), so that `uname -r` here is
    its host's kernel release. The test driver has no host at all."""
    parts = urlsplit(uri)
    return parts.scheme.split("+")[0] not in ("test", "") and parts.hostname in (None, "", "localhost")


def describe(uri: str) -> tuple[HostMeta, dict[str, str]]:
    """The host.toml facts for a live libvirt, and a note per key saying where it came from."""
    try:
        text = _virsh(uri, "version", "--daemon")
    except HostError:  # a driver without a daemon (test:///) reports no versions: the bundle is still good
        text = ""
    version = dict(
        (line.split(":", 1)[0].strip(), line.split(":", 1)[1].strip()) for line in text.splitlines() if ":" in line
    )
    notes = {"libvirt": "virsh version --daemon", "hypervisor": "virsh version --daemon"}
    kernel = ""
    if is_local(uri):
        kernel = os.uname().release
        notes["kernel"] = "uname -r on the machine that ran host capture: the URI is local"
    else:
        notes["kernel"] = 'unknown: libvirt reports no kernel release; add kernel = "$(uname -r)" from the host'
    meta = HostMeta(
        connect=uri,
        captured=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        libvirt=version.get("Running against daemon", ""),
        hypervisor=version.get("Running hypervisor", ""),
        kernel=kernel,
    )
    return meta, notes


def hypervisor_cpu_baseline(uri: str, cpus: list[str], arch: str, virt_type: str, machine: str) -> str:
    """`virsh hypervisor-cpu-baseline --migratable` over these <cpu> elements (virConnectBaselineHypervisorCPU):
    the richest CPU compatible with all of them that this libvirt's hypervisor can provide; its XML.
    HostError with libvirt's message when it cannot answer; Unreachable when it does not answer at all."""
    try:
        _virsh(uri, "uri")
    except HostError as exc:
        raise Unreachable(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="virtpolicy-baseline-") as tmp:
        path = Path(tmp) / "cpus.xml"
        path.write_text("\n".join(cpus) + "\n")
        args = ["hypervisor-cpu-baseline", str(path), "--migratable", "--arch", arch, "--virttype", virt_type]
        return _virsh(uri, *args, *(("--machine", machine) if machine else ()))


def _capture_nodedevs(uri: str, out: Path) -> Path:
    """Every host PCI device as `virsh nodedev-dumpxml` prints it: NUMA node and PCIe link of each."""
    names = sorted(_virsh(uri, "nodedev-list", "--cap", "pci").split())
    dumps = [_virsh(uri, "nodedev-dumpxml", name).strip() for name in names]
    _write(out, "<devices>\n" + "\n".join(dumps) + "\n</devices>\n")
    return out


def load_host_bundle_caps_only(caps_file: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(arch, virt type) -> [(canonical, name)] from a capabilities file alone."""
    from virtpolicy.inputs.host import _read_capabilities

    host = Host(source=str(caps_file.parent), arch="")
    _read_capabilities(caps_file, host)
    return {key: [(m.canonical, m.name) for m in ms] for key, ms in host.machines.items()}


def bundle_name(uri: str) -> str:
    """A directory name for a host's bundle: the URI's host part ('qemu+ssh://h01/system' -> 'h01'),
    'localhost' for a local URI."""
    from urllib.parse import urlsplit

    host = urlsplit(uri).hostname or "localhost"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in host)


def live_host(uri: str, workdir: Path) -> Host:
    capture(uri, workdir)
    return load_host_bundle(workdir)
