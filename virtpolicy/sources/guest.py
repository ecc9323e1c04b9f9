"""The guest OS: which devices, machines and firmware it has drivers for (osinfo-db and its supplement).

Hard under `guest_support="strict"`, soft (above engine defaults) under "lenient". A device the app
wrote that the guest cannot drive is inert, not unrunnable: an advisory, and the device stays.
"""

from __future__ import annotations

import re

from virtpolicy.core.problem import Forbid, Provenance, Source, Strength
from virtpolicy.knowledge.catalog import ClassVariable, GuestDevice
from virtpolicy.knowledge.machines import family_named, root_of
from virtpolicy.knowledge.tables import structural
from virtpolicy.sources.context import VIRTIO_MODELS, BuildContext, Instance

GUEST_LENIENT_PRIORITY = 50  # above engine defaults, below every profile preference


class GuestSource:
    name = "guest"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self._modes_of: dict[tuple[str, tuple[str, ...]], tuple[dict[str, list[str]], dict[str, str]]] = {}

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
        if self.ctx.has(f"guest:{cid}"):
            return  # the same fact, reached from another value of the same variable
        if inst is not None and inst.element is not None and inst.cls.auxiliary(value):
            # the app wrote this device; without a driver it is inert, not unrunnable: warn, keep it
            if all(c.id != f"guest:{cid}" for c in self.ctx.advisories):
                merged = dict(conds)
                self.ctx.advisories.append(
                    Forbid(
                        id=f"guest:{cid}",
                        variables=tuple(merged),
                        message=message,
                        provenance=Provenance(Source.GUEST, self.ctx.guest.label, detail),
                        sets=tuple(merged.values()),
                    )
                )
            return
        prov = Provenance(
            Source.GUEST,
            self.ctx.guest.label,
            detail,
            data=(
                ("os_id", self.ctx.guest.id),
                ("short_id", self.ctx.guest.short_id),
                ("device_ids", tuple(d for d in re.split(r",? or |, ", detail) if d)),
            ),
        )
        self.ctx.forbid(
            f"guest:{cid}",
            conds,
            message,
            prov,
            strength=self.ctx.guest_strength,
            priority=GUEST_LENIENT_PRIORITY if self.ctx.guest_strength is Strength.SOFT else 0,
            cites=cites,
        )

    def constrain(self) -> None:
        g = self.ctx.guest
        if not g.described:
            return  # no OS named: nothing to check the devices against (a warning says so)
        for fam_name in self.ctx.problem.variables["machine"].values:
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
        if g.firmware_supported(self.ctx.arch, "bios") is False:
            self._guest_forbid(
                "firmware:bios",
                [("firmware", frozenset(["bios"]))],
                f"{g.short_id} does not support BIOS firmware on {self.ctx.arch}",
                "<firmware type='bios' supported='false'>",
            )
        if g.firmware_supported(self.ctx.arch, "efi") is False:
            self._guest_forbid(
                "firmware:efi",
                [("firmware", frozenset(["efi", "efi-secure"]))],
                f"{g.short_id} does not support UEFI firmware on {self.ctx.arch}",
                "<firmware type='efi' supported='false'>",
            )
        for inst in self.ctx.instances:
            for var in inst.cls.variables.values():
                for value, dev in var.guest.items():
                    if value in self.ctx.problem.variables[inst.var(var.name)].values:
                        self._guest_device(inst, var, value, dev)

    def _guest_device(self, inst: Instance, var: ClassVariable, value: str, dev: GuestDevice) -> None:
        g = self.ctx.guest
        name = inst.var(var.name)
        what = f"{inst.prefix} ({inst.xpath})"
        if dev.virtio:
            self._guest_virtio(inst, var, value, dev)
        else:
            missing = self._missing_driver(dev, value)
            if missing is not None:
                reason, source = missing
                self._guest_forbid(
                    f"{name}={value}",
                    [(name, frozenset([value]))],
                    f"{g.short_id} {reason}: {what} cannot be {value}",
                    source,
                    inst=inst,
                    value=value,
                )

    def _missing_driver(self, dev: GuestDevice, value: str) -> tuple[str, str] | None:
        """Why the guest has no driver for a non-virtio value (and where that is known from), if it has none."""
        g = self.ctx.guest
        if dev.ids and not g.supports_any(dev.ids):
            return f"has no driver for {dev.name or value} (osinfo-db lists none of its ids)", ", ".join(dev.ids)
        if dev.assumed and self.ctx.arch in dev.not_on:
            why = f"on {self.ctx.arch} has no driver for {value}: {dev.assumed}; osinfo-db lists none (catalog.toml)"
            return why, "catalog.toml"
        if dev.supplement:
            lack = self.ctx.catalog.lacks(g.short_id, dev.supplement)
            if lack:
                return f"has no driver for {lack.name} ({lack.why}; osinfo-supplement.toml)", "osinfo-supplement.toml"
        return None

    def _guest_virtio(self, inst: Instance, var: ClassVariable, value: str, dev: GuestDevice) -> None:
        g = self.ctx.guest
        family = self.ctx.catalog.virtio[dev.virtio or ""]
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
            models = self.ctx.problem.variables[mode_var].values
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
        machines = self.ctx.problem.variables["machine"].values
        key = (model, machines)
        found = self._modes_of.get(key)
        if found is None:
            modes, _ = structural()
            by_mode: dict[str, list[str]] = {}
            rule_of: dict[str, str] = {}
            for fam in machines:
                root = root_of(fam)
                for row in modes:
                    if row.model == model and row.root in (root, "*"):
                        by_mode.setdefault(row.mode, []).append(fam)
                        rule_of[row.mode] = row.rule
                        break
            found = self._modes_of[key] = (by_mode, rule_of)
        return found
