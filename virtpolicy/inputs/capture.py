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
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from lxml import etree

from virtpolicy.errors import HostError, InputError
from virtpolicy.inputs.host import Host, load_host_bundle
from virtpolicy.inputs.hostdevices import NODEDEV_FILE
from virtpolicy.inputs.hostmeta import HOST_META, HostMeta, format_meta
from virtpolicy.inputs.xmlsafe import parse_bytes
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


def capture(uri: str, directory: Path, arches: Sequence[str] = (), virt_types: Sequence[str] = ()) -> list[Path]:
    """Write capabilities.xml, the host's PCI devices and one domcaps file per machine family and virt type;
    return the files.

    `arches` / `virt_types` (`host capture --arch`, `--virttype`) limit the bundle to those guests:
    capabilities.xml keeps only their <guest> elements and <domain> types (the <host> part is libvirt's, whole),
    and only their machines get domcaps. An architecture virtpolicy has no machine family for, one the libvirt
    has no emulator or no such machine for, or a virt type it does not offer there is bad input, reported
    before anything is written."""
    caps_text = _virsh(uri, "capabilities")
    if arches or virt_types:
        caps_text = only_guests(caps_text, uri, arches, virt_types)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{directory}: cannot create the host bundle directory: {exc.strerror or exc}") from None
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory (host capture writes a bundle directory)")
    caps_file = directory / "capabilities.xml"
    _write(caps_file, caps_text)
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


def only_guests(caps_text: str, uri: str, arches: Sequence[str], virt_types: Sequence[str]) -> str:
    """`virsh capabilities` reduced to the hvm guests of `arches` (all when empty) and their `virt_types` (all
    when empty); InputError naming the --arch or --virttype the libvirt at `uri` cannot capture."""
    known = sorted({arch for fam in families() for arch in fam.arches})
    for arch in arches:
        if arch not in known:
            raise InputError(
                f"--arch {arch}: virtpolicy knows no machine family for this architecture (it knows {', '.join(known)})"
            )
    root = parse_bytes(caps_text.encode(), f"--connect {uri}: virsh capabilities").getroot()
    offered: dict[str, dict[str, set[str]]] = {}  # hvm arch -> virt type -> machine names
    for guest in root.findall("guest"):
        arch_el = guest.find("arch")
        if arch_el is None or (guest.findtext("os_type") or "").strip() != "hvm":
            continue
        base = {(m.text or "").strip() for m in arch_el.findall("machine")}
        types = offered.setdefault(arch_el.get("name", ""), {})
        for dom in arch_el.findall("domain"):
            types.setdefault(dom.get("type", ""), set()).update(
                {(m.text or "").strip() for m in dom.findall("machine")} or base
            )
    for arch in arches:
        if arch not in offered:
            raise InputError(
                f"--arch {arch}: the libvirt at {uri} has no emulator for {arch} "
                "(virsh capabilities lists no hvm guest for it)"
            )
    wanted = {arch: types for arch, types in offered.items() if not arches or arch in arches}
    for vt in virt_types:
        missing = [arch for arch, types in wanted.items() if vt not in types]
        if (arches and missing) or len(missing) == len(wanted):
            where = ", ".join(missing) if arches else "any architecture"
            raise InputError(f"--virttype {vt}: the libvirt at {uri} offers no {vt} domains for {where}")
    for arch in arches:
        names = {m for vt, ms in wanted[arch].items() if not virt_types or vt in virt_types for m in ms}
        fams = [fam for fam in families() if arch in fam.arches]
        if not any(fam.matches(m) for fam in fams for m in names):
            raise InputError(
                f"--arch {arch}: the libvirt at {uri} has no {arch} machine virtpolicy decides about "
                f"({', '.join(fam.name for fam in fams)})"
            )
    for guest in root.findall("guest"):
        arch_el = guest.find("arch")
        name = arch_el.get("name", "") if arch_el is not None else ""
        doms = arch_el.findall("domain") if arch_el is not None else []
        keep = [d for d in doms if not virt_types or d.get("type", "") in virt_types]
        if (arches and name not in arches) or (guest.findtext("os_type") or "").strip() != "hvm" or not keep:
            root.remove(guest)
            continue
        for dom in doms:
            if dom not in keep:
                dom.getparent().remove(dom)
    etree.indent(root, space="  ")  # libvirt's own layout (the hardened parser drops blank text)
    return etree.tostring(root, encoding="unicode") + "\n"


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
