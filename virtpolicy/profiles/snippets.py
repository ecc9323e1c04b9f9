"""Domain XML snippets in profiles: what they say about modelled variables, and how the rest is applied.

A snippet that touches a modelled variable (`<video><model type='qxl'/></video>`) becomes a constraint
on that variable, so a host without QXL is a conflict, not broken XML. Everything else (redirdevs,
channels, clock timers, ...) is applied to the output document after solving, with the draft's
semantics: `add` (multiple = yes | no | auto), `default` (fill only what is unset) and `remove`.

A snippet is data from a file, so what it may write is limited here: hypervisor pass-through (the
driver namespaces of libvirt's domaincommon.rng, e.g. `<qemu:commandline>`) is found by
`passthrough_parts` and allowed only from an opted-in profile on the trusted path (see profiles.profile),
and the engine's own `<virtpolicy:policy>` record can never be written by a snippet (`forged_record`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from lxml import etree

from virtpolicy.inputs.domain import VIRTPOLICY_NS
from virtpolicy.knowledge.catalog import catalog
from virtpolicy.knowledge.machines import family_of

# Hypervisor pass-through: libvirt's per-driver XML namespaces, each of which hands its content to the
# hypervisor (or to the driver's private state) unchecked. From domaincommon.rng (libvirt 9.0):
# qemucmdline, qemucapabilities, qemudeprecation, qemuoverride, lxcsharens, bhyvecmdline, xencmdline,
# vmwaredatacenterpath; and the test driver's namespace (src/test/test_driver.c, TEST_NAMESPACE_HREF).
DRIVER_NAMESPACES: dict[str, str] = {
    "http://libvirt.org/schemas/domain/qemu/1.0": "qemu",  # commandline, capabilities, deprecation, override
    "http://libvirt.org/schemas/domain/lxc/1.0": "lxc",  # namespace (share the host's namespaces)
    "http://libvirt.org/schemas/domain/bhyve/1.0": "bhyve",  # commandline
    "http://libvirt.org/schemas/domain/xen/1.0": "xen",  # commandline
    "http://libvirt.org/schemas/domain/vmware/1.0": "vmware",  # datacenterpath
    "http://libvirt.org/schemas/domain/test/1.0": "test",  # runstate, hasmanagedsave, domainsnapshot
}
# any other (or future) driver namespace under libvirt's domain schema URI counts as pass-through too, so a
# variant spelling (https, a trailing slash, another version) is never a way around the list above
_DRIVER_NS_PATTERN = re.compile(r"\s*https?://(www\.)?libvirt\.org/schemas/domain/", re.I)
# the engine's own record of a solve (outputs.render writes it; Domain.previous_decisions reads it back)
ENGINE_RECORD = {f"{{{VIRTPOLICY_NS}}}{name}" for name in ("policy", "applied", "decision")}

# elements that may appear several times side by side, and the attributes that tell them apart
KEYED: dict[str, tuple[str, ...]] = {
    "timer": ("name",),
    "feature": ("name",),
    "controller": ("type", "index"),
    "channel": ("type",),
    "serial": ("type",),
    "console": ("type",),
}
REPEATABLE_PARENTS = {"devices"}


@dataclass(frozen=True)
class Modelled:
    """One variable value a snippet states: `variable` is a class reference (video.model) or global."""

    variable: str
    value: str


def modelled_parts(root: etree._Element, action: str) -> tuple[list[Modelled], etree._Element]:
    """Split a snippet (<domain>-rooted) into variable values and the XML left to apply by hand."""
    rest = copy.deepcopy(root)
    found: list[Modelled] = []
    for cls in catalog().classes.values():
        for el in list(rest.xpath(f"devices/{cls.element}")):
            for var in cls.variables.values():
                path, _, attr = var.xml.rpartition("@")
                path = path.rstrip("/")
                if path.startswith(".."):
                    value = "virtio" if action != "remove" else "none"
                else:
                    target = el.find(path) if path else el
                    value = target.get(attr) if target is not None else None
                if action == "remove" and "none" in var.values:
                    value = "none"
                if value is not None:
                    found.append(Modelled(f"{cls.name}.{var.name}", value))
            el.getparent().remove(el)
    for path, attr, variable in (
        ("os/type", "machine", "machine"),
        ("os", "firmware", "firmware"),
        ("clock", "offset", "clock.offset"),
        ("cpu", "mode", "cpu.mode"),
    ):
        el = rest.find(path)
        if el is not None and el.get(attr):
            value = el.get(attr, "")
            if variable == "machine":
                fam = family_of(value)
                value = fam.name if fam else value
            found.append(Modelled(variable, value))
            del el.attrib[attr]
    for el in list(rest.xpath("features/hyperv/*")):
        found.append(Modelled(f"hyperv.{el.tag}", "off" if action == "remove" else el.get("state", "on")))
        el.getparent().remove(el)
    _prune_empty(rest)
    return found, rest


def is_driver_namespace(uri: str | None) -> bool:
    """True for a libvirt hypervisor-driver namespace, whose elements pass straight to the hypervisor."""
    return bool(uri) and (uri in DRIVER_NAMESPACES or _DRIVER_NS_PATTERN.match(uri or "") is not None)


def _shown(el: etree._Element) -> str:
    """'<qemu:commandline> (URI)': libvirt's own prefix for a known driver, so messages read like its docs."""
    qname = etree.QName(el)
    prefix = DRIVER_NAMESPACES.get(qname.namespace or "") or el.prefix or "ns"
    return f"<{prefix}:{qname.localname}> ({qname.namespace})"


def passthrough_parts(root: etree._Element) -> list[str]:
    """The hypervisor pass-through a snippet writes, outermost elements first, as '<qemu:commandline> (URI)'.

    Any depth counts (libvirt reads these at the top level, but a snippet is merged, so where it lands is
    not a guarantee), and so does an attribute in a driver namespace on an ordinary element.
    """
    found: list[str] = []
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        if is_driver_namespace(etree.QName(el).namespace):
            if not any(is_driver_namespace(etree.QName(a).namespace) for a in el.iterancestors()):
                found.append(_shown(el))
            continue
        for attr in el.attrib:
            namespace = etree.QName(attr).namespace
            if is_driver_namespace(namespace):
                found.append(
                    f"attribute {DRIVER_NAMESPACES.get(namespace or '', 'ns')}:{etree.QName(attr).localname} "
                    f"({namespace}) on <{etree.QName(el).localname}>"
                )
    return found


def forged_record(root: etree._Element) -> str:
    """'' unless the snippet writes the engine's own record (<virtpolicy:policy> and its children).

    The record says which profiles were applied and what the engine decided; a later solve trusts it to
    keep those decisions, so a profile that wrote it could pass off its own values as earlier decisions.
    """
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag in ENGINE_RECORD:
            return f"<virtpolicy:{etree.QName(el).localname}> ({VIRTPOLICY_NS})"
    return ""


def _prune_empty(el: etree._Element) -> None:
    for child in list(el):
        _prune_empty(child)
        if len(child) == 0 and not child.attrib and not (child.text or "").strip():
            el.remove(child)


def is_empty(root: etree._Element) -> bool:
    return len(root) == 0


def matches(pattern: etree._Element, candidate: etree._Element) -> bool:
    """`candidate` has the pattern's tag, attributes and (recursively) children; extra ones are fine."""
    if pattern.tag != candidate.tag:
        return False
    if any(candidate.get(k) != v for k, v in pattern.attrib.items()):
        return False
    if (pattern.text or "").strip() and (pattern.text or "").strip() != (candidate.text or "").strip():
        return False
    return all(any(matches(p, c) for c in candidate) for p in pattern)


def contains(domain: etree._Element, fragment: etree._Element) -> bool:
    """The draft's <match>: every part of the fragment is present in the domain."""
    return all(any(matches(part, child) for child in domain) for part in fragment)


def _same_slot(pattern: etree._Element, candidate: etree._Element) -> bool:
    """The element a snippet part overrides: same tag and the same identifying attributes."""
    if pattern.tag != candidate.tag:
        return False
    return all(pattern.get(k) == candidate.get(k) for k in KEYED.get(pattern.tag, ()))


def _repeatable(el: etree._Element, parent: etree._Element) -> bool:
    return parent.tag in REPEATABLE_PARENTS


def apply(action: str, multiple: str, fragment: etree._Element, target: etree._Element) -> None:
    """Apply one snippet's unmodelled XML to the output domain element `target`."""
    for part in fragment:
        _apply(action, multiple, part, target)


def _apply(action: str, multiple: str, part: etree._Element, parent: etree._Element) -> None:
    if action == "remove":
        for child in list(parent):
            if matches(part, child):
                parent.remove(child)
            elif child.tag == part.tag and len(part):
                for sub in part:
                    _apply("remove", multiple, sub, child)
        return
    if _repeatable(part, parent) and (action == "add" and multiple in ("yes", "auto")):
        # 'make sure the snippet exists': as many equal elements as the snippet lists, and no more, so
        # that solving the output again adds nothing (idempotence)
        wanted = sum(1 for sibling in part.getparent() if matches(part, sibling))
        present = sum(1 for child in parent if matches(part, child))
        if present < wanted:
            parent.append(copy.deepcopy(part))
        return
    if any(matches(part, c) for c in parent):
        return  # already there as the snippet says
    existing = next((c for c in parent if _same_slot(part, c)), None)
    if existing is None:
        parent.append(copy.deepcopy(part))
        return
    for key, value in part.attrib.items():
        if action == "default" and existing.get(key) is not None:
            continue
        existing.set(key, value)
    if (part.text or "").strip() and (action != "default" or not (existing.text or "").strip()):
        existing.text = part.text
    for sub in part:
        _apply(action, multiple, sub, existing)
