"""A lossless view of the app's domain XML.

The engine fills gaps and never rewrites what the app wrote, so the document is kept as an lxml tree
(unknown elements, comments and the app's own metadata survive) and every explicit value is read
together with the XPath that names it in reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.units import UnitError, to_kib
from virtpolicy.inputs.xmlsafe import expect_root, parse_bytes, read_file
from virtpolicy.knowledge.pci import pci_address_limits

LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
VIRTPOLICY_NS = "http://virtpolicy.org/xmlns/domain/1.0"
VIRTUNED_NS = "http://virt-manager.org/schemas/virtuned/0.1"


@dataclass(frozen=True)
class ProfileSelection:
    """A profile the domain's metadata (or the command line) asks for."""

    name: str
    priority: int
    version: str | None
    where: str  # XPath of the selecting element, or "--profile"


@dataclass(frozen=True)
class Explicit:
    """A value the app wrote, and where."""

    value: str
    xpath: str


def xpath_of(el: etree._Element) -> str:
    """An XPath that always indexes elements (/domain/devices/disk[1]), stable for reports.

    The engine names an element in almost every constraint it builds, so this is hot: libxml2's own
    path (`getpath`, in C) already indexes exactly the steps that have same-named siblings, which is this
    function's rule too, apart from devices (always indexed). Paths through namespaced elements, comments
    or processing instructions (libxml2 writes `*[n]`, `prefix:name`, `comment()`) take the slow path.
    """
    if isinstance(el.tag, str):
        path: str = el.getroottree().getpath(el)
        if "*" not in path and ":" not in path and "(" not in path:
            if "devices" not in path:
                return path
            steps = path.split("/")
            for i in range(2, len(steps)):
                if "[" not in steps[i] and steps[i - 1].partition("[")[0] == "devices":
                    steps[i] += "[1]"
            return "/".join(steps)
    return _xpath_walk(el)


def _xpath_walk(el: etree._Element) -> str:
    """xpath_of the long way: walking up, with each step's local name."""
    parts = []
    node = el
    while node is not None:
        parent = node.getparent()
        tag = etree.QName(node).localname if isinstance(node.tag, str) else "node()"
        if parent is None:
            parts.append(tag)
        else:
            before = sum(1 for _ in node.itersiblings(node.tag, preceding=True))
            indexed = before or parent.tag == "devices" or next(node.itersiblings(node.tag), None) is not None
            parts.append(f"{tag}[{before + 1}]" if indexed else tag)
        node = parent
    return "/" + "/".join(reversed(parts))


# --- typed parsing of the values the engine reads ------------------------------------------------------
# Every value is checked here, against libvirt's own limits, before anything is computed from it: a tiny
# document must not make the engine expand a range of four billion CPUs or build 10,000 devices.
MAX_DEVICES = 4096  # elements under <devices>; virtpolicy's cap (README "Limits")
MAX_VCPUS = 65535  # domain.rng countCPU (unsignedShort); the host's own maximum is a conflict, not this
MAX_GUEST_CELLS = 128  # QEMU's MAX_NODES (include/sysemu/numa.h)
MAX_HOST_NODES = 1024  # host NUMA node ids in a nodeset; virtpolicy's cap
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_NUMBER = re.compile(r"(0|[1-9][0-9]*)|0[xX][0-9a-fA-F]+")  # _DECIMAL or _HEX
_NODESET = re.compile(r"\^?[0-9]+(-[0-9]+)?")


def located(source: str, el: etree._Element, attr: str | None = None) -> str:
    """`FILE:LINE: XPATH[/@attr]`, the prefix of every message about a value in the domain."""
    return f"{source}:{el.sourceline or 0}: {xpath_of(el)}" + (f"/@{attr}" if attr else "")


def c_integer(text: str) -> int:
    """An integer as libvirt reads it (virStrToLong_ui base 0: 0x-hex or decimal), or ValueError.

    A leading-zero number libvirt would read as octal is refused instead of guessed (write 0x.. or
    decimal): Python's int(x, 0) refuses it too, and the engine must never read it differently from libvirt.
    """
    t = text.strip()
    if _HEX.fullmatch(t):
        return int(t, 16)
    if _DECIMAL.fullmatch(t):
        return int(t)
    raise ValueError(text)


def int_value(
    el: etree._Element,
    source: str,
    attr: str | None = None,
    *,
    default: int | None = None,
    maximum: int,
    minimum: int = 0,
    base0: bool = False,
) -> int | None:
    """A bounded non-negative integer attribute (or the element's text when attr is None).

    None (or `default`) when absent; InputError naming file:line and XPath when malformed or out of range.
    """
    raw = el.get(attr) if attr else el.text
    if raw is None or (attr is None and not raw.strip()):
        return default
    if len(raw.strip()) > 24:  # beyond every limit here; int() of 5,000 digits would itself raise
        raise InputError(
            f"{located(source, el, attr)}: '{raw.strip()[:24]}...' is out of range (libvirt accepts "
            f"{minimum}-{maximum})"
        )
    try:
        value = c_integer(raw) if base0 else int(raw.strip()) if _DECIMAL.fullmatch(raw.strip()) else None
    except ValueError:
        value = None
    if value is None:
        form = "a decimal or 0x-hex number" if base0 else "a decimal number"
        octal = base0 and re.fullmatch(r"\s*0[0-9]+\s*", raw)
        digits = raw.strip().lstrip("0") or "0"
        hint = f" (libvirt reads a leading 0 as octal; write 0x{digits} or a decimal)" if octal else ""
        raise InputError(f"{located(source, el, attr)}: '{raw}' is not {form}{hint}")
    if not minimum <= value <= maximum:
        raise InputError(f"{located(source, el, attr)}: {raw} is out of range (libvirt accepts {minimum}-{maximum})")
    return value


def _check_int(el: etree._Element, source: str, attr: str, *, maximum: int, base0: bool = False) -> None:
    """`int_value` for a value that is only checked, with the plain well-formed case decided here.

    A laid-out domain carries hundreds of such values (four per PCI address); the common one, a decimal or
    0x-hex number in range, needs no error path, so only anything else goes through `int_value` (which then
    accepts or refuses it exactly as before).
    """
    raw = el.get(attr)
    if raw is None:
        return
    if len(raw) <= 24 and (_NUMBER if base0 else _DECIMAL).fullmatch(raw) and int(raw, 0) <= maximum:
        return  # int(x, 0) reads both forms; the patterns refuse leading-zero octal first
    int_value(el, source, attr, maximum=maximum, base0=base0)


def memory_kib(el: etree._Element, source: str, attr: str | None = None, unit_attr: str = "unit") -> int:
    """A scaled size (text or `attr`, with `unit_attr`) in KiB, checked against libvirt's limit."""
    raw = el.get(attr) if attr else el.text
    try:
        return to_kib(raw or "", el.get(unit_attr))
    except UnitError as exc:
        raise InputError(f"{located(source, el, attr)}: {exc}") from None


def cpuset(el: etree._Element, attr: str, source: str, limit: int, what: str, beyond: str) -> set[int]:
    """libvirt's cpuset/nodeset syntax ('0-3,^2,8'), each id below `limit`, checked before any range is
    expanded (a '0-4294967295' must not become four billion integers); `what` names an id (vCPU, host node),
    `beyond` says where the limit comes from."""
    from virtpolicy.inputs.nodeset import parse_nodeset

    raw = el.get(attr, "")
    parts = [p.strip() for p in raw.split(",")]
    if raw.strip() and not all(_NODESET.fullmatch(p) for p in parts):
        raise InputError(f"{located(source, el, attr)}: '{raw}' is not a list like '0-3,^2,8'")
    highest = max((int(n) for n in re.findall(r"[0-9]+", raw)), default=-1)
    if highest >= limit:
        raise InputError(f"{located(source, el, attr)}: '{raw}' names {what} {highest}, but {beyond}")
    try:
        return parse_nodeset(raw, limit)
    except ValueError as exc:
        raise InputError(f"{located(source, el, attr)}: {exc}") from None


def check_size(root: etree._Element, source: str) -> None:
    """The device cap, checked first: even validating 100,000 devices against the schema takes seconds."""
    devices = root.find("devices")
    if devices is not None:
        count = sum(1 for c in devices if isinstance(c.tag, str))
        if count > MAX_DEVICES:
            raise InputError(
                f"{located(source, devices)}: {count} devices; virtpolicy accepts at most {MAX_DEVICES} per domain"
            )


def check_values(root: etree._Element, source: str) -> None:
    """The sizes and numbers the engine computes with, refused before anything is built from them."""
    vcpu = root.find("vcpu")
    count = 1
    if vcpu is not None:
        count = int_value(vcpu, source, default=1, minimum=1, maximum=MAX_VCPUS) or 1
        current = int_value(vcpu, source, "current", minimum=1, maximum=MAX_VCPUS)
        if current is not None and current > count:
            raise InputError(f"{located(source, vcpu, 'current')}: {current} is more than the {count} vCPUs of <vcpu>")
    for el in root.iterfind("vcpus/vcpu"):
        ident = int_value(el, source, "id", maximum=MAX_VCPUS)
        if ident is not None and ident >= count:
            raise InputError(f"{located(source, el, 'id')}: vCPU {ident} does not exist (<vcpu> is {count})")
    for el in (root.find("memory"), root.find("currentMemory"), root.find("maxMemory")):
        if el is not None and (el.text or "").strip():
            memory_kib(el, source)
    cells = root.findall("cpu/numa/cell")
    if len(cells) > MAX_GUEST_CELLS:
        raise InputError(
            f"{located(source, cells[0].getparent())}: {len(cells)} NUMA cells; QEMU allows at most {MAX_GUEST_CELLS}"
        )
    for cell in cells:
        int_value(cell, source, "id", maximum=MAX_GUEST_CELLS - 1)
        if cell.get("cpus") is not None:
            cpuset(cell, "cpus", source, count, "vCPU", f"/domain/vcpu is {count} (vCPUs 0-{count - 1})")
        if cell.get("memory") is not None:
            memory_kib(cell, source, "memory")
    for el in root.iterfind("numatune/*"):
        if el.get("cellid") is not None:
            int_value(el, source, "cellid", maximum=MAX_GUEST_CELLS - 1)
        if el.get("nodeset") is not None:
            cpuset(el, "nodeset", source, MAX_HOST_NODES, "host node", f"virtpolicy accepts 0-{MAX_HOST_NODES - 1}")
    limits = pci_address_limits()  # knowledge/data/pci.toml [limits]
    for addr in root.iterfind(".//address[@type='pci']"):
        for attr, most in limits.items():
            _check_int(addr, source, attr, maximum=most, base0=True)
    for ctrl in root.iterfind("devices/controller"):
        # a PCI controller's index is the bus number it provides (libvirt's "index" of a PCI controller)
        _check_int(ctrl, source, "index", maximum=limits["bus"] if ctrl.get("type") == "pci" else 2**32 - 1)
        for attr in ("ports", "vectors"):
            _check_int(ctrl, source, attr, maximum=2**32 - 1)
        node = ctrl.find("target/node")
        if node is not None:
            int_value(node, source, maximum=MAX_HOST_NODES - 1)
        target = ctrl.find("target")
        if target is not None:
            for attr in ("busNr", "chassis", "port", "index"):
                _check_int(target, source, attr, maximum=255, base0=attr == "port")
    for size in root.iterfind("devices/memory/target/size"):
        memory_kib(size, source)
    for driver in root.iterfind("devices/*/driver[@queues]"):
        int_value(driver, source, "queues", minimum=1, maximum=MAX_VCPUS)


@lru_cache(maxsize=256)  # bounded: the catalog's selectors, and the few a profile names
def _devices_path(tag: str) -> etree.XPath:
    """`devices/TAG` compiled once: every build selects each catalog class's elements with it."""
    return etree.XPath(f"devices/{tag}")


class Domain:
    def __init__(self, tree: etree._ElementTree, source: str) -> None:
        self.tree = tree
        self.source = source
        self.strictly_valid: bool | None = None  # libvirt's unrelaxed schema accepts it (None: not tried)
        self.root = expect_root(tree, "domain", source)

    @classmethod
    def from_bytes(cls, data: bytes, source: str, complete: bool | None = None) -> Domain:
        """An app's document: libvirt's schema (relaxed for what the engine fills) and the typed values
        are checked here, so every caller (solve, explain, check, device add, the API) gets the same
        one-line refusal before anything is built from it.

        A domain that counts as complete (docs/completeness.md; `complete` is the caller's override) is
        tried against the strict schema first: it gets nothing filled in, so that is the check it must
        pass, and passing it makes the relaxed one redundant (`strictly_valid` records the outcome).
        """
        from virtpolicy.inputs.schema import accepted_strictly, validate_input
        from virtpolicy.knowledge.completeness import completeness

        domain = cls(parse_bytes(data, source), source)
        check_size(domain.root, source)
        if completeness(domain.root, source, complete).complete:
            domain.strictly_valid = accepted_strictly(domain.tree)
        if not domain.strictly_valid:
            validate_input(domain.tree, source)
        check_values(domain.root, source)
        return domain

    @classmethod
    def from_file(cls, path: Path) -> Domain:
        return cls.from_bytes(read_file(path), str(path))

    # --- explicit values -------------------------------------------------------------------------
    def attr(self, path: str, name: str) -> Explicit | None:
        el = self.root.find(path) if path else self.root
        if el is None or el.get(name) is None:
            return None
        return Explicit(el.get(name, ""), f"{xpath_of(el)}/@{name}")

    def text(self, path: str) -> Explicit | None:
        el = self.root.find(path)
        if el is None or not (el.text or "").strip():
            return None
        return Explicit((el.text or "").strip(), xpath_of(el))

    @property
    def name(self) -> str:
        return (self.root.findtext("name") or "").strip()

    @property
    def os_id(self) -> Explicit | None:
        el = self.root.find(f"metadata/{{{LIBOSINFO_NS}}}libosinfo/{{{LIBOSINFO_NS}}}os")
        if el is None or not el.get("id"):
            return None
        return Explicit(el.get("id", ""), xpath_of(el) + "/@id")

    @property
    def vcpus(self) -> int:
        """<vcpu>, bounded by libvirt's schema (1-65535); 1 when absent, as libvirt defaults."""
        el = self.root.find("vcpu")
        if el is None:
            return 1
        return int_value(el, self.source, default=1, minimum=1, maximum=MAX_VCPUS) or 1

    def devices(self, tag: str) -> list[etree._Element]:
        return list(_devices_path(tag)(self.root))

    @property
    def devices_element(self) -> etree._Element:
        devices = self.root.find("devices")
        if devices is None:
            devices = etree.SubElement(self.root, "devices")
        return devices

    @property
    def is_realized(self) -> bool:
        """A domain libvirt has already laid out (it carries PCI addresses): its device set is its ABI.

        Absent devices of such a domain are absent on purpose; adding one would change the guest's
        hardware, so the engine checks it instead of completing it.
        """
        return self.root.find("devices//address[@type='pci']") is not None

    def profile_selections(self) -> list[ProfileSelection]:
        """Profiles selected in metadata: <virtpolicy:profile name= priority= version=/> (or the draft's
        <virtuned:profile>), in document order."""
        found = []
        for ns in (VIRTPOLICY_NS, VIRTUNED_NS):
            for el in self.root.iterfind(f"metadata//{{{ns}}}profile"):
                if el.getparent() is not None and el.getparent().tag == f"{{{VIRTPOLICY_NS}}}policy":
                    continue  # the engine's own record of what it applied
                where = xpath_of(el)
                name = el.get("name", "")
                if not name:
                    raise InputError(f"{self.source}:{el.sourceline}: {where} has no name attribute")
                raw = el.get("priority", "0")
                if not raw.isdigit() or int(raw) > 1000:
                    raise InputError(f"{self.source}:{el.sourceline}: {where}/@priority='{raw}': use 0 to 1000")
                found.append(ProfileSelection(name, int(raw), el.get("version"), where))
        return found

    def previous_decisions(self) -> dict[str, tuple[str, str]]:
        """The engine's own record from an earlier solve: variable -> (value, reason)."""
        record = self.root.find(f"metadata/{{{VIRTPOLICY_NS}}}policy")
        if record is None:
            return {}
        return {
            d.get("variable", ""): (d.get("value", ""), d.get("reason", ""))
            for d in record.findall(f"{{{VIRTPOLICY_NS}}}decision")
        }
