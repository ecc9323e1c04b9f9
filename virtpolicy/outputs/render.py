"""Writing a solution back into the app's XML: fill the gaps, never overwrite what the app wrote.

The input tree is copied and completed in place, so unknown elements, comments and the app's metadata
survive. Re-rendering an already complete domain adds nothing but the engine's own record, which makes
solve idempotent: solving the output again gives the same bytes.
"""

from __future__ import annotations

import copy
import itertools
import string
from collections.abc import Iterator
from functools import lru_cache

from lxml import etree

from virtpolicy import __version__
from virtpolicy.core.solve import Solution
from virtpolicy.inputs.domain import VIRTPOLICY_NS, Domain
from virtpolicy.knowledge.catalog import ClassVariable, catalog
from virtpolicy.knowledge.machines import family_of, lays_out_topology
from virtpolicy.knowledge.pci import fixed_layout, usb2_layouts
from virtpolicy.knowledge.templates import new_device
from virtpolicy.outputs.topology import Placement, TopologyBuilder, check_controllers
from virtpolicy.sources.context import Build, Instance, bind
from virtpolicy.sources.placement import pci_element
from virtpolicy.sources.profiles import apply_actions

# Where new top-level elements go, relative to their siblings (libvirt's own output order).
TOP_LEVEL_ORDER = (
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "maxMemory",
    "memory",
    "currentMemory",
    "blkiotune",
    "memtune",
    "memoryBacking",
    "vcpu",
    "vcpus",
    "iothreads",
    "cputune",
    "numatune",
    "resource",
    "sysinfo",
    "bootloader",
    "os",
    "idmap",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "pm",
    "perf",
    "devices",
)
DEVICE_ORDER = (
    "emulator",
    "disk",
    "controller",
    "lease",
    "filesystem",
    "interface",
    "smartcard",
    "serial",
    "parallel",
    "console",
    "channel",
    "input",
    "tpm",
    "graphics",
    "sound",
    "audio",
    "video",
    "hostdev",
    "redirdev",
    "redirfilter",
    "hub",
    "watchdog",
    "memballoon",
    "rng",
    "panic",
    "shmem",
    "memory",
    "iommu",
    "vsock",
)


@lru_cache(maxsize=32)
def _ranks(order: tuple[str, ...]) -> dict[str, int]:
    """Each tag's place in an order (the first, as tuple.index gives): looked up once per order."""
    ranks: dict[str, int] = {}
    for i, tag in enumerate(order):
        ranks.setdefault(tag, i)
    return ranks


def _insert_ordered(parent: etree._Element, child: etree._Element, order: tuple[str, ...]) -> etree._Element:
    """Insert `child` after the last sibling that comes at or before it in `order`.

    The siblings are read from the end: the last one that qualifies decides, and in a laid-out domain it
    is usually near the end of a long <devices>.
    """
    ranks = _ranks(order)
    rank = ranks.get(child.tag, len(order)) if isinstance(child.tag, str) else len(order)
    position = 0
    count = len(parent)
    for back, sibling in enumerate(reversed(parent)):
        tag = sibling.tag
        if isinstance(tag, str) and ranks.get(tag, rank + 1) <= rank:
            position = count - back
            break
    parent.insert(position, child)
    return child


def _ensure(parent: etree._Element, tag: str, order: tuple[str, ...] = TOP_LEVEL_ORDER) -> etree._Element:
    found = parent.find(tag)
    return found if found is not None else _insert_ordered(parent, etree.Element(tag), order)


def _set_if_unset(el: etree._Element, attr: str, value: str) -> None:
    if el.get(attr) is None:
        el.set(attr, value)


def _target_names(prefix: str) -> Iterator[str]:
    """vda ... vdz, vdaa ... vdzz, vdaaa ...: libvirt's own disk-name order (virDiskNameToIndex), which
    goes past two letters (a domain may hold up to the device cap, more than the 702 two letters give)."""
    letters = string.ascii_lowercase
    for length in (1, 2, 3):
        for chars in itertools.product(letters, repeat=length):
            yield prefix + "".join(chars)


class Renderer:
    def __init__(self, built: Build, solution: Solution) -> None:
        self.built = built
        self.values = solution.assignment
        self.solution = solution
        self.tree = copy.deepcopy(built.domain.tree)
        self.root = self.tree.getroot()
        self.domain = Domain(self.tree, built.domain.source)
        # map instances of the original tree onto the copy: a deep copy has the same shape, so walking both
        # in step pairs them (one pass; a path lookup per instance was quadratic in the number of devices)
        twins = dict(zip(built.domain.tree.iter(), self.tree.iter(), strict=True))
        self.elements: dict[int, etree._Element | None] = {}
        for i, inst in enumerate(built.instances):
            self.elements[i] = twins.get(inst.element) if inst.element is not None else None

    def render(self) -> etree._ElementTree:
        # made here if the app wrote none, and never replaced after: looked up once, not by every step
        self.devices = self.domain.devices_element
        check_controllers(self.devices, self.domain.source)  # before anything walks the buses
        if self.built.complete:
            return self._render_complete()
        self._domain_type_and_machine()
        self._firmware()
        self._features()
        self._cpu()
        self._clock()
        self.device_elements: dict[int, etree._Element] = {}
        for i, inst in enumerate(self.built.instances):
            element = self._device(inst, self.elements[i])
            if element is not None:
                self.device_elements[i] = element
        self._disk_targets()
        self._virtio_serial_controller()
        self._numa_cells()
        self._topology()
        if self.built.facts is not None:
            apply_actions(self.built.actions, self.root, self.values, self.built.facts)
        self._record()
        etree.indent(self.tree, space="  ")
        return self.tree

    def _render_complete(self) -> etree._ElementTree:
        """A complete domain comes back as written: its machine alias made canonical (as libvirt does at
        define) and the engine's record added; nothing else is touched."""
        type_el = self.root.find("os/type")
        machine = type_el.get("machine") if type_el is not None else None
        if type_el is not None and machine and self._is_alias(machine):
            name = self.built.host.default_machine(self.built.arch, self.values["domain.type"], self.values["machine"])
            if name:
                type_el.set("machine", name)
        self._record()
        etree.indent(self.tree, space="  ")  # the parser kept no blank text: one layout for every output
        return self.tree

    def _is_alias(self, machine: str) -> bool:
        """An alias is a machine name the host resolves to another (q35 -> pc-q35-7.2), as libvirt's
        qemuCanonicalizeMachine does from the host's capabilities (virQEMUCapsGetCanonicalMachine)."""
        canonical = self.built.host.canonical(self.built.arch, self.values["domain.type"], machine)
        return canonical is not None and canonical != machine

    # --- global decisions --------------------------------------------------------------------------
    def _domain_type_and_machine(self) -> None:
        self.root.set("type", self.values["domain.type"])
        os_el = _ensure(self.root, "os")
        type_el = os_el.find("type")
        if type_el is None:
            type_el = etree.Element("type")
            os_el.insert(0, type_el)
        if not (type_el.text or "").strip():
            type_el.text = "hvm"
        _set_if_unset(type_el, "arch", self.built.arch)
        family = self.values["machine"]
        app = self.built.app_machine
        app_family = family_of(app.value) if app else None
        keep_app = app is not None and app_family is not None and app.value != family and not self._is_alias(app.value)
        if not keep_app:
            name = self.built.host.default_machine(self.built.arch, self.values["domain.type"], family)
            type_el.set("machine", name or family)

    def _firmware(self) -> None:
        firmware = self.values["firmware"]
        os_el = self.root.find("os")
        if firmware == "bios" or os_el is None or os_el.find("loader") is not None:
            return
        _set_if_unset(os_el, "firmware", "efi")
        fw = os_el.find("firmware")
        if fw is None:
            fw = etree.Element("firmware")
            type_el = os_el.find("type")
            os_el.insert(os_el.index(type_el) + 1 if type_el is not None else 0, fw)
        if fw.find("feature[@name='secure-boot']") is None:
            secure = "yes" if firmware == "efi-secure" else "no"
            etree.SubElement(fw, "feature", enabled=secure, name="secure-boot")
            if firmware == "efi-secure" and fw.find("feature[@name='enrolled-keys']") is None:
                etree.SubElement(fw, "feature", enabled="yes", name="enrolled-keys")

    def _features(self) -> None:
        wants_smm = self.values["firmware"] == "efi-secure"
        hyperv_on = [f for f in self.built.hyperv if not f.timer and self.values.get(f"hyperv.{f.feature}") == "on"]
        features = self.root.find("features")
        if features is None:
            features = _insert_ordered(self.root, etree.Element("features"), TOP_LEVEL_ORDER)
            if self.built.arch in ("x86_64", "i686"):
                etree.SubElement(features, "acpi")
                etree.SubElement(features, "apic")
        if wants_smm and features.find("smm") is None:
            etree.SubElement(features, "smm", state="on")
        if hyperv_on:
            hyperv = features.find("hyperv")
            if hyperv is None:
                hyperv = etree.SubElement(features, "hyperv", mode="custom")
            for feature in hyperv_on:
                if hyperv.find(feature.feature) is None:
                    etree.SubElement(hyperv, feature.feature, state="on", **feature.attributes)
        if len(features) == 0:
            self.root.remove(features)

    def _cpu(self) -> None:
        mode = self.values["cpu.mode"]
        cpu = self.root.find("cpu")
        if mode in ("none", "custom"):
            return
        if cpu is None:
            cpu = _insert_ordered(self.root, etree.Element("cpu"), TOP_LEVEL_ORDER)
        _set_if_unset(cpu, "mode", mode)
        if mode == "host-passthrough":
            _set_if_unset(cpu, "check", "none")
            _set_if_unset(cpu, "migratable", "on")

    def _clock(self) -> None:
        clock = self.root.find("clock")
        if clock is None:
            clock = _insert_ordered(self.root, etree.Element("clock"), TOP_LEVEL_ORDER)
            if self.built.arch in ("x86_64", "i686"):
                etree.SubElement(clock, "timer", name="rtc", tickpolicy="catchup")
                etree.SubElement(clock, "timer", name="pit", tickpolicy="delay")
                etree.SubElement(clock, "timer", name="hpet", present="no")
        _set_if_unset(clock, "offset", self.values["clock.offset"])
        for feature in self.built.hyperv:
            wanted = feature.timer and self.values.get(f"hyperv.{feature.feature}") == "on"
            if wanted and clock.find(f"timer[@name='{feature.feature}']") is None:
                etree.SubElement(clock, "timer", name=feature.feature, present="yes")

    # --- devices ----------------------------------------------------------------------------------
    def _device(self, inst: Instance, element: etree._Element | None) -> etree._Element | None:
        values = {v: self.values[inst.var(v)] for v in inst.cls.variables}
        main = next(iter(values.values()))
        devices = self.devices
        if element is None:
            if main == "none" and not (inst.cls.explicit_none or self._implied(inst.cls.explicit_none_with)):
                return None
            element = _new_device(inst.cls.name, values, devices)
        for var in inst.cls.variables.values():
            self._write(element, var, values[var.name])
        return element

    def _implied(self, cls: str) -> bool:
        """Does the domain get a device of class `cls` (which makes libvirt add an implicit one of another)?"""
        if not cls:
            return False
        var = next((i.var(next(iter(i.cls.variables))) for i in self.built.instances if i.cls.name == cls), None)
        return var is not None and self.values.get(var, "none") != "none"

    def _write(self, element: etree._Element, var: ClassVariable, value: str) -> None:
        if value in ("n/a",) or not var.xml:
            return  # not applicable, or a host fact that is not part of the XML
        path, _, attr = var.xml.rpartition("@")
        path = path.rstrip("/")
        if path.startswith(".."):
            return  # written by the class's own constructor (the virtio-serial controller)
        target, _ = bind(element, var.xml)
        if target is None:
            target = etree.SubElement(element, path) if path else element
        current = target.get(attr)
        refines = current == "virtio" and value in ("virtio-transitional", "virtio-non-transitional")
        if refines:
            target.set(attr, value)  # the app named the virtio family; the solution pins its mode
        elif current is None and not (attr == "model" and element.tag == "disk" and value == "virtio"):
            target.set(attr, value)

    def _disk_targets(self) -> None:
        disks = self.domain.devices("disk")
        used = {
            d.find("target").get("dev") for d in disks if d.find("target") is not None and d.find("target").get("dev")
        }
        for disk in disks:
            target = disk.find("target")
            if target is None:
                target = etree.SubElement(disk, "target")
            if target.get("dev"):
                continue
            bus = target.get("bus") or ("fdc" if disk.get("device") == "floppy" else "ide")
            for name in _target_names(catalog().target_prefix.get(bus, "sd")):
                if name not in used:
                    used.add(name)
                    target.set("dev", name)
                    break
            # libvirt wants dev before bus
            bus_value = target.attrib.pop("bus", None)
            if bus_value is not None:
                target.set("bus", bus_value)

    def _virtio_serial_controller(self) -> None:
        """The agent's mode lives on the virtio-serial controller: add (it gets a PCI address) or complete it."""
        model = self.values.get("agent.model", "none")
        if model == "none":
            return
        devices = self.devices
        controller = devices.find("controller[@type='virtio-serial']")
        if controller is None:
            el = etree.Element("controller", type="virtio-serial", index="0")
            if model != "virtio":
                el.set("model", model)
            _append(devices, el)
        elif model != "virtio" and controller.get("model") in (None, "virtio"):
            controller.set("model", model)

    def _numa_cells(self) -> None:
        """Guest NUMA cells the engine decided: vCPUs and memory split evenly (Nova's rule)."""
        cells = int(self.values.get("numa.cells", "1"))
        if cells < 2 or self.root.find("cpu/numa") is not None:
            return
        cpu = self.root.find("cpu")
        if cpu is None:
            cpu = _insert_ordered(self.root, etree.Element("cpu"), TOP_LEVEL_ORDER)
        numa = etree.SubElement(cpu, "numa")
        vcpus = self.built.domain.vcpus
        memory = int(self.built.facts.resolve("domain.memory_mib")) if self.built.facts else 0  # type: ignore[call-overload]
        per_cpu, per_mem = vcpus // cells, memory // cells
        for cell in range(cells):
            first = cell * per_cpu
            cpus = str(first) if per_cpu == 1 else f"{first}-{first + per_cpu - 1}"
            etree.SubElement(numa, "cell", id=str(cell), cpus=cpus, memory=str(per_mem), unit="MiB")

    def _topology(self) -> None:
        family = self.values["machine"]
        if not lays_out_topology(family):
            return  # libvirt places the devices (channel I/O, or a machine the engine has no rows for)
        layout = fixed_layout(family)  # pci.toml [fixed.FAMILY]
        placements = []
        pci_devices = [d for d, _ in self.built.pci_devices]  # once, not once per instance
        for i, inst in enumerate(self.built.instances):
            if inst not in pci_devices:
                continue
            slot = self.values[inst.var("slot")]
            element = pci_element(inst, self.root) if inst.cls.name == "agent" else self.device_elements.get(i)
            if slot == "none" or element is None:
                continue
            position = None
            companions: list[etree._Element] = []
            model = self.values.get(inst.var("model"), "")
            if inst.cls.name == "video":
                position = layout.video  # None off x86: video is an ordinary device there
            elif inst.cls.name == "usb" and model in usb2_layouts():
                usb2 = usb2_layouts()[model]
                position = (layout.usb2_slots[0], usb2.function) if layout.usb2_slots else None
                devices = self.devices
                companions = [c for m, _ in usb2.companions for c in devices.findall(f"controller[@model='{m}']")]
            elif inst.cls.name == "usb" and model == "piix3-uhci":
                position = layout.piix3_usb
            placement = Placement(element, slot, int(self.values[inst.var("node")]), position, companions)
            placements.append(placement)
        builder = TopologyBuilder(
            self.devices,
            family,
            int(self.values["numa.cells"]),
            int(self.values["hotplug.ports"]),
            self.domain.source,
        )
        if self.built.hotplug:
            for placement in placements:
                if placement.element.find("address[@type='pci']") is None:
                    builder.hotplug(placement)
        else:
            builder.place(placements)

    # --- the engine's record -----------------------------------------------------------------------
    def _record(self) -> None:
        metadata = _ensure(self.root, "metadata")
        old = metadata.find(f"{{{VIRTPOLICY_NS}}}policy")
        previous = self.built.domain.previous_decisions()
        position = len(metadata)
        if old is not None:
            position = metadata.index(old)
            tail = old.tail
            metadata.remove(old)
        applied = [(s.profile.name, s.profile.version, s.profile.digest, str(s.priority)) for s in self.built.profiles]
        decisions = []
        for name, decision in self.solution.decisions.items():
            reason = decision.reason.id if decision.reason is not None else "search order"
            if (
                name in previous
                and previous[name][0] == decision.value
                and (reason.startswith("app:") or self.built.complete)
            ):
                reason = previous[name][1]  # decided by an earlier solve: keep its reason (idempotence)
            decisions.append((name, decision.value, reason))
        head = (__version__, self.built.guest.id)
        try:
            record = _parsed_record(head, applied, decisions)
        except (TypeError, ValueError, etree.XMLSyntaxError):
            record = _built_record(head, applied, decisions)  # a value XML cannot hold: lxml says so, as before
        metadata.insert(position, record)
        if old is not None:
            record.tail = tail


def _attr(value: str) -> str:
    """`value` as attribute text the parser reads back exactly: &, < and " escaped, and the whitespace
    characters it would normalise to spaces (tab, newline, carriage return) as character references."""
    if not isinstance(value, str):
        raise TypeError(value)
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace('"', "&quot;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )


_RECORD_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


def _parsed_record(
    head: tuple[str, str], applied: list[tuple[str, str, str, str]], decisions: list[tuple[str, str, str]]
) -> etree._Element:
    """The <virtpolicy:policy> record, written as text and parsed in one call.

    A domain's record holds an element per decision (three dozen for a typical VM, thousands for a big
    one); made one by one, with an lxml call per attribute, it was a fifth of rendering. The text has
    the attributes in the order _built_record sets them, so the tree, and every byte printed from it,
    is the same.
    """
    parts = [f'<virtpolicy:policy xmlns:virtpolicy="{VIRTPOLICY_NS}" version="{_attr(head[0])}" os="{_attr(head[1])}">']
    parts += [
        f'<virtpolicy:applied name="{_attr(n)}" version="{_attr(v)}" digest="{_attr(d)}" priority="{_attr(p)}"/>'
        for n, v, d, p in applied
    ]
    parts += [
        f'<virtpolicy:decision variable="{_attr(n)}" value="{_attr(v)}" reason="{_attr(r)}"/>' for n, v, r in decisions
    ]
    parts.append("</virtpolicy:policy>")
    return etree.fromstring("".join(parts), _RECORD_PARSER)


def _built_record(
    head: tuple[str, str], applied: list[tuple[str, str, str, str]], decisions: list[tuple[str, str, str]]
) -> etree._Element:
    """The record element by element: what _parsed_record gives, or lxml's own error for a value it refuses."""
    record = etree.Element(f"{{{VIRTPOLICY_NS}}}policy", nsmap={"virtpolicy": VIRTPOLICY_NS})
    record.set("version", head[0])
    record.set("os", head[1])
    for name, version, digest, priority in applied:
        etree.SubElement(
            record, f"{{{VIRTPOLICY_NS}}}applied", name=name, version=version, digest=digest, priority=priority
        )
    for name, value, reason in decisions:
        # one set() per attribute, in this order: about half the time of SubElement's keyword attributes
        entry = etree.SubElement(record, DECISION_TAG)
        entry.set("variable", name)
        entry.set("value", value)
        entry.set("reason", reason)
    return record


DECISION_TAG = f"{{{VIRTPOLICY_NS}}}decision"


# --- constructors for devices the engine adds ----------------------------------------------------
def _append(devices: etree._Element, el: etree._Element) -> etree._Element:
    return _insert_ordered(devices, el, DEVICE_ORDER)


def _new_device(cls: str, values: dict[str, str], devices: etree._Element) -> etree._Element:
    """A device from its template (knowledge/data/templates.toml), placed in libvirt's device order."""
    first, *rest = new_device(cls, values)
    _append(devices, first)
    for n, follower in enumerate(rest, 1):
        devices.insert(devices.index(first) + n, follower)
    return first


def render(built: Build, solution: Solution) -> etree._ElementTree:
    return Renderer(built, solution).render()


def to_bytes(tree: etree._ElementTree) -> bytes:
    """The document with its top-level comments and PIs, one per line, and no XML declaration."""
    root = tree.getroot()
    before = [etree.tostring(n, encoding="unicode") for n in reversed(list(root.itersiblings(preceding=True)))]
    after = [etree.tostring(n, encoding="unicode") for n in root.itersiblings()]
    body = etree.tostring(root, encoding="unicode", with_tail=False)
    return ("\n".join([*before, body, *after]) + "\n").encode()
