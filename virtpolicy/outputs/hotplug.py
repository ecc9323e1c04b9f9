"""Hot-plug: one new device into a laid-out domain, deciding only that device.

A running domain gains no controllers and its devices keep their addresses, so the rest of the domain is
context, not a decision: only the new device gets variables, and its slot must be one of the free
hot-plug slots the domain already has (an empty root port, a bridge slot, a pci-root slot on pc). That
keeps the problem as small as the change, whatever the size of the domain.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lxml import etree

from virtpolicy.core.problem import Provenance, Source, require
from virtpolicy.core.solve import Conflict, Solution, solve
from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import VIRTPOLICY_NS, Domain, xpath_of
from virtpolicy.inputs.guestos import GuestOS
from virtpolicy.inputs.host import Host
from virtpolicy.knowledge.catalog import catalog
from virtpolicy.knowledge.pci import table
from virtpolicy.outputs.render import render
from virtpolicy.sources.build import Build, build
from virtpolicy.sources.context import SelectedProfile


@dataclass
class Hotplugged:
    device: etree._Element  # the new device, completed and with its address
    built: Build
    solution: Solution


def add_device(
    domain: Domain,
    device: etree._Element,
    host: Host,
    guest: GuestOS,
    guest_support: str = "strict",
    profiles: list[SelectedProfile] | None = None,
    device_names: dict[str, str] | None = None,
    node: int | None = None,
    policy: str = "required",
) -> Hotplugged | tuple[Build, Conflict]:
    """The device as the domain can hot-plug it, or the conflict that stops it."""
    if not domain.is_realized:
        raise InputError(
            f"{domain.source}: /domain/devices: no PCI addresses, so nothing is laid out to hot-plug into; "
            "solve the domain first (virtpolicy solve) or pass a `virsh dumpxml`"
        )
    devices = domain.devices_element
    devices.append(device)
    if node is not None:
        _wish(domain, xpath_of(device), node, policy)
    _attachable_live(domain, device)
    built = build(domain, host, guest, guest_support, profiles, device_names, focus=device)
    _disk_buses_attachable_live(built)
    result = solve(built.problem)
    if isinstance(result, Conflict):
        return built, result
    tree = render(built, result)
    position = devices.findall(device.tag).index(device)  # the renderer keeps same-tag order
    added = copy.deepcopy(tree.getroot().find("devices").findall(device.tag)[position])
    added.tail = None
    etree.indent(added, space="  ")  # on its own, as `virsh attach-device` reads it
    return Hotplugged(added, built, result)


def _attachable_live(domain: Domain, device: etree._Element) -> None:
    """libvirt attaches only some devices to a running domain (qemu_driver.c qemuDomainAttachDeviceLive)."""
    kinds = [cls for cls in catalog().classes.values() if device in domain.devices(cls.element)]
    if not kinds:
        raise InputError(
            f"{domain.source}: <{device.tag}>: not a device virtpolicy decides about "
            f"({', '.join(cls.label for cls in catalog().classes.values())})"
        )
    if kinds[0].name not in table()["hotplug"]["classes"]:
        raise InputError(
            f"{domain.source}: <{device.tag}>: libvirt cannot hot-plug a {kinds[0].label} into a running domain "
            f"(libvirt qemu_driver.c: live attach of device '{device.tag}' is not supported); add it with "
            "`virtpolicy solve` and restart the domain"
        )


def _disk_buses_attachable_live(built: Build) -> None:
    """libvirt hot-plugs disks only on some buses (qemu_hotplug.c)."""
    rules = table()["hotplug"]
    inst = built.instances[0]
    bus = inst.var("bus")
    if inst.cls.name in ("disk", "cdrom") and bus in built.problem.variables:
        built.problem.add(
            require(
                f"structural:hotplug-disk-bus:{inst.prefix}",
                bus,
                rules["disk_buses"],
                built.problem.variables[bus].values,
                f"a hot-plugged {inst.cls.label} sits on {' or '.join(rules['disk_buses'])}: libvirt says "
                "\"disk bus '...' cannot be hotplugged.\" for the others",
                Provenance(
                    Source.STRUCTURAL,
                    "hotplug-disk-bus",
                    "pci.toml [hotplug]",
                    "libvirt src/qemu/qemu_hotplug.c qemuDomainAttachDeviceDiskLiveInternal",
                    data=(("rule", "hotplug-disk-bus"), ("file", "pci.toml"), ("line", 0)),
                ),
            )
        )


def _wish(domain: Domain, xpath: str, node: int, policy: str) -> None:
    """The app's NUMA wish for the new device, as if written in the domain's metadata."""
    metadata = domain.root.find("metadata")
    if metadata is None:
        metadata = etree.Element("metadata")
        domain.root.insert(0, metadata)
    numa = metadata.find(f"{{{VIRTPOLICY_NS}}}numa")
    if numa is None:
        numa = etree.SubElement(metadata, f"{{{VIRTPOLICY_NS}}}numa", nsmap={"virtpolicy": VIRTPOLICY_NS})
    etree.SubElement(numa, f"{{{VIRTPOLICY_NS}}}device", xpath=xpath, node=str(node), policy=policy)
