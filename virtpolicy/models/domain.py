"""A lossless view of the app's domain XML.

The engine fills gaps and never rewrites what the app wrote, so the document is kept as an lxml tree
(unknown elements, comments and the app's own metadata survive) and every explicit value is read
together with the XPath that names it in reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.models.xmlsafe import expect_root, parse_bytes

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
    """An XPath that always indexes elements (/domain/devices/disk[1]), stable for reports."""
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


class Domain:
    def __init__(self, tree: etree._ElementTree, source: str) -> None:
        self.tree = tree
        self.source = source
        self.root = expect_root(tree, "domain", source)

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> Domain:
        return cls(parse_bytes(data, source), source)

    @classmethod
    def from_file(cls, path: Path) -> Domain:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.from_bytes(data, str(path))

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
        text = self.root.findtext("vcpu")
        try:
            return int((text or "1").strip())
        except ValueError:
            el = self.root.find("vcpu")
            raise InputError(f"{self.source}:{el.sourceline}: /domain/vcpu must be a number, got '{text}'") from None

    def devices(self, tag: str) -> list[etree._Element]:
        return list(self.root.xpath(f"devices/{tag}"))

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
