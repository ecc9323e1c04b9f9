"""The app's own XML: the variables its devices and domain-wide settings open, and the values it pins.

The strongest source: what the app wrote is a hard requirement with its XPath as provenance, and in a
domain libvirt has already laid out, what it left out stays out.
"""

from __future__ import annotations

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import Domain, Explicit, xpath_of
from virtpolicy.knowledge.catalog import DeviceClass
from virtpolicy.knowledge.firmware import firmware_inferences
from virtpolicy.knowledge.machines import families, family_of
from virtpolicy.knowledge.tables import HypervFeature
from virtpolicy.knowledge.vocabulary import global_variables
from virtpolicy.sources.context import VIRTIO_MODELS, BuildContext, Instance


def hyperv_written(domain: Domain, feature: HypervFeature) -> Explicit | None:
    """The app's value of a Hyper-V feature (or its timer), or None when it wrote none."""
    if feature.timer:
        el = domain.root.find(f"clock/timer[@name='{feature.feature}']")
        if el is None:
            return None
        on = el.get("present", "yes") == "yes"
        return Explicit("on" if on else "off", xpath_of(el))
    el = domain.root.find(f"features/hyperv/{feature.feature}")
    if el is None:
        return None
    return Explicit(el.get("state", "on") == "on" and "on" or "off", xpath_of(el) + "/@state")


class AppSource:
    name = "app"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx

    def declare(self) -> None:
        self._global_variables()
        self._device_variables()
        for fact in self.ctx.written:
            self.ctx.declare(fact.variable, [fact.value, fact.ABSENT], fact.rule.text)

    def constrain(self) -> None:
        self._app_constraints()

    def _global_variables(self) -> None:
        vtypes = [*global_variables()["domain.type"].decides, *self.ctx.host.virt_types(self.ctx.arch)]
        app_type = self.ctx.domain.attr("", "type")
        self.ctx.problem.add_variable("domain.type", vtypes + ([app_type.value] if app_type else []), "domain type")
        fams = [f.name for f in families() if self.ctx.arch in f.arches]
        if self.ctx.app_machine:
            fam = family_of(self.ctx.app_machine.value)
            fams.append(fam.name if fam else self.ctx.app_machine.value)
        self.ctx.problem.add_variable("machine", fams, "machine type")
        for var in global_variables().values():
            if var.name not in ("domain.type", "machine"):
                self.ctx.problem.add_variable(var.name, var.decides, var.label)

    def _device_variables(self) -> None:
        for cls in self.ctx.catalog.classes.values():
            elements = self.ctx.domain.devices(cls.element)
            if cls.singleton:
                self._one_of_a_kind(cls, elements)
                elements = elements[:1] or [None]  # type: ignore[list-item]
            for index, element in enumerate(elements):
                if self.ctx.focus is not None and element is not self.ctx.focus:
                    continue  # laid out already: context, not a decision
                inst = Instance(cls, index, element)
                self.ctx.instances.append(inst)
                for var in cls.variables.values():
                    values = list(var.values)
                    explicit = inst.explicit(var)
                    if explicit and explicit.value not in values:
                        values.append(explicit.value)
                    self.ctx.problem.add_variable(inst.var(var.name), values, f"{cls.label} {inst.xpath}")

    def _one_of_a_kind(self, cls: DeviceClass, elements: list[etree._Element]) -> None:
        """A hot-plugged device of a kind the domain may have once, when it has one already."""
        if self.ctx.focus is not None and self.ctx.focus in elements and len(elements) > 1:
            first = next(e for e in elements if e is not self.ctx.focus)
            raise InputError(
                f"{self.ctx.domain.source}: {xpath_of(first)}: the domain has a {cls.label} already, and virtpolicy "
                f"decides one per domain; the new <{self.ctx.focus.tag}> cannot be added"
            )

    def _app_constraints(self) -> None:
        dom = self.ctx.domain
        app_type = dom.attr("", "type")
        if app_type:
            self.ctx.pin("domain.type", [app_type.value], app_type, f"the domain type is {app_type.value}")
        if self.ctx.app_machine:
            fam = family_of(self.ctx.app_machine.value)
            value = fam.name if fam else self.ctx.app_machine.value
            self.ctx.pin("machine", [value], self.ctx.app_machine, f"the machine is {self.ctx.app_machine.value}")
        firmware = self._app_firmware()
        if firmware:
            allowed, explicit = firmware
            self.ctx.pin("firmware", allowed, explicit, f"the firmware is {' or '.join(allowed)}")
        for name, path, attr, absent_value in (
            (v.name, v.path, v.attribute, v.absent) for v in global_variables().values() if v.element
        ):
            explicit = dom.attr(path, attr)
            if explicit is None and name == "cpu.mode" and dom.root.find("cpu/model") is not None:
                explicit = Explicit("custom", xpath_of(dom.root.find("cpu")))
            if explicit is not None:
                self.ctx.problem.add_variable(name, [explicit.value])
                self.ctx.pin(name, [explicit.value], explicit, f"{name} is {explicit.value}")
            elif self.ctx.realized:
                where = Explicit(absent_value, f"/domain ({path}/@{attr} absent in a realized domain)")
                self.ctx.pin(
                    name, [absent_value], where, f"{name} stays {absent_value}: the domain is already laid out"
                )
        for feature in self.ctx.hyperv:
            explicit = hyperv_written(self.ctx.domain, feature)
            name = f"hyperv.{feature.feature}"
            if explicit is not None:
                self.ctx.pin(name, [explicit.value], explicit, f"Hyper-V {feature.feature} is {explicit.value}")
            elif self.ctx.realized:
                where = Explicit("off", f"/domain/features/hyperv ({feature.feature} absent in a realized domain)")
                self.ctx.pin(
                    name, ["off"], where, f"Hyper-V {feature.feature} stays off: the domain is already laid out"
                )
        for inst in self.ctx.instances:
            self._app_device_constraints(inst)
        for fact in self.ctx.written:
            self.ctx.pin(fact.variable, [fact.value], Explicit(fact.value, fact.xpath), fact.what)

    def _app_firmware(self) -> tuple[list[str], Explicit] | None:
        """The firmware the app's <os> already asks for: the first firmware.toml row that matches."""
        for row in firmware_inferences():
            found = row.read(self.ctx.domain.root)
            if found is not None:
                el, value, step = found
                return row.allowed(value), Explicit(value, xpath_of(el) + (step if row.points_at == "value" else ""))
        if self.ctx.realized:
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
                self.ctx.pin(name, allowed, explicit, f"{inst.prefix} {var.name} is {explicit.value}")
            elif inst.element is not None and inst.cls.singleton and "none" in var.values:
                here = Explicit("present", inst.xpath)
                self.ctx.pin(name, [v for v in var.values if v != "none"], here, f"the app wants a {inst.cls.label}")
            elif inst.element is None and self.ctx.realized and "none" in var.values:
                here = Explicit("absent", f"/domain/devices (no {inst.cls.label} in a realized domain)")
                self.ctx.pin(name, ["none"], here, f"no {inst.cls.label}: the domain is already laid out")
        if inst.cls.name in ("disk", "cdrom") and inst.element is not None:
            target = inst.element.find("target")
            dev = target.get("dev") if target is not None else None
            if dev and target.get("bus") is None:
                buses = [
                    b
                    for b in self.ctx.catalog.buses_for_target(dev)
                    if b in self.ctx.problem.variables[inst.var("bus")].values
                ]
                if buses:
                    here = Explicit(dev, xpath_of(target) + "/@dev")
                    self.ctx.pin(
                        inst.var("bus"), buses, here, f"{inst.prefix} target '{dev}' implies bus {' or '.join(buses)}"
                    )
        if inst.cls.name == "disk" and inst.element is not None:
            bus = inst.explicit(inst.cls.variables["bus"])
            model = inst.explicit(inst.cls.variables["model"])
            if model is None and bus is not None and bus.value == "virtio" and inst.has_address:
                # libvirt laid this disk out as plain virtio: its mode is fixed by its address
                here = Explicit("virtio", inst.xpath + "/address")
                self.ctx.pin(inst.var("model"), ["virtio"], here, f"{inst.prefix} stays plain virtio at its address")
