"""`virtpolicy plan common`: one complete domain that runs on every host of a fleet.

The engine solves the template against a *common host*: the intersection of every class's capabilities
(machine versions present on all, enums offered by all, loaders, Hyper-V features, the smallest vCPU and
NUMA limits), so whatever it decides is available everywhere. Two values need more than intersection:
- the machine: an alias such as q35 means a different version on each host, so the common host names the
  newest version every host has (pc-q35-6.2 for a 6.2/7.2/8.0 fleet), which the domain then pins;
- the CPU: host-passthrough and host-model differ per host, so the template gets a custom CPU, the
  baseline of the hosts' host-model CPUs: the richest cpu_map model usable on every host, plus the
  features all host-model CPUs add on top of it, without those libvirt marks non-migratable. This follows
  virCPUx86Baseline's idea from the cpu_map data and the domcapabilities, not its exact code; with live
  hosts `virsh hypervisor-cpu-baseline` is the reference.
The result is then checked as it stands on every class (`Engine.check`), which is the promise: it runs on
each host unchanged.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from virtpolicy.errors import HostError
from virtpolicy.inputs.host import DomainCaps, GuestMachine, Host
from virtpolicy.knowledge.machines import family_of

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.results import Result

SCHEMA = "virtpolicy-plan-common/1"
NOT_FOR_MIGRATION = ("host-passthrough", "maximum", "host-model")  # per-host CPUs: never common


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name)) or (0,)


def _common_machines(hosts: Sequence[Host], key: tuple[str, str]) -> list[GuestMachine]:
    """Machine names every host lists for (arch, virt type); aliases point at the newest common version."""
    lists = [h.machines.get(key, []) for h in hosts]
    if not all(lists):
        return []
    names = [m.name for m in lists[0] if all(any(o.name == m.name for o in other) for other in lists[1:])]
    limits = {n: min(m.max_cpus for lst in lists for m in lst if m.name == n) for n in names}
    versioned = [n for n in names if n not in {m.name for lst in lists for m in lst if m.canonical != m.name}]
    machines = []
    for name in names:
        is_alias = any(m.name == name and m.canonical != m.name for m in lists[0])
        canonical = name
        if is_alias:
            fam = family_of(name)
            same = [n for n in versioned if fam is not None and family_of(n) == fam]
            if not same:
                continue  # the alias means no version all hosts share
            canonical = max(same, key=_version)
        machines.append(GuestMachine(name, canonical, limits[name]))
    return machines


def _common_caps(caps: Sequence[DomainCaps], machine: str) -> DomainCaps:
    """The enums, loaders and limits every one of these domcapabilities offers."""
    keys = set().union(*(c.present for c in caps))
    enums: dict[str, tuple[str, ...]] = {}
    for key in keys:
        known = [c.enum(key) for c in caps if c.enum(key) is not None]
        first = known[0] or ()
        enums[key] = tuple(v for v in first if all(v in k for k in known[1:]))  # type: ignore[operator]
    first = caps[0]
    return DomainCaps(
        source=f"common/domcaps-{first.arch}-{machine}-{first.virt_type}.xml (all {len(caps)} classes)",
        machine=machine,
        virt_type=first.virt_type,
        arch=first.arch,
        vcpu_max=min(c.vcpu_max for c in caps),
        enums=enums,
        present=frozenset(keys),
        loaders=tuple(v for v in first.loaders if all(v in c.loaders for c in caps[1:])),
        cpu_modes=tuple(m for m in first.cpu_modes if all(m in c.cpu_modes for c in caps[1:])),
        hyperv_features=tuple(f for f in first.hyperv_features if all(f in c.hyperv_features for c in caps[1:])),
        unsupported=frozenset().union(*(c.unsupported for c in caps)),
        usable_models=tuple(m for m in first.usable_models if all(m in c.usable_models for c in caps[1:])),
    )


def common_host(hosts: Sequence[Host], name: str = "common") -> Host:
    """A host offering exactly what every given host offers (HostError when they share no machine)."""
    if not hosts:
        raise HostError("plan common: no hosts to plan for")
    arches = {h.arch for h in hosts}
    if len(arches) > 1:
        raise HostError(f"plan common: the hosts have different architectures ({', '.join(sorted(arches))})")
    common = Host(source=name, arch=hosts[0].arch, host_numa_cells=min(h.host_numa_cells for h in hosts))
    common.caps_source = f"{name} (intersection of {len(hosts)} host classes)"
    for key in hosts[0].machines:
        machines = _common_machines(hosts, key)
        if not machines:
            continue
        common.machines[key] = machines
        arch, virt_type = key
        for fam in dict.fromkeys(f.name for m in machines if (f := family_of(m.name)) is not None):
            caps = [h.domcaps_for(arch, virt_type, fam) for h in hosts]
            if any(c is None for c in caps):
                continue
            versions = [m.canonical for m in machines if (f := family_of(m.canonical)) and f.name == fam]
            machine = max(versions, key=_version) if versions else caps[0].machine  # type: ignore[union-attr]
            common.domcaps.append(_common_caps(caps, machine))  # type: ignore[arg-type]
    if not common.domcaps:
        raise HostError("plan common: the hosts share no machine type that their domcapabilities describe")
    return common


@dataclass(frozen=True)
class BaselineCpu:
    model: str
    features: tuple[str, ...]  # required on top of the model

    def element(self) -> etree._Element:
        cpu = etree.Element("cpu", mode="custom", match="exact", check="partial")
        etree.SubElement(cpu, "model", fallback="forbid").text = self.model
        for name in self.features:
            etree.SubElement(cpu, "feature", policy="require", name=name)
        return cpu


def baseline_cpu(caps: Iterable[DomainCaps]) -> BaselineCpu | None:
    """The richest model usable on every host, plus the features all host-model CPUs add on top of it."""
    from virtpolicy.inputs.cpu_map import cpu_models

    caps = list(caps)
    if not caps or not all(c.host_model for c in caps):
        return None
    models = cpu_models("x86" if caps[0].arch in ("x86_64", "i686") else caps[0].arch)
    if not all(c.host_model in models for c in caps):
        return None
    everywhere = [m for m in caps[0].usable_models if all(m in c.usable_models for c in caps[1:]) and m in models]
    hosts = [(models[c.host_model].features | c.host_model_features) - c.host_model_disabled for c in caps]
    shared = frozenset.intersection(*hosts)
    fitting = [m for m in everywhere if models[m].features <= shared]
    if not fitting:
        return None
    best = max(fitting, key=lambda m: (len(models[m].features), m))
    extra = sorted(shared - models[best].features - _not_migratable())
    return BaselineCpu(best, tuple(extra))


def _not_migratable() -> frozenset[str]:
    from virtpolicy.inputs.cpu_map import CPU_MAP
    from virtpolicy.inputs.xmlsafe import parse_file

    root = parse_file(CPU_MAP / "x86_features.xml").getroot()
    return frozenset(f.get("name", "") for f in root.iter("feature") if f.get("migratable") == "no")


@dataclass
class CommonPlan:
    classes: list[str]
    result: Result
    cpu: BaselineCpu | None
    fits: dict[str, bool] = field(default_factory=dict)  # class -> the XML checks as it stands there

    @property
    def feasible(self) -> bool:
        return self.result.feasible and all(self.fits.values())

    def to_dict(self) -> dict[str, Any]:
        root = etree.fromstring(self.result.xml_bytes) if self.result.xml_bytes else None
        machine = root.find("os/type").get("machine", "") if root is not None else ""  # type: ignore[union-attr]
        return {
            "schema": SCHEMA,
            "status": "solved" if self.feasible else "conflict",
            "classes": self.classes,
            "machine": machine,
            "cpu": {"model": self.cpu.model, "features": list(self.cpu.features)} if self.cpu else None,
            "fits": self.fits,
            "xml": self.result.xml or "",
            "conflict": [m.to_dict() for c in self.result.conflicts for m in c.members],
        }


def with_cpu(domain: bytes, cpu: BaselineCpu | None) -> bytes:
    """The template with the baseline CPU, unless the app wrote a <cpu> mode itself."""
    root = etree.fromstring(domain)
    existing = root.find("cpu")
    if cpu is None or (existing is not None and existing.get("mode")):
        return domain
    element = cpu.element()
    if existing is not None:  # keep its <numa>, <topology>: only the model is ours
        for child in existing:
            element.append(copy.deepcopy(child))
        root.replace(existing, element)
    else:
        anchor = root.find("os")
        (anchor.addnext(element) if anchor is not None else root.append(element))
    return etree.tostring(root)


def plan_common(
    engine: Engine, classes: Sequence[str], domain: bytes, source: str, profiles: Sequence[str] = (),
    os: str | None = None, guest_support: str = "strict",
) -> CommonPlan:  # fmt: skip
    """One domain for every given class of `engine`'s hosts, checked on each of them."""
    from virtpolicy.engine import Engine

    hosts = [engine.host(c) for c in classes]
    common = common_host(hosts, f"common-of-{len(hosts)}-classes")
    kvm_caps = [c for h in hosts for c in h.domcaps[:1]]
    cpu = baseline_cpu(kvm_caps) if all(c.virt_type == "kvm" for c in kvm_caps) else None
    shared = Engine({"common": common}, osinfo_db=engine.osinfo, profile_path=engine.profile_path)
    template = with_cpu(domain, cpu)
    result = shared.solve(template, profiles=profiles, os=os, guest_support=guest_support, source=source)
    plan = CommonPlan(list(classes), result, cpu)
    if result.feasible and result.xml_bytes:
        for c in classes:
            plan.fits[c] = engine.check(result.xml_bytes, profiles=profiles, os=os, host=c, source=source).feasible
    return plan


def capability_tokens(host: Host) -> frozenset[str]:
    """Everything a host offers, one token per fact: machine names, every domcapabilities enum value,
    loader, CPU mode and model, Hyper-V feature and host-model CPU feature, per machine family. What a
    set of hosts can share is the intersection of their tokens."""
    tokens = {f"machine:{arch}:{vt}:{m.name}" for (arch, vt), ms in host.machines.items() for m in ms}
    for caps in host.domcaps:
        fam = family_of(caps.machine)
        where = f"{caps.arch}:{caps.virt_type}:{fam.name if fam else caps.machine}"
        tokens |= {f"{where}:{key}={value}" for key, values in caps.enums.items() for value in values}
        tokens |= {f"{where}:loader={v}" for v in caps.loaders}
        tokens |= {f"{where}:hyperv={v}" for v in caps.hyperv_features}
        tokens |= {f"{where}:cpu-model={v}" for v in caps.usable_models}
        tokens |= {f"{where}:cpu-feature={v}" for v in caps.host_model_features}
    tokens |= {f"numa-cells>={n}" for n in range(1, host.host_numa_cells + 1)}
    return frozenset(tokens)


@dataclass(frozen=True)
class Choice:
    """The classes to plan for, the ones left out, and what each left-out class would cost if kept."""

    chosen: tuple[str, ...]
    left_out: tuple[str, ...]
    capability: int  # tokens the chosen classes share
    cost_of: dict[str, tuple[str, ...]]  # left-out class -> the shared tokens keeping it would lose
    exact: bool = True


def choose_classes(hosts: dict[str, Host], weights: dict[str, int], min_hosts: int) -> Choice | None:
    """The classes (with at least `min_hosts` hosts) that share the most capability, exactly.

    Keeping a token means leaving out every class that lacks it, so the problem is a set-union knapsack:
    pick token groups (tokens lacked by the same classes) to maximise the tokens kept, subject to the
    hosts of the union of their lacking classes fitting in the budget (total hosts - min_hosts).
    Solved by depth-first branch and bound over the groups (bound: tokens still pickable); ties keep more
    hosts, then the earlier classes. None when fewer than `min_hosts` hosts exist.
    """
    classes = list(hosts)
    total = sum(weights[c] for c in classes)
    if min_hosts > total:
        return None
    budget = total - min_hosts
    tokens = {c: capability_tokens(hosts[c]) for c in classes}
    every = frozenset.intersection(*tokens.values())
    groups: dict[frozenset[str], list[str]] = {}
    for token in sorted(frozenset.union(*tokens.values()) - every):
        lacking = frozenset(c for c in classes if token not in tokens[c])
        if sum(weights[c] for c in lacking) <= budget:
            groups.setdefault(lacking, []).append(token)
    order = sorted(groups, key=lambda g: (-len(groups[g]), sorted(g)))
    best: tuple[int, int, frozenset[str]] = (0, 0, frozenset())  # (tokens kept, -hosts left out, left-out set)

    def search(i: int, left: frozenset[str], kept: int, remaining: int) -> None:
        nonlocal best
        score = (kept, -sum(weights[c] for c in left))
        if score > best[:2]:
            best = (*score, left)
        if i == len(order) or kept + remaining <= best[0]:
            return
        group = order[i]
        union = left | group
        size = len(groups[group])
        if sum(weights[c] for c in union) <= budget:
            search(i + 1, union, kept + size, remaining - size)
        search(i + 1, left, kept, remaining - size)

    search(0, frozenset(), 0, sum(len(groups[g]) for g in order))
    left_out = best[2]
    chosen = tuple(c for c in classes if c not in left_out)
    shared = frozenset.intersection(*(tokens[c] for c in chosen))
    cost = {c: tuple(sorted(shared - tokens[c])) for c in classes if c in left_out}
    return Choice(chosen, tuple(c for c in classes if c in left_out), len(shared), cost)
