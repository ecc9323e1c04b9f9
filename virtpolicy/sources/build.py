"""Turning the app's XML, the host, the guest OS and the rule tables into one constraint problem.

Variables are named after what they decide: `machine`, `firmware`, `disk[0].bus`, `video.model`. Rule
tables name classes (`disk.bus`) and are expanded here per device instance. Each constraint records its
provenance, so a conflict can say which file, XPath, osinfo OS or host enum to change.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from lxml import etree

from virtpolicy.core.problem import (
    AtMost,
    Constraint,
    Forbid,
    Problem,
    Provenance,
    Source,
    Strength,
    require,
)
from virtpolicy.inputs.domain import Domain, Explicit, xpath_of
from virtpolicy.inputs.guestos import GuestOS
from virtpolicy.inputs.host import DomainCaps, Host
from virtpolicy.knowledge.catalog import Catalog, ClassVariable, DeviceClass, GuestDevice, catalog
from virtpolicy.knowledge.completeness import Completeness, completeness
from virtpolicy.knowledge.machines import families, family_named, family_of
from virtpolicy.knowledge.tables import HypervFeature, engine_defaults, host_enums, structural
from virtpolicy.knowledge.vocabulary import global_variables
from virtpolicy.profiles.facts import Facts
from virtpolicy.sources.compile import ProfileCompiler, SelectedProfile, XmlAction
from virtpolicy.sources.pci import PciPlanner

if TYPE_CHECKING:
    from virtpolicy.core.solve import Solution

VIRTIO_MODELS = ("virtio", "virtio-transitional", "virtio-non-transitional")
GUEST_LENIENT_PRIORITY = 50  # above engine defaults, below every profile preference


@dataclass
class Instance:
    """One device the engine decides about: present in the XML, or a singleton it may add."""

    cls: DeviceClass
    index: int
    element: etree._Element | None
    # what a build reads of the instance again and again, kept here (functools.cached_property takes a lock
    # on every first read in Python 3.11, and a build makes ~150 such reads)
    prefix: str = field(init=False, repr=False, compare=False)
    _xpath: str | None = field(default=None, init=False, repr=False, compare=False)
    _has_address: bool | None = field(default=None, init=False, repr=False, compare=False)
    _explicit: dict[str, Explicit | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.prefix = self.cls.name if self.cls.singleton else f"{self.cls.name}[{self.index}]"

    def var(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    @property
    def xpath(self) -> str:
        if self._xpath is None:
            el = self.element
            self._xpath = xpath_of(el) if el is not None else f"/domain/devices ({self.cls.label} absent)"
        return self._xpath

    @property
    def has_address(self) -> bool:
        """Read once: a build never edits the app's XML (the renderer writes into its own copy's result)."""
        if self._has_address is None:
            self._has_address = self.element is not None and self.element.find("address") is not None
        return self._has_address

    def explicit(self, variable: ClassVariable) -> Explicit | None:
        """`read_explicit` of this instance's element, once per variable: a build asks for each value two or
        three times (its domain, the app's pin, the disk's mode), and each answer costs an XPath. A value on
        the element itself is named by the element's own (kept) XPath."""
        if variable.name not in self._explicit:
            found = None
            if self.element is not None and variable.xml:
                target, attr = _bind(self.element, variable.xml)
                if target is not None and target.get(attr) is not None:
                    where = self.xpath if target is self.element else xpath_of(target)
                    found = Explicit(target.get(attr, ""), f"{where}/@{attr}")
            self._explicit[variable.name] = found
        return self._explicit[variable.name]


@dataclass
class Build:
    """A problem plus everything the renderer needs to write the answer back into the XML."""

    problem: Problem
    domain: Domain
    host: Host
    guest: GuestOS
    arch: str
    instances: list[Instance]
    hyperv: list[HypervFeature] = field(default_factory=list)
    app_machine: Explicit | None = None
    profiles: list[SelectedProfile] = field(default_factory=list)
    actions: list[XmlAction] = field(default_factory=list)
    facts: Facts | None = None
    pci_devices: list[tuple[Instance, str]] = field(default_factory=list)  # (instance, its slot-deciding variable)
    hotplug: bool = False  # one new device into the free slots of a laid-out domain
    completeness: Completeness = field(default_factory=lambda: Completeness(False, ""))
    warnings: list[str] = field(default_factory=list)  # said once, whatever the solution
    advisories: list[Forbid] = field(default_factory=list)  # guest facts that only make an app's device inert

    @property
    def complete(self) -> bool:
        """The domain is checked, not completed: the output is the input plus the engine's record."""
        return self.completeness.complete and not self.hotplug

    def warnings_for(self, solution: Solution) -> list[str]:
        """The fixed warnings, then each advisory the solution runs into (an inert device the app wrote)."""
        found = list(self.warnings)
        for c in self.advisories:
            if all(solution.assignment.get(v) in s for v, s in zip(c.variables, c.sets, strict=True)):
                found.append(f"{c.message}; the device stays as written but the guest cannot use it")
        return found


def _bind(element: etree._Element, xml: str) -> tuple[etree._Element | None, str]:
    """Resolve a catalog binding ('@a', 'child/@a', '../x/@a') to (element, attribute)."""
    path, _, attr = xml.rpartition("@")
    path = path.rstrip("/")
    target = element.find(path) if path else element
    if path.startswith(".."):
        parent = element.getparent()
        target = parent.find(path[3:]) if parent is not None else None
    return target, attr


def read_explicit(element: etree._Element | None, variable: ClassVariable) -> Explicit | None:
    if element is None or not variable.xml:
        return None
    target, attr = _bind(element, variable.xml)
    if target is None or target.get(attr) is None:
        return None
    return Explicit(target.get(attr, ""), f"{xpath_of(target)}/@{attr}")


class Builder:
    def __init__(
        self,
        domain: Domain,
        host: Host,
        guest: GuestOS,
        guest_support: str = "strict",
        profiles: list[SelectedProfile] | None = None,
        device_names: dict[str, str] | None = None,
        focus: etree._Element | None = None,
        complete: bool | None = None,
    ) -> None:
        self.domain = domain
        self.focus = focus  # hot-plug: only this device is decided; the laid-out rest is context
        self.host = host
        self.guest = guest
        self.profiles = list(profiles or [])
        self.catalog: Catalog = catalog()
        self.problem = Problem()
        self.instances: list[Instance] = []
        self.guest_strength = Strength.HARD if guest_support == "strict" else Strength.SOFT
        arch = domain.attr("os/type", "arch")
        self.arch = arch.value if arch else host.arch
        self.app_machine = domain.attr("os/type", "machine")
        self.completeness = completeness(domain.root, domain.source, complete)
        self.realized = self.completeness.complete or domain.is_realized
        self.warnings: list[str] = []
        self.advisories: list[Forbid] = []
        if not guest.described:
            self.warnings.append(
                f"{domain.source}: no guest OS (no <libosinfo:os> metadata, no --os): guest-driver checks "
                "were skipped; the domain was checked against the host and libvirt/QEMU facts only"
            )
        self.hyperv: list[HypervFeature] = []
        self._ids: set[str] = set()
        self._host_lacks: dict[str, dict[str, str]] = {}  # fact -> virt type -> file lacking it
        self._host_per_type: dict[str, list[Constraint]] = {}  # fact -> its per-virt-type constraints so far
        self._superseded: set[int] = set()  # ids of per-virt-type constraints a merged one replaced
        self._by_class: dict[str, list[Instance]] = {}  # _instances_by_class, rebuilt if instances change
        self._by_class_of: list[Instance] | None = None
        self._by_class_count = -1
        self._lacking: dict[tuple[str, str], list[tuple[str, str, DomainCaps, tuple[str, ...]]]] = {}
        self._spec_sets: dict[tuple[tuple[str, ...], tuple[str, ...]], frozenset[str]] = {}  # _values
        self._modes_of: dict[tuple[str, tuple[str, ...]], tuple[dict[str, list[str]], dict[str, str]]] = {}
        self._lacking_over: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # the values _lacking is for
        self.guest = self._supplemented(guest)
        self.facts = Facts(domain, self.guest, host, self.arch, device_names or {})
        self.compiler = ProfileCompiler(self, self.facts)
        self.pci = PciPlanner(self)

    # --- entry point -----------------------------------------------------------------------------
    def build(self) -> Build:
        self._global_variables()
        self._device_variables()
        self.pci.add_variables()
        self._hyperv_variables()
        self._app_constraints()
        self._structural_constraints()
        self.pci.add_constraints()
        self._host_constraints()
        self._declared_drivers()
        self._guest_constraints()
        self.compiler.compile(self.profiles)
        self._engine_preferences()
        self.pci.add_preferences()
        return Build(
            self.problem,
            self.domain,
            self.host,
            self.guest,
            self.arch,
            self.instances,
            self.hyperv,
            self.app_machine,
            self.profiles,
            self.compiler.actions,
            self.facts,
            self.pci.devices,
            self.focus is not None,
            self.completeness,
            self.warnings,
            self.advisories,
        )

    def _supplemented(self, guest: GuestOS) -> GuestOS:
        """The guest with the drivers osinfo-db does not list but the OS ships (osinfo-supplement.toml)."""
        rows = [p for p in self.catalog.provides if p.matches(guest.short_id)] if guest.described else []
        ids = frozenset(d for p in rows for d in p.device_ids) - guest.device_ids
        if not ids:
            return guest
        names = ", ".join(p.name for p in rows if set(p.device_ids) & ids)
        return replace(
            guest, device_ids=guest.device_ids | ids, source=f"{guest.source} + osinfo-supplement.toml ({names})"
        )

    def _declared_drivers(self) -> None:
        """Profiles may declare driver packs (virtio-win): the guest then drives those devices."""
        declared = self.compiler.drivers(self.profiles)
        if declared:
            ids = frozenset(d for d, _ in declared)
            rules = ", ".join(sorted({f"{r.profile}:{r.id}" for _, r in declared}))
            self.guest = replace(
                self.guest,
                device_ids=self.guest.device_ids | ids,
                short_id=self.guest.short_id,
                source=f"{self.guest.source} + drivers declared by {rules}",
            )
            self.facts.guest = self.guest

    def app_wrote(self, variable: str) -> bool:
        """Did the app's XML give this variable a value (so a profile 'default' leaves it alone)?"""
        return any(c.variables == (variable,) and c.provenance.source is Source.APP for c in self.problem.constraints)

    def add_constraint(self, constraint: Constraint) -> None:
        if constraint.id in self._ids:
            constraint.id = f"{constraint.id}#{len(self.problem.constraints)}"
        self._ids.add(constraint.id)
        self.problem.add(constraint)

    # --- variables ----------------------------------------------------------------------------------
    def _global_variables(self) -> None:
        vtypes = [*global_variables()["domain.type"].decides, *self.host.virt_types(self.arch)]
        app_type = self.domain.attr("", "type")
        self.problem.add_variable("domain.type", vtypes + ([app_type.value] if app_type else []), "domain type")
        fams = [f.name for f in families() if self.arch in f.arches]
        if self.app_machine:
            fam = family_of(self.app_machine.value)
            fams.append(fam.name if fam else self.app_machine.value)
        self.problem.add_variable("machine", fams, "machine type")
        for var in global_variables().values():
            if var.name not in ("domain.type", "machine"):
                self.problem.add_variable(var.name, var.decides, var.label)

    def _device_variables(self) -> None:
        for cls in self.catalog.classes.values():
            elements = self.domain.devices(cls.element)
            if cls.singleton:
                self._one_of_a_kind(cls, elements)
                elements = elements[:1] or [None]  # type: ignore[list-item]
            for index, element in enumerate(elements):
                if self.focus is not None and element is not self.focus:
                    continue  # laid out already: context, not a decision
                inst = Instance(cls, index, element)
                self.instances.append(inst)
                for var in cls.variables.values():
                    values = list(var.values)
                    explicit = inst.explicit(var)
                    if explicit and explicit.value not in values:
                        values.append(explicit.value)
                    self.problem.add_variable(inst.var(var.name), values, f"{cls.label} {inst.xpath}")

    def _one_of_a_kind(self, cls: DeviceClass, elements: list[etree._Element]) -> None:
        """A hot-plugged device of a kind the domain may have once, when it has one already."""
        if self.focus is not None and self.focus in elements and len(elements) > 1:
            from virtpolicy.errors import InputError

            first = next(e for e in elements if e is not self.focus)
            raise InputError(
                f"{self.domain.source}: {xpath_of(first)}: the domain has a {cls.label} already, and virtpolicy "
                f"decides one per domain; the new <{self.focus.tag}> cannot be added"
            )

    def _hyperv_variables(self) -> None:
        _, features = engine_defaults()
        app_hyperv = self.domain.root.find("features/hyperv")
        if not self.guest.is_windows and app_hyperv is None:
            return
        for feature in features:
            if not self.guest.is_windows and self._app_hyperv(feature) is None:
                continue
            self.hyperv.append(feature)
            self.problem.add_variable(f"hyperv.{feature.feature}", ("on", "off"), f"Hyper-V {feature.feature}")

    def _app_hyperv(self, feature: HypervFeature) -> Explicit | None:
        if feature.timer:
            el = self.domain.root.find(f"clock/timer[@name='{feature.feature}']")
            if el is None:
                return None
            on = el.get("present", "yes") == "yes"
            return Explicit("on" if on else "off", xpath_of(el))
        el = self.domain.root.find(f"features/hyperv/{feature.feature}")
        if el is None:
            return None
        return Explicit(el.get("state", "on") == "on" and "on" or "off", xpath_of(el) + "/@state")

    # --- the app's own values (hard) ----------------------------------------------------------------
    def _pin(self, variable: str, allowed: Iterable[str], explicit: Explicit, message: str) -> None:
        allowed = list(allowed)
        var = self.problem.variables[variable]
        self.problem.add(
            require(
                f"app:{explicit.xpath}",
                variable,
                allowed,
                var.values,
                message,
                Provenance(
                    Source.APP,
                    explicit.xpath,
                    f"'{explicit.value}'",
                    data=(("xpath", explicit.xpath), ("value", explicit.value)),
                ),
            )
        )

    def _app_constraints(self) -> None:
        dom = self.domain
        app_type = dom.attr("", "type")
        if app_type:
            self._pin("domain.type", [app_type.value], app_type, f"the domain type is {app_type.value}")
        if self.app_machine:
            fam = family_of(self.app_machine.value)
            value = fam.name if fam else self.app_machine.value
            self._pin("machine", [value], self.app_machine, f"the machine is {self.app_machine.value}")
        firmware = self._app_firmware()
        if firmware:
            allowed, explicit = firmware
            self._pin("firmware", allowed, explicit, f"the firmware is {' or '.join(allowed)}")
        for name, path, attr, absent_value in (
            (v.name, v.path, v.attribute, v.absent) for v in global_variables().values() if v.element
        ):
            explicit = dom.attr(path, attr)
            if explicit is None and name == "cpu.mode" and dom.root.find("cpu/model") is not None:
                explicit = Explicit("custom", xpath_of(dom.root.find("cpu")))
            if explicit is not None:
                self.problem.add_variable(name, [explicit.value])
                self._pin(name, [explicit.value], explicit, f"{name} is {explicit.value}")
            elif self.realized:
                where = Explicit(absent_value, f"/domain ({path}/@{attr} absent in a realized domain)")
                self._pin(name, [absent_value], where, f"{name} stays {absent_value}: the domain is already laid out")
        for feature in self.hyperv:
            explicit = self._app_hyperv(feature)
            name = f"hyperv.{feature.feature}"
            if explicit is not None:
                self._pin(name, [explicit.value], explicit, f"Hyper-V {feature.feature} is {explicit.value}")
            elif self.realized:
                where = Explicit("off", f"/domain/features/hyperv ({feature.feature} absent in a realized domain)")
                self._pin(name, ["off"], where, f"Hyper-V {feature.feature} stays off: the domain is already laid out")
        for inst in self.instances:
            self._app_device_constraints(inst)

    def _app_firmware(self) -> tuple[list[str], Explicit] | None:
        dom = self.domain
        os_fw = dom.attr("os", "firmware")
        loader = dom.root.find("os/loader")
        secure_feature = dom.root.find("os/firmware/feature[@name='secure-boot']")
        if secure_feature is not None:
            on = secure_feature.get("enabled") == "yes"
            return (["efi-secure"] if on else ["efi"]), Explicit(
                secure_feature.get("enabled", ""), xpath_of(secure_feature) + "/@enabled"
            )
        if loader is not None and (loader.get("secure") == "yes" or "secboot" in (loader.text or "")):
            return ["efi-secure"], Explicit(loader.get("secure", loader.text or ""), xpath_of(loader))
        if loader is not None and loader.get("type") == "pflash":
            return ["efi"], Explicit(loader.text or "pflash", xpath_of(loader))
        if os_fw is not None:
            return (["efi", "efi-secure"] if os_fw.value == "efi" else [os_fw.value]), os_fw
        if self.realized:
            return ["bios"], Explicit("bios", "/domain/os (no firmware in a realized domain)")
        return None

    def _app_device_constraints(self, inst: Instance) -> None:
        for var in inst.cls.variables.values():
            name = inst.var(var.name)
            explicit = inst.explicit(var)
            if explicit is not None:
                allowed = [explicit.value]
                if explicit.value == "virtio" and set(VIRTIO_MODELS) <= set(var.values) and not inst.has_address:
                    allowed = list(VIRTIO_MODELS)  # the app named the virtio family; the engine may pin a mode
                self._pin(name, allowed, explicit, f"{inst.prefix} {var.name} is {explicit.value}")
            elif inst.element is not None and inst.cls.singleton and "none" in var.values:
                here = Explicit("present", inst.xpath)
                self._pin(name, [v for v in var.values if v != "none"], here, f"the app wants a {inst.cls.label}")
            elif inst.element is None and self.realized and "none" in var.values:
                here = Explicit("absent", f"/domain/devices (no {inst.cls.label} in a realized domain)")
                self._pin(name, ["none"], here, f"no {inst.cls.label}: the domain is already laid out")
        if inst.cls.name in ("disk", "cdrom") and inst.element is not None:
            target = inst.element.find("target")
            dev = target.get("dev") if target is not None else None
            if dev and target.get("bus") is None:
                buses = [
                    b for b in self.catalog.buses_for_target(dev) if b in self.problem.variables[inst.var("bus")].values
                ]
                if buses:
                    here = Explicit(dev, xpath_of(target) + "/@dev")
                    self._pin(
                        inst.var("bus"), buses, here, f"{inst.prefix} target '{dev}' implies bus {' or '.join(buses)}"
                    )
        if inst.cls.name == "disk" and inst.element is not None:
            bus = inst.explicit(inst.cls.variables["bus"])
            model = inst.explicit(inst.cls.variables["model"])
            if model is None and bus is not None and bus.value == "virtio" and inst.has_address:
                # libvirt laid this disk out as plain virtio: its mode is fixed by its address
                here = Explicit("virtio", inst.xpath + "/address")
                self._pin(inst.var("model"), ["virtio"], here, f"{inst.prefix} stays plain virtio at its address")

    # --- structural facts -------------------------------------------------------------------------
    def _expand(self, refs: Iterable[str], lacking: str = "") -> Iterator[dict[str, str]]:
        """Concrete variable names for class references, one mapping per device instance.

        With `lacking`, only instances whose element has no such child count (e.g. cdroms without media).
        """
        refs = list(refs)
        multi = sorted({r.split(".")[0] for r in refs if self._is_multi(r.split(".")[0])})
        by_class = self._instances_by_class()
        per_class = [
            [
                i
                for i in by_class.get(c, ())
                if not (lacking and i.element is not None and i.element.find(lacking) is not None)
            ]
            for c in multi
        ]
        if not multi:
            yield {r: r for r in refs}  # singletons and globals only: one mapping, the names themselves
            return
        for combo in itertools.product(*per_class):
            chosen = {i.cls.name: i for i in combo}
            mapping = {}
            for r in refs:
                cls, _, var = r.partition(".")
                mapping[r] = chosen[cls].var(var) if cls in chosen else r
            yield mapping

    def _instances_by_class(self) -> dict[str, list[Instance]]:
        """The instances of each class, in order: every rule and preference expands over them."""
        if self._by_class_of is not self.instances or self._by_class_count != len(self.instances):
            by_class: dict[str, list[Instance]] = {}
            for i in self.instances:
                by_class.setdefault(i.cls.name, []).append(i)
            self._by_class, self._by_class_of, self._by_class_count = by_class, self.instances, len(self.instances)
        return self._by_class

    def _is_multi(self, cls: str) -> bool:
        c = self.catalog.classes.get(cls)
        return c is not None and not c.singleton

    def _values(self, variable: str, spec: Iterable[str]) -> frozenset[str]:
        """The values a rule's spec names (`["!none"]`: all but none), as one shared set per (domain, spec):
        every device of a class asks with the same spec over an equal domain."""
        domain = self.problem.variables[variable].values if variable in self.problem.variables else ()
        key = (domain, tuple(spec))
        found = self._spec_sets.get(key)
        if found is None:
            negated = [s[1:] for s in key[1] if s.startswith("!")]
            found = frozenset(v for v in domain if v not in negated) if negated else frozenset(key[1])
            self._spec_sets[key] = found
        return found

    def _structural_constraints(self) -> None:
        _, rules = structural()
        for rule in rules.values():
            file, _, line = rule.where.rpartition(":")
            prov = Provenance(
                Source.STRUCTURAL,
                rule.id,
                rule.where,
                rule.citation,
                data=(("rule", rule.id), ("file", file), ("line", int(line or 0))),
            )
            if rule.at_most:
                refs = list(rule.at_most["variables"])  # type: ignore[arg-type]
                names = [i.var(r.split(".")[1]) for r in refs for i in self.instances if i.cls.name == r.split(".")[0]]
                if names:
                    self.problem.add(
                        AtMost(
                            id=f"structural:{rule.id}",
                            variables=tuple(names),
                            message=rule.text,
                            provenance=prov,
                            value=str(rule.at_most["value"]),
                            limit=int(rule.at_most["limit"]),  # type: ignore[call-overload]
                        )
                    )
                continue
            if rule.forbid_values:
                for ref in rule.variables:
                    for mapping in self._expand([ref, *rule.when]):
                        conds = [(mapping[w], self._values(mapping[w], vals)) for w, vals in rule.when.items()]
                        conds.append((mapping[ref], frozenset(rule.forbid_values)))
                        self._add_forbid(f"structural:{rule.id}:{mapping[ref]}", conds, rule.text, prov)
                continue
            refs = list(rule.forbid) + list(rule.when) + list(rule.require)
            for mapping in self._expand(refs, rule.only_where_missing):
                conds = [(mapping[r], self._values(mapping[r], vals)) for r, vals in rule.forbid.items()]
                conds += [(mapping[r], self._values(mapping[r], vals)) for r, vals in rule.when.items()]
                for r, vals in rule.require.items():
                    name = mapping[r]
                    domain = self.problem.variables[name].values if name in self.problem.variables else ()
                    conds.append((name, frozenset(v for v in domain if v not in vals)))
                suffix = ",".join(sorted({n for n, _ in conds} - {r for r in refs}))
                self._add_forbid(f"structural:{rule.id}" + (f":{suffix}" if suffix else ""), conds, rule.text, prov)

    def _add_forbid(
        self,
        cid: str,
        conds: list[tuple[str, frozenset[str]]],
        message: str,
        prov: Provenance,
        strength: Strength = Strength.HARD,
        priority: int = 0,
        cites: tuple[str, ...] = (),
        group: str = "",
    ) -> None:
        # Hot (a 40-device domain adds ~1,200 constraints through here), hence one plain loop per step.
        variables = self.problem.variables
        if not conds:
            return  # a citation-only row
        merged: dict[str, frozenset[str]] = {}
        for name, vals in conds:
            if name not in variables:
                return  # a rule about variables this domain does not have
            if not vals:
                return  # can never be violated
            if name in merged:
                vals = merged[name] & vals
                if not vals:
                    return
            merged[name] = vals
        # a condition covering the whole domain says nothing: leave it out (issuperset reads the tuple as is)
        kept = {}
        for name, vals in merged.items():
            if not vals.issuperset(variables[name].values):
                kept[name] = vals
        if kept:
            merged = kept
        self._new_forbid(cid, tuple(merged), tuple(merged.values()), message, prov, strength, priority, cites, group)

    def _new_forbid(
        self,
        cid: str,
        variables: tuple[str, ...],
        sets: tuple[frozenset[str], ...],
        message: str,
        prov: Provenance,
        strength: Strength,
        priority: int,
        cites: tuple[str, ...],
        group: str,
    ) -> None:
        """The Forbid `_add_forbid` settled on, under an id of its own."""
        if cid in self._ids:
            cid = f"{cid}#{len(self.problem.constraints)}"
        self._ids.add(cid)
        self.problem.add(
            Forbid(
                id=cid,
                variables=variables,
                message=message,
                provenance=prov,
                strength=strength,
                priority=priority,
                cites=cites,
                group=group,
                sets=sets,
            )
        )

    # --- host capabilities ------------------------------------------------------------------------
    def _caps(self) -> Iterator[tuple[str, str, DomainCaps | None]]:
        for fam in self.problem.variables["machine"].values:
            for vt in self.problem.variables["domain.type"].values:
                yield fam, vt, self.host.domcaps_for(self.arch, vt, fam)

    def _host_where(self) -> str:
        return self.host.source.rsplit("/", 1)[-1]

    def _host_constraints(self) -> None:
        offered = self.host.virt_types(self.arch)
        for vt in self.problem.variables["domain.type"].values:
            if vt not in offered:
                self._add_forbid(
                    f"host:domain-type:{vt}",
                    [("domain.type", frozenset([vt]))],
                    f"the host offers no '{vt}' domains for {self.arch} (it offers {', '.join(offered) or 'none'})",
                    Provenance(Source.HOST, f"{self._host_where()}/capabilities.xml", f"guest arch {self.arch}"),
                )
        for fam, vt, caps in self._caps():
            if vt not in offered:
                continue
            if caps is None:
                self._add_forbid(
                    f"host:machine:{fam}:{vt}",
                    [("machine", frozenset([fam])), ("domain.type", frozenset([vt]))],
                    f"the host describes no {fam} machine for {self.arch} {vt} domains",
                    Provenance(Source.HOST, self._host_where(), f"no domcapabilities for {fam}/{vt}"),
                )
                continue
            if self.domain.vcpus > caps.vcpu_max:
                self._forbid_on_host(
                    f"vcpu-max:{fam}",
                    [("machine", frozenset([fam]))],
                    vt,
                    f"{self.domain.vcpus} vCPUs exceed the {caps.vcpu_max} that {caps.machine} allows",
                    Provenance(Source.HOST, caps.source, f"vcpu max='{caps.vcpu_max}'"),
                )
            self._host_lists_app_machine(fam, vt)
        for row in host_enums():
            for mapping in self._expand([row.variable]):
                name = mapping[row.variable]
                if name not in self.problem.variables:
                    continue
                for value in self.problem.variables[name].values:
                    if value in row.not_a_device or (row.value_map and value not in row.value_map):
                        continue
                    wanted = row.value_map.get(value, value)
                    self._host_offers(name, value, row.key, wanted)
        for feature in self.hyperv:
            self._host_offers(f"hyperv.{feature.feature}", "on", "features/hyperv/features", feature.domcaps)
        if self._superseded:  # one pass, not one per merged fact
            self.problem.constraints = [c for c in self.problem.constraints if id(c) not in self._superseded]
            self._superseded.clear()

    def _host_lists_app_machine(self, fam: str, vt: str) -> None:
        """The app's versioned machine name must exist on the host (its ABI is that exact version)."""
        app_family = family_of(self.app_machine.value) if self.app_machine else None
        if self.app_machine is None or app_family is None or app_family.name != fam:
            return
        if self.app_machine.value in (m.name for m in self.host.machines.get((self.arch, vt), [])):
            return
        self._forbid_on_host(
            "machine-name",
            [("machine", frozenset([fam]))],
            vt,
            f"the host lists no machine '{self.app_machine.value}' for {self.arch}",
            Provenance(Source.HOST, f"{self._host_where()}/capabilities.xml", "guest/arch/machine"),
        )

    def _caps_lacking(self, key: str, wanted: str) -> list[tuple[str, str, DomainCaps, tuple[str, ...]]]:
        """(machine, virt type, domcaps, enum) of every domcaps whose `key` enum lacks `wanted`.

        Every device of a class asks the same question (20 disks: 20 times per value), so the answer is kept
        for as long as the machine and domain-type values it was computed over stay the same.
        """
        over = (self.problem.variables["machine"].values, self.problem.variables["domain.type"].values)
        if over != self._lacking_over:
            self._lacking, self._lacking_over = {}, over
        found = self._lacking.get((key, wanted))
        if found is None:
            found = []
            for fam, vt, caps in self._caps():
                enum = caps.enum(key) if caps is not None else None
                if caps is not None and enum is not None and wanted not in enum:
                    found.append((fam, vt, caps, enum))
            self._lacking[(key, wanted)] = found
        return found

    def _host_offers(self, name: str, value: str, key: str, wanted: str) -> None:
        """Forbid `name == value` on every (machine, virt type) whose domcaps enum lacks `wanted`."""
        for fam, vt, caps, enum in self._caps_lacking(key, wanted):
            listed = ", ".join(enum) or "nothing"
            self._forbid_on_host(
                f"{name}={value}:{fam}",
                [(name, frozenset([value])), ("machine", frozenset([fam]))],
                vt,
                f"the host's {fam} domcapabilities do not offer {key} '{wanted}' (they list {listed})",
                Provenance(Source.HOST, caps.source, f"enum {key}", data=(("enum", key), ("value", wanted))),
            )

    def _forbid_on_host(
        self, key: str, conds: list[tuple[str, frozenset[str]]], vt: str, message: str, prov: Provenance
    ) -> None:
        """A host fact for one virt type; when every virt type lacks it, one constraint says so for all."""
        lacking = self._host_lacks.setdefault(key, {})
        lacking[vt] = prov.where
        offered = set(self.host.virt_types(self.arch)) & set(self.problem.variables["domain.type"].values)
        if set(lacking) >= offered:
            self._superseded.update(id(c) for c in self._host_per_type.pop(key, []))
            order = self.problem.variables["domain.type"].values
            files = tuple(dict.fromkeys(lacking[v] for v in order if v in lacking))
            merged = replace(prov, where=", ".join(files), data=(*prov.data, ("files", files)))
            self._add_forbid(f"host:{key}", conds, message, merged)
        else:
            one = replace(prov, data=(*prov.data, ("files", (prov.where,))))
            count = len(self.problem.constraints)
            self._add_forbid(
                f"host:{key}:{vt}", [*conds, ("domain.type", frozenset([vt]))], f"{message} ({vt} domains)", one
            )
            if len(self.problem.constraints) > count:
                self._host_per_type.setdefault(key, []).append(self.problem.constraints[-1])

    # --- guest OS driver support --------------------------------------------------------------------
    def _guest_forbid(
        self,
        cid: str,
        conds: list[tuple[str, frozenset[str]]],
        message: str,
        detail: str,
        cites: tuple[str, ...] = (),
        inst: Instance | None = None,
        value: str = "",
    ) -> None:
        if f"guest:{cid}" in self._ids:
            return  # the same fact, reached from another value of the same variable
        if inst is not None and inst.element is not None and inst.cls.auxiliary(value):
            # the app wrote this device; without a driver it is inert, not unrunnable: warn, keep it
            if all(c.id != f"guest:{cid}" for c in self.advisories):
                merged = dict(conds)
                self.advisories.append(
                    Forbid(
                        id=f"guest:{cid}",
                        variables=tuple(merged),
                        message=message,
                        provenance=Provenance(Source.GUEST, self.guest.label, detail),
                        sets=tuple(merged.values()),
                    )
                )
            return
        prov = Provenance(
            Source.GUEST,
            self.guest.label,
            detail,
            data=(
                ("os_id", self.guest.id),
                ("short_id", self.guest.short_id),
                ("device_ids", tuple(d for d in re.split(r",? or |, ", detail) if d)),
            ),
        )
        self._add_forbid(
            f"guest:{cid}",
            conds,
            message,
            prov,
            strength=self.guest_strength,
            priority=GUEST_LENIENT_PRIORITY if self.guest_strength is Strength.SOFT else 0,
            cites=cites,
        )

    def _guest_constraints(self) -> None:
        g = self.guest
        if not g.described:
            return  # no OS named: nothing to check the devices against (a warning says so)
        for fam_name in self.problem.variables["machine"].values:
            try:
                fam = family_named(fam_name)
            except KeyError:
                continue
            if fam.guest_ids and not g.supports_any(fam.guest_ids):
                self._guest_forbid(
                    f"machine:{fam.name}",
                    [("machine", frozenset([fam.name]))],
                    f"{g.short_id} does not support {fam.guest_name or fam.name}",
                    ", ".join(fam.guest_ids),
                )
        if g.firmware_supported(self.arch, "bios") is False:
            self._guest_forbid(
                "firmware:bios",
                [("firmware", frozenset(["bios"]))],
                f"{g.short_id} does not support BIOS firmware on {self.arch}",
                "<firmware type='bios' supported='false'>",
            )
        if g.firmware_supported(self.arch, "efi") is False:
            self._guest_forbid(
                "firmware:efi",
                [("firmware", frozenset(["efi", "efi-secure"]))],
                f"{g.short_id} does not support UEFI firmware on {self.arch}",
                "<firmware type='efi' supported='false'>",
            )
        for inst in self.instances:
            for var in inst.cls.variables.values():
                for value, dev in var.guest.items():
                    if value in self.problem.variables[inst.var(var.name)].values:
                        self._guest_device(inst, var, value, dev)

    def _guest_device(self, inst: Instance, var: ClassVariable, value: str, dev: GuestDevice) -> None:
        g = self.guest
        name = inst.var(var.name)
        what = f"{inst.prefix} ({inst.xpath})"
        if dev.virtio:
            self._guest_virtio(inst, var, value, dev)
        elif dev.ids and not g.supports_any(dev.ids):
            self._guest_forbid(
                f"{name}={value}",
                [(name, frozenset([value]))],
                f"{g.short_id} has no driver for {dev.name or value} (osinfo-db lists none of its ids): "
                f"{what} cannot be {value}",
                ", ".join(dev.ids),
                inst=inst,
                value=value,
            )
        elif dev.supplement:
            lack = self.catalog.lacks(g.short_id, dev.supplement)
            if lack:
                self._guest_forbid(
                    f"{name}={value}",
                    [(name, frozenset([value]))],
                    f"{g.short_id} has no driver for {lack.name} ({lack.why}; osinfo-supplement.toml): "
                    f"{what} cannot be {value}",
                    "osinfo-supplement.toml",
                    inst=inst,
                    value=value,
                )

    def _guest_virtio(self, inst: Instance, var: ClassVariable, value: str, dev: GuestDevice) -> None:
        g = self.guest
        family = self.catalog.virtio[dev.virtio or ""]
        name = inst.var(var.name)
        has_modern = g.supports(family.modern)
        has_legacy = family.legacy is not None and g.supports(family.legacy)
        supported = {"modern": has_modern, "transitional": has_modern or has_legacy}
        what = f"{inst.prefix} ({inst.xpath})"
        if dev.fixed_mode == "modern":
            if not has_modern:
                self._guest_forbid(
                    f"{name}={value}",
                    [(name, frozenset([value]))],
                    f"{g.short_id} has no virtio 1.0 driver for {family.name} (modern-only; osinfo-db lists no "
                    f"{family.modern}): {what} cannot be {value}",
                    family.modern,
                    inst=inst,
                    value=value,
                )
            return
        mode_var = inst.var(dev.mode_from) if dev.mode_from else None
        if mode_var is None:
            models: tuple[str, ...] = ("virtio",)  # a fixed plain-virtio device (virtio-scsi controller)
        elif mode_var == name:
            models = (value,)  # the value is itself the virtio model
        else:
            models = self.problem.variables[mode_var].values
        if not supported["transitional"]:
            # no driver in any mode: one plain statement instead of one per model and machine
            needs = " or ".join(filter(None, (family.legacy, family.modern)))
            values = [value]
            if mode_var == name:  # every virtio model of this variable is the same device family
                values = [v for v, d in var.guest.items() if d.virtio == family.key]
            self._guest_forbid(
                f"{name}={'|'.join(values)}",
                [(name, frozenset(values))],
                f"{g.short_id} has no driver for {family.name} in any mode (neither osinfo-db nor "
                f"osinfo-supplement.toml lists {needs}): {what} cannot be {' or '.join(values)}",
                needs,
                inst=inst,
                value=value,
            )
            return
        for model in models:
            if model not in VIRTIO_MODELS:
                continue
            by_mode, rule_of = self._virtio_modes(model)
            for mode, fams in by_mode.items():
                if supported[mode]:
                    continue
                needs = family.modern if mode == "modern" else " or ".join(filter(None, (family.legacy, family.modern)))
                conds = [(name, frozenset([value])), ("machine", frozenset(fams))]
                if mode_var and mode_var != name:
                    conds.append((mode_var, frozenset([model])))
                shown = model if not mode_var or mode_var == name else f"{value} with model {model}"
                on = f" on {'/'.join(fams)}" if model == "virtio" else ""
                _, rules = structural()
                self._guest_forbid(
                    f"{name}={value}:{model}:{mode}",
                    conds,
                    f"{g.short_id} has no {'virtio 1.0' if mode == 'modern' else 'virtio'} driver for {family.name} "
                    f"({mode} mode): {what} cannot be {shown}{on}, since {rules[rule_of[mode]].text}",
                    needs,
                    cites=(rule_of[mode],),
                    inst=inst,
                    value=value,
                )

    def _virtio_modes(self, model: str) -> tuple[dict[str, list[str]], dict[str, str]]:
        """For a virtio model: the machines (of the machine variable) on which it runs in each mode, and the
        structural rule saying so. The same for every device of that model, so worked out once per build
        (and again only if the machine values change); callers only read the lists."""
        machines = self.problem.variables["machine"].values
        key = (model, machines)
        found = self._modes_of.get(key)
        if found is None:
            modes, _ = structural()
            by_mode: dict[str, list[str]] = {}
            rule_of: dict[str, str] = {}
            for fam in machines:
                root = _root_of(fam)
                for row in modes:
                    if row.model == model and row.root in (root, "*"):
                        by_mode.setdefault(row.mode, []).append(fam)
                        rule_of[row.mode] = row.rule
                        break
            found = self._modes_of[key] = (by_mode, rule_of)
        return found

    # --- engine defaults (soft, lowest) -------------------------------------------------------------
    def _engine_preferences(self) -> None:
        prefs, _ = engine_defaults()
        variables = self.problem.variables
        # (domain, value) -> the rest of the domain: twenty disks share one domain, so one set serves them all
        others: dict[tuple[tuple[str, ...], str], frozenset[str]] = {}
        for pref in prefs:
            if any(getattr(self.guest, k) not in v for k, v in pref.when_guest.items()):
                continue
            # one provenance per preference (frozen, so shared): a 40-device domain makes ~600 of these
            prov = Provenance(Source.ENGINE, pref.id, pref.where, data=(("preference", pref.id),))
            for mapping in self._expand([pref.variable, *pref.when]):
                name = mapping[pref.variable]
                if name not in variables:
                    continue
                domain = variables[name].values
                when = [(mapping[w], self._values(mapping[w], vals)) for w, vals in pref.when.items()]
                group = f"{pref.id}:{name}"
                # what _add_forbid would make of the `when` part, worked out once for all values (it is the
                # same for each); a shape it does not cover (a missing or repeated variable) goes through it
                names = [w for w, _ in when]
                plain = name not in names and len(set(names)) == len(names) and all(w in variables for w in names)
                if plain and any(not vals for _, vals in when):
                    continue  # can never be violated, whatever the value
                kept = [(w, vals) for w, vals in when if not vals.issuperset(variables[w].values)] if plain else []
                kept_names = (*(w for w, _ in kept), name)
                kept_sets = tuple(vals for _, vals in kept)
                for value in pref.order:
                    if value not in domain:
                        continue
                    rest = others.get((domain, value))
                    if rest is None:
                        rest = others[(domain, value)] = frozenset(v for v in domain if v != value)
                    cid, message = f"{group}={value}", f"prefer {name} = {value}: {pref.why}"
                    if not plain:
                        self._add_forbid(cid, [*when, (name, rest)], message, prov, strength=Strength.SOFT, group=group)
                    elif rest:  # else the domain is this value alone: never violated
                        # `rest` never covers the domain (it lacks `value`), so it always stays
                        self._new_forbid(
                            cid, kept_names, (*kept_sets, rest), message, prov, Strength.SOFT, 0, (), group
                        )
        for feature in self.hyperv:
            name = f"hyperv.{feature.feature}"
            self._add_forbid(
                f"engine.hyperv:{name}=on",
                [(name, frozenset(["off"]))],
                f"prefer Hyper-V {feature.feature} on for Windows guests, where the host offers it",
                Provenance(Source.ENGINE, "engine.hyperv", "engine-defaults.toml [[hyperv]]"),
                strength=Strength.SOFT,
            )
        self._order_domains()

    def _order_domains(self) -> None:
        """Put each variable's preferred values first, so the first search already finds good witnesses."""
        preferred: dict[str, list[str]] = {}
        variables = self.problem.variables
        # (domain, forbidden set) -> the one value left, or None: preferences share their sets (one per
        # domain and value), so twenty disks' preferences are worked out once
        only: dict[tuple[tuple[str, ...], frozenset[str]], str | None] = {}
        for c in self.problem.constraints:
            if c.strength is Strength.HARD or not isinstance(c, Forbid):
                continue
            for name, forbidden in zip(c.variables, c.sets, strict=True):
                values = variables[name].values
                if len(values) - len(forbidden) > 1:
                    continue  # at least two values stay allowed: not a preference for one value
                key = (values, forbidden) if isinstance(forbidden, frozenset) else None  # a set: not kept
                if key is not None and key in only:
                    one = only[key]
                else:
                    allowed = [v for v in values if v not in forbidden]
                    one = allowed[0] if len(allowed) == 1 else None
                    if key is not None:
                        only[key] = one
                order = preferred.setdefault(name, [])
                if one is not None and one not in order:
                    order.append(one)
        for name, order in preferred.items():
            var = self.problem.variables[name]
            order += [v for v in var.values if v not in order]
            self.problem.variables[name] = type(var)(var.name, tuple(order), var.label)


def _root_of(family: str) -> str:
    try:
        return family_named(family).root
    except KeyError:
        return "pci"


def build(
    domain: Domain,
    host: Host,
    guest: GuestOS,
    guest_support: str = "strict",
    profiles: list[SelectedProfile] | None = None,
    device_names: dict[str, str] | None = None,
    focus: etree._Element | None = None,
    complete: bool | None = None,
) -> Build:
    return Builder(domain, host, guest, guest_support, profiles, device_names, focus, complete).build()
