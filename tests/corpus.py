"""libvirt's own test-suite domains as a fidelity corpus (issue 9), and the host they were made for.

libvirt's `tests/qemuxml2xmloutdata/*.x86_64-latest.xml` are domains as libvirt 9.0 writes them back after
parsing them against the QEMU 7.2 capabilities (`tests/qemucapabilitiesdata/caps_7.2.0.x86_64.xml`).
They are complete domains nobody on this team wrote, so the engine must hand them back unchanged apart
from its own record and the machine alias made canonical. `scripts/fetch-libvirt-corpus.sh` fetches them
(checksum-verified, never committed) into `.cache/libvirt-corpus/`; everything here returns None or an
empty list when the corpus is absent, so tests can skip instead of fail.

The host bundle is assembled the way libvirt's own tests build their virCaps (tests/testutilsqemu.c): an
x86_64 host with hvm guests for x86_64 and i686, domain types qemu and kvm, and the machine list QEMU
reported (caps_7.2.0.x86_64.xml `<machine>`: canonical names plus their aliases pc and q35). The
domain capabilities are libvirt's own `tests/domaincapsdata/qemu_7.2.0*.x86_64.xml`. Two kinds of file
libvirt's test data lacks are derived, and say so in a comment inside the file:
- q35 under TCG: libvirt ships pc-kvm, q35-kvm and pc-tcg. pc-kvm and pc-tcg differ only in `<domain>`
  and `<cpu>`, so q35-tcg is q35-kvm with the TCG file's `<domain>` and `<cpu>`.
- i686: the same documents with `<arch>` i686 and the qemu-system-i386 emulator, since libvirt's test
  virCaps offers i686 guests and six of the x86_64-latest domains are i686 guests.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from lxml import etree

from virtpolicy.inputs.domain import VIRTPOLICY_NS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "libvirt-corpus"
QEMU_VERSION = "7.2.0"
BUNDLE_NAME = f"libvirt-tests-qemu{QEMU_VERSION}-x86_64"

# The aliases QEMU 7.2 reports (caps_7.2.0.x86_64.xml); the default for normalise().
DEFAULT_ALIASES: dict[str, str] = {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}

# Host NUMA nodes of the assembled host. libvirt's xml2xml tests never check <numatune> nodesets against
# the host; the corpus names host nodes up to 7 (nodeset='0-7'), so the host has 8 nodes and no corpus
# domain is inconsistent with it on that account.
HOST_NUMA_NODES = 8
HOST_CPUS_PER_NODE = 2

_EMULATORS = {"x86_64": "/usr/bin/qemu-system-x86_64", "i686": "/usr/bin/qemu-system-i386"}
_WORDSIZE = {"x86_64": "64", "i686": "32"}


def corpus_dir() -> Path | None:
    """The fetched corpus (the directory holding `tests/`), or None when it has not been fetched.

    `VIRTPOLICY_LIBVIRT_CORPUS` overrides the default `.cache/libvirt-corpus/`; the `.complete` stamp the
    fetch script writes last tells a finished extraction from an interrupted one.
    """
    root = Path(os.environ.get("VIRTPOLICY_LIBVIRT_CORPUS", DEFAULT_CACHE))
    if not (root / ".complete").is_file() or not (root / "tests" / "qemuxml2xmloutdata").is_dir():
        return None
    return root


def require_corpus() -> Path:
    """The corpus for a test: skipped on a developer machine that has not fetched it, a failure under CI
    (the test set-up fetches it there, so a missing corpus is a broken set-up, not a reason to skip)."""
    import pytest

    root = corpus_dir()
    if root is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but the libvirt corpus is missing (scripts/fetch-libvirt-corpus.sh)", pytrace=False)
        pytest.skip("libvirt corpus not downloaded yet: bash scripts/setup.sh test fetches it")
    return root


def outdata_dir() -> Path | None:
    """libvirt's `tests/qemuxml2xmloutdata/`, or None without the corpus."""
    root = corpus_dir()
    return root / "tests" / "qemuxml2xmloutdata" if root else None


def latest_x86_64_files() -> list[Path]:
    """The `*.x86_64-latest.xml` outputs (made with the QEMU 7.2 capabilities), sorted; [] without the corpus."""
    out = outdata_dir()
    return sorted(out.glob("*.x86_64-latest.xml")) if out else []


def x86_64_files() -> list[Path]:
    """Every output domain for an x86 guest (x86_64 or i686), sorted; [] without the corpus.

    The ones not named `-latest` were made with other (older) QEMU capabilities, so some of them name
    machine types or devices QEMU 7.2 no longer offers.
    """
    out = outdata_dir()
    if out is None:
        return []
    found = []
    for path in sorted(out.glob("*.xml")):
        try:
            root = etree.parse(str(path), _safe_parser()).getroot()
        except etree.XMLSyntaxError:
            continue
        arch = root.find("os/type")
        if root.tag == "domain" and arch is not None and arch.get("arch") in ("x86_64", "i686"):
            found.append(path)
    return found


def _safe_parser() -> etree.XMLParser:
    """No entities, no network, no DTDs: corpus files are data from outside."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, remove_comments=False)


def _qemu_machines(caps_file: Path) -> dict[str, list[etree._Element]]:
    """`<machine>` entries of a QEMU capabilities file per accelerator (kvm, tcg), in QEMU's order."""
    root = etree.parse(str(caps_file), _safe_parser()).getroot()
    out: dict[str, list[etree._Element]] = {}
    for m in root.iterfind("machine"):
        out.setdefault(m.get("type", ""), []).append(m)
    return out


def _machine_elements(parent: etree._Element, machines: list[etree._Element]) -> None:
    """libvirt's capabilities form: each canonical name, then its alias pointing at it (virCapabilitiesFormat)."""
    for m in machines:
        attrs = {"maxCpus": m.get("maxCpus", "1")}
        if m.get("deprecated") == "yes":
            attrs["deprecated"] = "yes"
        el = etree.SubElement(parent, "machine", attrs)
        el.text = m.get("name", "")
        if m.get("alias"):
            alias = etree.SubElement(parent, "machine", {"canonical": m.get("name", ""), **attrs})
            alias.text = m.get("alias")


def _capabilities(caps_file: Path, host_cpu: etree._Element | None) -> etree._Element:
    """A libvirt capabilities document for the test host: host CPU and NUMA, x86_64 and i686 hvm guests."""
    machines = _qemu_machines(caps_file)
    tcg = machines.get("tcg", [])
    kvm = machines.get("kvm", [])
    caps = etree.Element("capabilities")
    host = etree.SubElement(caps, "host")
    cpu = etree.SubElement(host, "cpu")
    etree.SubElement(cpu, "arch").text = "x86_64"
    if host_cpu is not None:
        for tag in ("model", "vendor"):
            src = host_cpu.find(tag)
            if src is not None:
                etree.SubElement(cpu, tag).text = (src.text or "").strip()
    etree.SubElement(
        cpu, "topology", sockets=str(HOST_NUMA_NODES), dies="1", cores=str(HOST_CPUS_PER_NODE), threads="1"
    )
    topology = etree.SubElement(host, "topology")
    cells = etree.SubElement(topology, "cells", num=str(HOST_NUMA_NODES))
    for node in range(HOST_NUMA_NODES):
        cell = etree.SubElement(cells, "cell", id=str(node))
        etree.SubElement(cell, "memory", unit="KiB").text = str(8 * 1024 * 1024)
        cpus = etree.SubElement(cell, "cpus", num=str(HOST_CPUS_PER_NODE))
        for i in range(HOST_CPUS_PER_NODE):
            cpu_id = node * HOST_CPUS_PER_NODE + i
            etree.SubElement(
                cpus, "cpu", id=str(cpu_id), socket_id=str(node), die_id="0", core_id=str(i), siblings=str(cpu_id)
            )
    for arch in ("i686", "x86_64"):
        guest = etree.SubElement(caps, "guest")
        etree.SubElement(guest, "os_type").text = "hvm"
        arch_el = etree.SubElement(guest, "arch", name=arch)
        etree.SubElement(arch_el, "wordsize").text = _WORDSIZE[arch]
        etree.SubElement(arch_el, "emulator").text = _EMULATORS[arch]
        _machine_elements(arch_el, tcg)
        etree.SubElement(arch_el, "domain", type="qemu")
        kvm_el = etree.SubElement(arch_el, "domain", type="kvm")
        if [m.attrib for m in kvm] != [m.attrib for m in tcg]:
            _machine_elements(kvm_el, kvm)
        features = etree.SubElement(guest, "features")
        if arch == "i686":
            etree.SubElement(features, "pae")
            etree.SubElement(features, "nonpae")
        etree.SubElement(features, "acpi", default="on", toggle="yes")
        etree.SubElement(features, "apic", default="on", toggle="no")
        etree.SubElement(features, "cpuselection")
        etree.SubElement(features, "deviceboot")
        etree.SubElement(features, "disksnapshot", default="on", toggle="no")
    return caps


def _write(root: etree._Element, path: Path, note: str | None = None) -> None:
    """Pretty-printed like libvirt's own files, with an optional comment saying where the data came from."""
    etree.indent(root, space="  ")
    data = etree.tostring(root, encoding="unicode")
    if note:
        data = f"<!-- {note} -->\n{data}"
    path.write_text(data + "\n")


def _derive(
    base: etree._Element, *, arch: str | None = None, take_from: etree._Element | None = None
) -> etree._Element:
    """A copy of a domcaps document with another arch, or with `<domain>` and `<cpu>` from another one."""
    root = copy.deepcopy(base)
    if take_from is not None:
        for tag in ("domain", "cpu"):
            old, new = root.find(tag), take_from.find(tag)
            if old is not None and new is not None:
                root.replace(old, copy.deepcopy(new))
    if arch is not None:
        arch_el = root.find("arch")
        path_el = root.find("path")
        if arch_el is not None:
            arch_el.text = arch
        if path_el is not None:
            path_el.text = _EMULATORS[arch]
    return root


def corpus_host_bundle(tmpdir: Path, version: str = QEMU_VERSION) -> Path:
    """Write a QEMU test host (default 7.2) as a virtpolicy host bundle under `tmpdir`; returns the bundle dir.

    Raises FileNotFoundError without the corpus (call corpus_dir() first to skip). The bundle holds
    capabilities.xml and domcaps-{arch}-{pc,q35}-{kvm,qemu}.xml, the file names of the embedded bundle.
    """
    root = corpus_dir()
    if root is None:
        raise FileNotFoundError("libvirt corpus not fetched: run scripts/fetch-libvirt-corpus.sh")
    data = root / "tests"
    dc = data / "domaincapsdata"
    bundle = tmpdir / f"libvirt-tests-qemu{version}-x86_64"
    if bundle.exists():
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    parser = _safe_parser()
    pc_kvm = etree.parse(str(dc / f"qemu_{version}.x86_64.xml"), parser).getroot()
    q35_kvm = etree.parse(str(dc / f"qemu_{version}-q35.x86_64.xml"), parser).getroot()
    pc_tcg = etree.parse(str(dc / f"qemu_{version}-tcg.x86_64.xml"), parser).getroot()
    ours = f"libvirt {root.joinpath('VERSION').read_text().strip()} tests/domaincapsdata"
    docs = {
        "pc-kvm": (pc_kvm, f"{ours}/qemu_{version}.x86_64.xml, copied"),
        "q35-kvm": (q35_kvm, f"{ours}/qemu_{version}-q35.x86_64.xml, copied"),
        "pc-qemu": (pc_tcg, f"{ours}/qemu_{version}-tcg.x86_64.xml, copied"),
        "q35-qemu": (
            _derive(q35_kvm, take_from=pc_tcg),
            f"derived: {ours}/qemu_{version}-q35.x86_64.xml with <domain> and <cpu> of "
            f"qemu_{version}-tcg.x86_64.xml (libvirt ships no q35 TCG domcaps for {version})",
        ),
    }
    for key, (doc, note) in docs.items():
        if note.endswith("copied"):
            shutil.copyfile(dc / note.split("/")[-1].removesuffix(", copied"), bundle / f"domcaps-x86_64-{key}.xml")
        else:
            _write(doc, bundle / f"domcaps-x86_64-{key}.xml", note)
        _write(
            _derive(doc, arch="i686"),
            bundle / f"domcaps-i686-{key}.xml",
            f"derived: {note.removesuffix(', copied')} with <arch> i686 and the qemu-system-i386 emulator",
        )
    host_cpu = pc_kvm.find("cpu/mode[@name='host-model']")
    caps = _capabilities(data / "qemucapabilitiesdata" / f"caps_{version}.x86_64.xml", host_cpu)
    _write(
        caps,
        bundle / "capabilities.xml",
        f"assembled by tests/corpus.py from libvirt tests/qemucapabilitiesdata/caps_{version}.x86_64.xml "
        f"(machine list) as tests/testutilsqemu.c builds its virCaps; host NUMA: {HOST_NUMA_NODES} nodes",
    )
    return bundle


def _strip_whitespace(root: etree._Element) -> None:
    """Drop whitespace-only text and tails: indentation is not part of a domain."""
    for el in root.iter():
        if el.text is not None and not el.text.strip():
            el.text = None
        if el.tail is not None and not el.tail.strip():
            el.tail = None


def normalise(xml_bytes: bytes, aliases: Mapping[str, str] | None = None) -> bytes:
    """Canonical bytes of a domain, for "unchanged apart from what the engine may change" comparisons.

    Removes the engine's `<metadata><virtpolicy:policy>` record (and a `<metadata>` left empty by that),
    makes the machine alias canonical (`aliases`, default QEMU 7.2's pc and q35, as libvirt does at define),
    drops whitespace-only text, and serialises as C14N, so attribute order, quoting and namespace
    prefix placement do not count as changes.
    """
    aliases = DEFAULT_ALIASES if aliases is None else aliases
    root = etree.fromstring(xml_bytes, _safe_parser())
    for metadata in root.findall("metadata"):
        for record in metadata.findall(f"{{{VIRTPOLICY_NS}}}policy"):
            metadata.remove(record)
        if len(metadata) == 0 and not (metadata.text or "").strip():
            root.remove(metadata)
    os_type = root.find("os/type")
    if os_type is not None and os_type.get("machine") in aliases:
        os_type.set("machine", aliases[os_type.get("machine", "")])
    _strip_whitespace(root)
    etree.cleanup_namespaces(root)
    return etree.tostring(root, method="c14n")
