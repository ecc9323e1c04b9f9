"""The custom CPU of a common domain: the baseline of the hosts' host-model CPUs.

Two ways to compute it:
- `cpu_map`: the engine's own, from each host's domcapabilities `<mode name='host-model'>` and libvirt's
  CPU map (/usr/share/libvirt/cpu_map). The shared feature set is the intersection of the host-model CPUs
  (model features + required - disabled); the model is the richest cpu_map model usable on every host
  whose features all hosts provide; the features the hosts share beyond it are required, less those
  cpu_map marks migratable='no'. Hosts of different vendors have no baseline, as in libvirt
  (src/cpu/cpu_x86.c virCPUx86Baseline: "CPU vendors do not match"). On libvirt's own test-suite
  domcapabilities (QEMU 4.2 to 8.0) this provides exactly the features libvirt's cpu_map baseline
  (`virsh cpu-baseline --migratable`) does (tests/test_plan_cpu_baseline.py).
- `libvirt`: when hosts are live (their bundle's host.toml or the inventory names a URI), the hosts'
  host-model CPUs go to `virsh hypervisor-cpu-baseline --migratable` (virConnectBaselineHypervisorCPU)
  on each live host in turn, each answer joining the next host's input, so the result is a CPU every live
  hypervisor can provide (its QEMU's own migratability and the model's blockers, disabled explicitly),
  compatible with every chosen host's host-model CPU. libvirt's answer is then used, and the engine's is
  compared with it feature by feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from lxml import etree

from virtpolicy.errors import HostError
from virtpolicy.inputs.host import DomainCaps

CPU_MAP_METHOD = "cpu_map"
LIBVIRT_METHOD = "libvirt hypervisor-cpu-baseline"


@dataclass(frozen=True)
class BaselineCpu:
    model: str
    features: tuple[str, ...]  # required on top of the model
    disabled: tuple[str, ...] = ()  # features of the model turned off
    vendor: str = ""

    def element(self) -> etree._Element:
        cpu = etree.Element("cpu", mode="custom", match="exact", check="partial")
        etree.SubElement(cpu, "model", fallback="forbid").text = self.model
        if self.vendor:
            etree.SubElement(cpu, "vendor").text = self.vendor
        for name in self.features:
            etree.SubElement(cpu, "feature", policy="require", name=name)
        for name in self.disabled:
            etree.SubElement(cpu, "feature", policy="disable", name=name)
        return cpu

    def provides(self) -> frozenset[str]:
        """The CPU features a guest with this CPU sees."""
        return effective(self.model, self.features, self.disabled)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "vendor": self.vendor or None,
            "features": list(self.features),
            "disabled": list(self.disabled),
        }


def _x86(arch: str) -> bool:
    return arch in ("x86_64", "i686")


def effective(model: str, required: Sequence[str], disabled: Sequence[str] = ()) -> frozenset[str]:
    from virtpolicy.inputs.cpu_map import cpu_models

    models = cpu_models("x86")
    base = models[model].features if model in models else frozenset()
    return (base | frozenset(required)) - frozenset(disabled)


def host_features(caps: DomainCaps) -> frozenset[str]:
    """What a host's host-model CPU provides: its model's features plus the required ones, less disabled."""
    return effective(caps.host_model, tuple(caps.host_model_features), tuple(caps.host_model_disabled))


@cache
def not_migratable() -> frozenset[str]:
    from virtpolicy.inputs.cpu_map import CPU_MAP
    from virtpolicy.inputs.xmlsafe import parse_file

    root = parse_file(CPU_MAP / "x86_features.xml").getroot()
    return frozenset(f.get("name", "") for f in root.iter("feature") if f.get("migratable") == "no")


def vendors_differ(caps: Sequence[DomainCaps]) -> str:
    """The vendors, when the host-model CPUs name more than one ("" otherwise)."""
    named = sorted({c.host_model_vendor for c in caps if c.host_model_vendor})
    return ", ".join(named) if len(named) > 1 else ""


def engine_baseline(caps: Sequence[DomainCaps]) -> tuple[BaselineCpu | None, str]:
    """The cpu_map baseline and, when there is none, why."""
    from virtpolicy.inputs.cpu_map import cpu_models

    caps = list(caps)
    if not caps:
        return None, "no domcapabilities for the domain's machine on these hosts"
    if not all(c.host_model for c in caps):
        return None, "a host reports no host-model CPU"
    if not _x86(caps[0].arch):
        return None, f"the engine's baseline knows x86 only ({caps[0].arch})"
    models = cpu_models("x86")
    unknown = sorted({c.host_model for c in caps if c.host_model not in models})
    if unknown:
        return None, f"host-model CPU {', '.join(unknown)} is not in libvirt's cpu_map"
    vendors = vendors_differ(caps)
    if vendors:
        return None, f"the hosts' CPU vendors differ ({vendors}): libvirt has no baseline of them either"
    vendor = next((c.host_model_vendor for c in caps if c.host_model_vendor), "")
    shared = frozenset.intersection(*(host_features(c) for c in caps))
    everywhere = [
        m
        for m in caps[0].usable_models
        if all(m in c.usable_models for c in caps[1:]) and m in models and models[m].vendor in ("", vendor)
    ]
    fitting = [m for m in everywhere if models[m].features <= shared]
    if not fitting:
        return None, "no cpu_map model usable on every host fits the features they share"
    best = max(fitting, key=lambda m: (len(models[m].features), m))
    extra = sorted(shared - models[best].features - not_migratable())
    return BaselineCpu(best, tuple(extra)), ""


def host_model_xml(caps: DomainCaps) -> str:
    """A host's host-model CPU as the <cpu> virsh makes of domcapabilities' <mode name='host-model'>."""
    cpu = etree.Element("cpu", mode="custom", match="exact")
    etree.SubElement(cpu, "model", fallback="forbid").text = caps.host_model
    if caps.host_model_vendor:
        etree.SubElement(cpu, "vendor").text = caps.host_model_vendor
    for name in sorted(caps.host_model_features):
        etree.SubElement(cpu, "feature", policy="require", name=name)
    for name in sorted(caps.host_model_disabled):
        etree.SubElement(cpu, "feature", policy="disable", name=name)
    return etree.tostring(cpu, encoding="unicode")


def parse_cpu(xml: str) -> BaselineCpu:
    root = etree.fromstring(xml.encode())
    return BaselineCpu(
        model=(root.findtext("model") or "").strip(),
        features=tuple(f.get("name", "") for f in root.iterfind("feature") if f.get("policy", "require") == "require"),
        disabled=tuple(f.get("name", "") for f in root.iterfind("feature") if f.get("policy") == "disable"),
        vendor=(root.findtext("vendor") or "").strip(),
    )


def libvirt_baseline(
    uris: Sequence[str], caps: Sequence[DomainCaps], arch: str, virt_type: str, machine: str
) -> BaselineCpu:
    """virConnectBaselineHypervisorCPU over every host-model CPU, on each live host in turn."""
    from virtpolicy.inputs.capture import hypervisor_cpu_baseline

    cpus = [host_model_xml(c) for c in caps]
    answer = ""
    for uri in uris:
        answer = hypervisor_cpu_baseline(uri, cpus + ([answer] if answer else []), arch, virt_type, machine)
    return parse_cpu(answer)


@dataclass
class CpuChoice:
    """The CPU a common domain gets, how it was computed, and how the two methods compare."""

    cpu: BaselineCpu | None
    method: str  # cpu_map | libvirt hypervisor-cpu-baseline | "" (no CPU)
    engine: BaselineCpu | None = None
    reason: str = ""  # why there is no CPU, or why libvirt was not the method though hosts are live
    uris: list[str] = field(default_factory=list)
    only_engine: list[str] = field(default_factory=list)  # features the engine's CPU provides and libvirt's not
    only_libvirt: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool | None:
        if self.method != LIBVIRT_METHOD:
            return None
        return not self.only_engine and not self.only_libvirt

    def to_dict(self) -> dict[str, Any] | None:
        if self.cpu is None:
            return None
        out: dict[str, Any] = {**self.cpu.to_dict(), "method": self.method}
        if self.reason:
            out["note"] = self.reason
        if self.method == LIBVIRT_METHOD:
            out["libvirt"] = {"uris": self.uris, "command": "virsh hypervisor-cpu-baseline --migratable"}
            out["check"] = {
                "engine": self.engine.to_dict() if self.engine else None,
                "agrees": self.agrees,
                "only_engine": self.only_engine,
                "only_libvirt": self.only_libvirt,
            }
        return out


def choose_cpu(caps: Sequence[DomainCaps], uris: Sequence[str], arch: str, virt_type: str, machine: str) -> CpuChoice:
    """libvirt's baseline when some host is live and answers, checked against the engine's; else the engine's.
    A live host that does not answer at all leaves the engine's baseline, with a note; one that answers with
    an error (libvirt refuses these CPUs: different vendors) means there is no baseline, as libvirt says."""
    from virtpolicy.inputs.capture import Unreachable

    engine, why = engine_baseline(caps)
    if not uris:
        return CpuChoice(engine, CPU_MAP_METHOD if engine else "", engine, why)
    try:
        answer = libvirt_baseline(uris, caps, arch, virt_type, machine)
    except Unreachable as exc:
        note = f"libvirt could not be asked ({exc}); the engine's cpu_map baseline is used"
        return CpuChoice(engine, CPU_MAP_METHOD if engine else "", engine, note if engine else why)
    except HostError as exc:
        return CpuChoice(None, "", engine, f"libvirt computes no baseline: {exc}", list(uris))
    choice = CpuChoice(answer, LIBVIRT_METHOD, engine, "", list(uris))
    if engine is not None:
        mine, theirs = engine.provides(), answer.provides()
        choice.only_engine = sorted(mine - theirs)
        choice.only_libvirt = sorted(theirs - mine)
    else:
        choice.reason = f"the engine's cpu_map method has none: {why}"
    return choice
