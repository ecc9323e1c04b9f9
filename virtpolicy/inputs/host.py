"""The host: libvirt capabilities plus one domain-capabilities document per (machine, virt type), and the
host's PCI devices (nodedev-pci.xml) for passed-through devices.

A host bundle is a directory holding `capabilities.xml` and domcapabilities files (any name), or a
single domcapabilities file. Everything the solver may pick must be offered here: domcaps differ per
machine (q35 has no IDE bus, only q35 offers secure-boot loaders) and per virt type (TCG has no
host-passthrough), so every host fact is looked up for the machine and virt type being considered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtpolicy.errors import HostError
from virtpolicy.inputs.domain import memory_kib
from virtpolicy.inputs.hostdevices import NODEDEV_FILE, HostPciDevice, read_nodedevs
from virtpolicy.inputs.hostmeta import HostMeta, read_host_meta
from virtpolicy.inputs.xmlsafe import expect_root, parse_file
from virtpolicy.knowledge.machines import family_of

EMBEDDED_BUNDLE = Path(__file__).parent.parent / "data" / "hosts" / "x86_64-kvm-qemu7.2"


@dataclass(frozen=True)
class DomainCaps:
    """One domcapabilities document, reduced to the enums the engine consults."""

    source: str
    machine: str
    virt_type: str
    arch: str
    vcpu_max: int
    enums: dict[str, tuple[str, ...]]  # "devices/disk/bus" -> values
    present: frozenset[str]  # enum keys whose element libvirt reported at all
    loaders: tuple[str, ...]
    cpu_modes: tuple[str, ...]
    hyperv_features: tuple[str, ...]
    unsupported: frozenset[str] = frozenset()  # elements reported supported='no' ("devices/tpm")
    host_model: str = ""  # cpu/mode[@name='host-model']/model: what host-model expands to here
    host_model_features: frozenset[str] = frozenset()  # its policy='require' features
    host_model_disabled: frozenset[str] = frozenset()  # its policy='disable' features
    usable_models: tuple[str, ...] = ()  # cpu/mode[@name='custom']/model[@usable='yes']
    host_model_vendor: str = ""  # cpu/mode[@name='host-model']/vendor

    def enum(self, key: str) -> tuple[str, ...] | None:
        """Values of an enum, or None when libvirt did not report that element (unknown, not empty).

        An element libvirt reports as `supported='no'` offers none of its values, whether or not it lists
        its enums: libvirt writes `<tpm supported='no'/>` bare (src/conf/domain_capabilities.c FORMAT_PROLOGUE
        returns before any enum for an unsupported element).
        """
        if any(key.startswith(element + "/") for element in self.unsupported):
            return ()
        if key not in self.present:
            return None
        return self.enums.get(key, ())

    def where(self, key: str) -> str:
        return f"{self.source} enum {key}"


def _int(el: etree._Element, attr: str, default: str, source: str) -> int:
    """A non-negative integer attribute of host data (at most 2^32 - 1, libvirt's unsigned int), or an
    InputError naming file, line and attribute: a corrupt bundle must not feed the solver -1 or 10^40."""
    raw = el.get(attr, default)
    digits = raw.strip()
    value = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 10 else None
    if value is None or value > 2**32 - 1:
        raise HostError(f"{source}:{el.sourceline}: <{el.tag} {attr}='{raw}'> is not a number from 0 to 4294967295")
    return value


def _read_domcaps(path: Path) -> DomainCaps:
    tree = parse_file(path)
    root = expect_root(tree, "domainCapabilities", str(path))
    enums: dict[str, tuple[str, ...]] = {}
    present: set[str] = set()
    for enum in root.iter("enum"):
        parent = enum.getparent()
        parts = []
        node = parent
        while node is not None and node is not root:
            parts.append(node.tag)
            node = node.getparent()
        key = "/".join(reversed(parts)) + "/" + enum.get("name", "")
        supported = parent.get("supported", "yes") != "no"
        enums[key] = tuple(v.text or "" for v in enum.findall("value")) if supported else ()
        present.add(key)
    unsupported: set[str] = set()
    for el in root.iter("disk", "graphics", "video", "hostdev", "rng", "tpm", "redirdev", "channel", "hyperv"):
        # an element reported as supported='no' answers "none of its values"
        if el.get("supported") == "no":
            unsupported.add(_path_of(el, root))
            for key in list(enums):
                if key.startswith(_path_of(el, root) + "/"):
                    enums[key] = ()
    vcpu = root.find("vcpu")
    cpu_modes = tuple(m.get("name", "") for m in root.findall("cpu/mode") if m.get("supported") == "yes")
    hyperv = root.find("features/hyperv")
    hyperv_features: tuple[str, ...] = ()
    if hyperv is not None and hyperv.get("supported") == "yes":
        hyperv_features = tuple(v.text or "" for v in hyperv.findall("enum[@name='features']/value"))
    enums["cpu/mode"] = cpu_modes
    present.add("cpu/mode")
    return DomainCaps(
        source=f"{path.parent.name}/{path.name}",
        machine=(root.findtext("machine") or "").strip(),
        virt_type=(root.findtext("domain") or "").strip(),
        arch=(root.findtext("arch") or "").strip(),
        vcpu_max=_int(vcpu, "max", "1", str(path)) if vcpu is not None else 1,
        enums=enums,
        present=frozenset(present),
        loaders=tuple(v.text or "" for v in root.findall("os/loader/value")),
        cpu_modes=cpu_modes,
        hyperv_features=hyperv_features,
        unsupported=frozenset(unsupported),
        host_model=(root.findtext("cpu/mode[@name='host-model']/model") or "").strip(),
        host_model_features=_features(root, "require"),
        host_model_disabled=_features(root, "disable"),
        usable_models=tuple(
            (m.text or "").strip() for m in root.findall("cpu/mode[@name='custom']/model") if m.get("usable") == "yes"
        ),
        host_model_vendor=(root.findtext("cpu/mode[@name='host-model']/vendor") or "").strip(),
    )


def _features(root: etree._Element, policy: str) -> frozenset[str]:
    return frozenset(
        f.get("name", "") for f in root.findall(f"cpu/mode[@name='host-model']/feature[@policy='{policy}']")
    )


def _path_of(el: etree._Element, root: etree._Element) -> str:
    parts = []
    node = el
    while node is not None and node is not root:
        parts.append(node.tag)
        node = node.getparent()
    return "/".join(reversed(parts))


@dataclass(frozen=True)
class HostCell:
    """One host NUMA cell as capabilities report it: what capacity planning places guest cells into."""

    cpus: int
    memory_kib: int
    pages: tuple[tuple[int, int], ...] = ()  # (page size KiB, count) of huge pages (size > 4 KiB)


@dataclass(frozen=True)
class GuestMachine:
    name: str
    canonical: str
    max_cpus: int


@dataclass
class Host:
    """Capabilities of one host, indexed for the solver's questions."""

    source: str
    arch: str
    # (arch, virt_type) -> machine names in capabilities order
    machines: dict[tuple[str, str], list[GuestMachine]] = field(default_factory=dict)
    domcaps: list[DomainCaps] = field(default_factory=list)
    host_numa_cells: int = 1
    cell_sockets: dict[int, frozenset[int]] = field(default_factory=dict)  # host cell -> its CPUs' socket ids
    cells: dict[int, HostCell] = field(default_factory=dict)  # host cell -> its CPUs, memory and huge pages
    pci_devices: dict[str, HostPciDevice] = field(default_factory=dict)  # 0000:3b:00.0 -> the device
    caps_source: str = ""
    kernel: str = ""  # the host's kernel release (host.toml or the inventory), "" when not known
    kernel_features: dict[str, bool] = field(default_factory=dict)  # declared host-kernel features
    connect: str = ""  # the libvirt URI the bundle was captured from, "" when not known
    _index: dict[tuple[str, str, str], DomainCaps] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.source.rstrip("/").rsplit("/", 1)[-1]

    def virt_types(self, arch: str) -> list[str]:
        return [vt for (a, vt) in self.machines if a == arch]

    def canonical(self, arch: str, virt_type: str, name: str) -> str | None:
        for m in self.machines.get((arch, virt_type), []):
            if m.name == name:
                return m.canonical
        return None

    def domcaps_for(self, arch: str, virt_type: str, family: str) -> DomainCaps | None:
        """The domcaps describing `family` for this arch and virt type (the first one the bundle lists)."""
        if self._index is None:
            index: dict[tuple[str, str, str], DomainCaps] = {}
            for caps in self.domcaps:
                fam = family_of(caps.machine)
                if fam is not None:
                    index.setdefault((caps.arch, caps.virt_type, fam.name), caps)
            self._index = index
        return self._index.get((arch, virt_type, family))

    def default_machine(self, arch: str, virt_type: str, family: str) -> str | None:
        """The canonical versioned name for a family: the alias' target (q35 -> pc-q35-7.2)."""
        caps = self.domcaps_for(arch, virt_type, family)
        for m in self.machines.get((arch, virt_type), []):
            fam = family_of(m.name)
            if fam is not None and fam.name == family and m.canonical != m.name:
                return m.canonical
        return caps.machine if caps else None

    def families(self, arch: str, virt_type: str) -> list[str]:
        """Machine families this host can run for arch + virt type, and describes with domcaps."""
        seen: list[str] = []
        for m in self.machines.get((arch, virt_type), []):
            fam = family_of(m.name)
            if fam is not None and fam.name not in seen and self.domcaps_for(arch, virt_type, fam.name):
                seen.append(fam.name)
        return seen


def _read_capabilities(path: Path, host: Host) -> None:
    root = expect_root(parse_file(path), "capabilities", str(path))
    host.arch = (root.findtext("host/cpu/arch") or "").strip()
    cells = root.find("host/topology/cells")
    if cells is not None:
        host.host_numa_cells = _int(cells, "num", "1", str(path))
        for cell in cells.iterfind("cell"):
            cell_id = _int(cell, "id", "0", str(path))
            memory = cell.find("memory")
            kib = memory_kib(memory, str(path)) if memory is not None else 0
            pages = tuple(
                (_int(pg, "size", "4", str(path)), int((pg.text or "0").strip() or 0))
                for pg in cell.iterfind("pages")
                if _int(pg, "size", "4", str(path)) > 4 and (pg.text or "0").strip().isdigit()
            )
            cpus = cell.find("cpus")
            host.cells[cell_id] = HostCell(_int(cpus, "num", "0", str(path)) if cpus is not None else 0, kib, pages)
            sockets = {cpu.get("socket_id") for cpu in cell.iterfind("cpus/cpu")}
            if sockets and None not in sockets:
                host.cell_sockets[_int(cell, "id", "0", str(path))] = frozenset(
                    _int(cpu, "socket_id", "0", str(path)) for cpu in cell.iterfind("cpus/cpu")
                )
    host.caps_source = f"{path.parent.name}/{path.name}"
    for guest in root.findall("guest"):
        if (guest.findtext("os_type") or "").strip() != "hvm":
            continue
        arch_el = guest.find("arch")
        if arch_el is None:
            continue
        arch = arch_el.get("name", "")
        base = [
            GuestMachine(m.text or "", m.get("canonical", m.text or ""), _int(m, "maxCpus", "1", str(path)))
            for m in arch_el.findall("machine")
        ]
        for dom in arch_el.findall("domain"):
            vt = dom.get("type", "")
            extra = [
                GuestMachine(m.text or "", m.get("canonical", m.text or ""), _int(m, "maxCpus", "1", str(path)))
                for m in dom.findall("machine")
            ]
            host.machines[(arch, vt)] = extra or base


def load_host_bundle(path: Path) -> Host:
    """Read a bundle directory or a single domcapabilities file."""
    if path.is_file():
        caps = _read_domcaps(path)
        host = Host(source=str(path), arch=caps.arch, domcaps=[caps])
        host.machines[(caps.arch, caps.virt_type)] = [GuestMachine(caps.machine, caps.machine, caps.vcpu_max)]
        return host
    if not path.is_dir():
        raise HostError(f"{path}: no such host bundle (a directory with capabilities.xml, or a domcaps file)")
    caps_file = path / "capabilities.xml"
    if not caps_file.exists():
        raise HostError(f"{path}: host bundle lacks capabilities.xml")
    host = Host(source=str(path), arch="")
    _read_capabilities(caps_file, host)
    apply_meta(host, read_host_meta(path))
    if (path / NODEDEV_FILE).exists():
        host.pci_devices = read_nodedevs(path / NODEDEV_FILE)
    for file in sorted(path.glob("*.xml")):
        if file.name in ("capabilities.xml", NODEDEV_FILE):
            continue
        host.domcaps.append(_read_domcaps(file))
    if not host.domcaps:
        raise HostError(f"{path}: host bundle has no domcapabilities files")
    return host


def apply_meta(host: Host, meta: HostMeta) -> None:
    """The bundle's host.toml (or an inventory entry): kernel release, declared kernel features, URI."""
    host.kernel, host.kernel_features, host.connect = meta.kernel, meta.declared, meta.connect


def embedded_host() -> Host:
    return load_host_bundle(EMBEDDED_BUNDLE)
