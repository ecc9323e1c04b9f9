"""The facts a profile condition may name: the guest OS, the host and the domain.

Conditions are checked against this vocabulary when a profile is loaded, so a typo is reported with its
file:line instead of silently never firing. Solver variables (`machine`, `disk.bus`, ...) are the other
half of the vocabulary; those stay symbolic and become implications inside the solve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.guestos import GuestOS
from virtpolicy.inputs.host import Host
from virtpolicy.inputs.units import to_kib
from virtpolicy.profiles.expr import ExprError, Value

FACT_NAMES: dict[str, str] = {
    "os.id": "osinfo URI of the guest OS",
    "os.short_id": "osinfo short id (rhel6.10, win11)",
    "os.family": "osinfo family (linux, winnt, freebsd, ...)",
    "os.version": "osinfo version string",
    "os.name": "osinfo name",
    "os.is_windows": "true for the winnt/win9x/win16 families",
    "host.arch": "the host CPU architecture",
    "host.virt_types": "list of domain types the host offers (kvm, qemu)",
    "host.machines": "list of machine families the host offers (q35, pc, ...)",
    "host.numa_cells": "number of host NUMA cells",
    "domain.name": "the domain's <name>",
    "domain.vcpus": "the domain's vCPU count",
    "domain.memory_mib": "the domain's memory in MiB",
    "domain.arch": "the guest architecture",
    "domain.disks": "number of <disk> elements",
    "domain.interfaces": "number of <interface> elements",
}
FUNCTIONS: dict[str, str] = {
    "os.supports": "os.supports(DEVICE): the guest has a driver for an osinfo device (name or id)",
    "host.has": "host.has(FEATURE): a domcaps enum lists it, e.g. 'hyperv.relaxed', 'video.qxl'",
    "domain.xpath": "domain.xpath(XPATH): the string value of an XPath over the app's domain XML",
    "len": "len(LIST)",
    "min": "min(A, B)",
    "max": "max(A, B)",
}
FUNCTION_NAMES = frozenset(FUNCTIONS)

# host.has("KEY.VALUE"): which domcaps enum KEY names
HOST_ENUMS = {
    "hyperv": "features/hyperv/features",
    "video": "devices/video/modelType",
    "graphics": "devices/graphics/type",
    "disk.bus": "devices/disk/bus",
    "disk.model": "devices/disk/model",
    "rng": "devices/rng/model",
    "tpm": "devices/tpm/model",
    "tpm.backend": "devices/tpm/backendModel",
    "firmware": "os/firmware",
    "loader.secure": "os/loader/secure",
    "cpu.mode": "cpu/mode",
    "redirdev": "devices/redirdev/bus",
    "channel": "devices/channel/type",
}


@dataclass
class Facts:
    """Resolves fact names and fact functions for one (domain, guest, host)."""

    domain: Domain
    guest: GuestOS
    host: Host
    arch: str
    device_names: dict[str, str]  # osinfo device name -> id

    def resolve(self, name: str) -> Value:
        g, h, d = self.guest, self.host, self.domain
        table: dict[str, Callable[[], Value]] = {
            "os.id": lambda: g.id,
            "os.short_id": lambda: g.short_id,
            "os.family": lambda: g.family,
            "os.version": lambda: g.version,
            "os.name": lambda: g.name,
            "os.is_windows": lambda: g.is_windows,
            "host.arch": lambda: h.arch,
            "host.virt_types": lambda: h.virt_types(self.arch),
            "host.machines": lambda: sorted({f for vt in h.virt_types(self.arch) for f in h.families(self.arch, vt)}),
            "host.numa_cells": lambda: h.host_numa_cells,
            "domain.name": lambda: d.name,
            "domain.vcpus": lambda: d.vcpus,
            "domain.memory_mib": self._memory_mib,
            "domain.arch": lambda: self.arch,
            "domain.disks": lambda: len(d.devices("disk")),
            "domain.interfaces": lambda: len(d.devices("interface")),
        }
        if name not in table:
            raise ExprError(f"unknown name '{name}'")
        return table[name]()

    def _memory_mib(self) -> int:
        """<memory> in whole MiB, from the KiB libvirt stores (inputs.units: every unit libvirt's
        virScaleInteger reads, rounded up to KiB as libvirt does)."""
        el = self.domain.root.find("memory")
        if el is None or not (el.text or "").strip().isdigit():
            return 0
        return to_kib(el.text or "", el.get("unit")) // 1024

    def functions(self) -> dict[str, Callable[..., Value]]:
        return {
            "os.supports": self._supports,
            "host.has": self._host_has,
            "domain.xpath": self._xpath,
            "len": lambda v: len(v) if isinstance(v, list | str) else 0,
            "min": lambda a, b: min(a, b),  # type: ignore[type-var]
            "max": lambda a, b: max(a, b),  # type: ignore[type-var]
        }

    def _supports(self, device: Value) -> bool:
        key = str(device)
        return self.guest.supports(self.device_names.get(key, key))

    def _host_has(self, feature: Value) -> bool:
        text = str(feature)
        for prefix, key in sorted(HOST_ENUMS.items(), key=lambda kv: -len(kv[0])):
            if text.startswith(prefix + "."):
                value = text[len(prefix) + 1 :]
                return any(value in (caps.enum(key) or ()) for caps in self.host.domcaps if caps.arch == self.arch)
        raise ExprError(f"host.has('{text}'): unknown feature; use one of {', '.join(sorted(HOST_ENUMS))} + '.VALUE'")

    def _xpath(self, path: Value) -> str:
        try:
            result = self.domain.root.xpath(str(path), smart_strings=False)
        except etree.XPathError as exc:
            raise ExprError(f"domain.xpath('{path}'): {exc}") from None
        if isinstance(result, list):
            if not result:
                return ""
            first = result[0]
            return first if isinstance(first, str) else (first.text or "" if hasattr(first, "text") else str(first))
        if isinstance(result, float) and result.is_integer():
            return str(int(result))
        return str(result)
