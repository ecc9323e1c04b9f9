"""`virtpolicy plan common`: one complete domain that runs on every host of a fleet.

The engine solves the template against a *common host*: the intersection of every class's capabilities
(machine versions present on all, enums offered by all, loaders, Hyper-V features, the smallest vCPU and
NUMA limits), so whatever it decides is available everywhere. Per-host CPU modes (host-passthrough,
host-model, maximum) are not in it: they mean a different CPU on each host. Three things need more than
intersection:
- the machine: an alias such as q35 means a different version on each host, so the common host names the
  newest version every host has (pc-q35-6.2 for a 6.2/7.2/8.0 fleet), which the domain then pins;
- the CPU: a custom CPU, the baseline of the hosts' host-model CPUs for the domain's machine (plan/cpu.py):
  libvirt's own `virsh hypervisor-cpu-baseline --migratable` when hosts are live, else the engine's
  cpu_map baseline; the JSON says which;
- host-kernel-dependent features (plan/kernel.py): a virtio-net offload some chosen host's kernel lacks is
  turned off, through an older machine version where QEMU's compat properties do that (USO: 8.1), and
  reported where no XML libvirt 9.0 accepts can.
So the template is solved twice: once to learn the domain's machine, virt type and interfaces, then with
the CPU and the pins. The result is then checked as it stands on every class (`Engine.check`), which is
the promise: it runs on each host unchanged.
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
from virtpolicy.knowledge.kernel_features import machine_version
from virtpolicy.knowledge.machines import family_of
from virtpolicy.plan.cpu import BaselineCpu, CpuChoice, choose_cpu, engine_baseline, not_migratable
from virtpolicy.plan.kernel import FeatureVerdict, assess, lacking_text, machine_cap

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.results import Result

SCHEMA = "virtpolicy-plan-common/1"
NOT_FOR_MIGRATION = ("host-passthrough", "maximum", "host-model")  # per-host CPUs: never common


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name)) or (0,)


def _too_new(name: str, max_machine: tuple[int, int] | None) -> bool:
    version = machine_version(name)
    return max_machine is not None and version is not None and version > max_machine


def _common_machines(
    hosts: Sequence[Host], key: tuple[str, str], max_machine: tuple[int, int] | None = None
) -> list[GuestMachine]:
    """Machine names every host lists for (arch, virt type); aliases point at the newest common version.
    `max_machine` leaves out upstream versions newer than it (a pin of a kernel-dependent feature)."""
    lists = [[m for m in h.machines.get(key, []) if not _too_new(m.canonical, max_machine)] for h in hosts]
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
    enums["cpu/mode"] = tuple(m for m in enums.get("cpu/mode", ()) if m not in NOT_FOR_MIGRATION)
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
        cpu_modes=tuple(m for m in enums.get("cpu/mode", ()) if m not in NOT_FOR_MIGRATION),
        hyperv_features=tuple(f for f in first.hyperv_features if all(f in c.hyperv_features for c in caps[1:])),
        unsupported=frozenset().union(*(c.unsupported for c in caps)),
        usable_models=tuple(m for m in first.usable_models if all(m in c.usable_models for c in caps[1:])),
    )


def common_host(hosts: Sequence[Host], name: str = "common", max_machine: tuple[int, int] | None = None) -> Host:
    """A host offering exactly what every given host offers (HostError when they share no machine), with
    no upstream machine version newer than `max_machine` when that is given."""
    if not hosts:
        raise HostError("plan common: no hosts to plan for")
    arches = {h.arch for h in hosts}
    if len(arches) > 1:
        raise HostError(f"plan common: the hosts have different architectures ({', '.join(sorted(arches))})")
    common = Host(source=name, arch=hosts[0].arch, host_numa_cells=min(h.host_numa_cells for h in hosts))
    common.caps_source = f"{name} (intersection of {len(hosts)} host classes)"
    for key in hosts[0].machines:
        machines = _common_machines(hosts, key, max_machine)
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


def baseline_cpu(caps: Iterable[DomainCaps]) -> BaselineCpu | None:
    """The engine's cpu_map baseline of these host-model CPUs (plan/cpu.py engine_baseline), or None."""
    return engine_baseline(list(caps))[0]


def _not_migratable() -> frozenset[str]:
    return not_migratable()


@dataclass
class CommonPlan:
    classes: list[str]
    result: Result
    cpu: BaselineCpu | None
    fits: dict[str, bool] = field(default_factory=dict)  # class -> the XML checks as it stands there
    cpu_choice: CpuChoice | None = None
    kernel: list[FeatureVerdict] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.result.feasible and all(self.fits.values())

    def to_dict(self) -> dict[str, Any]:
        root = etree.fromstring(self.result.xml_bytes) if self.result.xml_bytes else None
        machine = root.find("os/type").get("machine", "") if root is not None else ""  # type: ignore[union-attr]
        choice = self.cpu_choice
        return {
            "schema": SCHEMA,
            "status": "solved" if self.feasible else "conflict",
            "classes": self.classes,
            "machine": machine,
            "cpu": choice.to_dict() if choice is not None else None,
            "cpu_note": (choice.reason if choice is not None and choice.cpu is None else "") or None,
            "kernel_features": [v.to_dict() for v in self.kernel],
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


def _template_machine(domain: bytes) -> str:
    os_type = etree.fromstring(domain).find("os/type")
    return os_type.get("machine", "") if os_type is not None else ""


def plan_common(
    engine: Engine, classes: Sequence[str], domain: bytes, source: str, profiles: Sequence[str] = (),
    os: str | None = None, guest_support: str = "strict", names: dict[str, str] | None = None,
) -> CommonPlan:  # fmt: skip
    """One domain for every given class of `engine`'s hosts, checked on each of them. `names` (class -> host
    names) words the kernel-feature messages."""
    from virtpolicy.engine import Engine

    names = names or {}
    hosts = [engine.host(c) for c in classes]
    by_class = dict(zip(classes, hosts, strict=True))
    label = f"common-of-{len(hosts)}-classes"
    common = common_host(hosts, label)

    def solve(on: Host, template: bytes) -> Result:
        shared = Engine({"common": on}, osinfo_db=engine.osinfo, profile_path=engine.profile_path)
        return shared.solve(template, profiles=profiles, os=os, guest_support=guest_support, source=source)

    first = solve(common, domain)  # learns machine, virt type and interfaces; its CPU is not the plan's
    if not first.feasible or not first.xml_bytes:
        return CommonPlan(list(classes), first, None)
    root = etree.fromstring(first.xml_bytes)
    verdicts = assess(root, by_class)
    cap = machine_cap(verdicts)
    pin_failed = ""
    if cap:
        common, pin_failed = _pin_machine(hosts, label, common, cap, _template_machine(domain))
    _settle(verdicts, cap, pin_failed, by_class, names)
    os_type = root.find("os/type")
    arch = os_type.get("arch", hosts[0].arch) if os_type is not None else hosts[0].arch
    virt_type = root.get("type", "kvm")
    fam = family_of(os_type.get("machine", "") if os_type is not None else "")
    cpu_choice = CpuChoice(None, "", reason="the domain's virt type is not kvm")
    if virt_type == "kvm" and fam is not None:
        caps = [h.domcaps_for(arch, virt_type, fam.name) for h in hosts]
        machine = common.default_machine(arch, virt_type, fam.name) or ""
        exact = _template_machine(domain)
        machine = exact if exact and exact != fam.name and machine_version(exact) else machine
        if all(c is not None for c in caps):
            uris = list(dict.fromkeys(h.connect for h in hosts if h.connect))
            cpu_choice = choose_cpu(caps, uris, arch, virt_type, machine)  # type: ignore[arg-type]
        else:
            cpu_choice = CpuChoice(None, "", reason=f"not every host describes {fam.name} for {virt_type}")
    result = solve(common, with_cpu(domain, cpu_choice.cpu))
    plan = CommonPlan(list(classes), result, cpu_choice.cpu, cpu_choice=cpu_choice, kernel=verdicts)
    if result.feasible and result.xml_bytes:
        final = etree.fromstring(result.xml_bytes).find("os/type")
        pinned = final.get("machine", "") if final is not None else ""
        for v in verdicts:
            if v.status == "pinned-off" and v.feature.offered_by(pinned) is not False:
                v.status, v.pinned_by = "unpinnable", ""
                v.message = f"the solved machine {pinned} may still offer it; {v.feature.libvirt}"
            elif v.status == "pinned-off":
                v.pinned_by = f"machine {pinned}"
        for c in classes:
            plan.fits[c] = engine.check(result.xml_bytes, profiles=profiles, os=os, host=c, source=source).feasible
    return plan


def _pin_machine(hosts: Sequence[Host], label: str, common: Host, cap: str, template: str) -> tuple[Host, str]:
    """The common host without upstream machine versions newer than `cap`, and "" ; or the unchanged common
    host and why that cannot be."""
    version = tuple(int(n) for n in cap.split("."))
    limit = (version[0], version[1])
    asked = machine_version(template)
    if asked is not None and asked > limit:
        return common, f"the template asks for machine {template}, newer than {cap}"
    try:
        return common_host(hosts, label, max_machine=limit), ""
    except HostError:
        return common, f"the hosts share no machine version up to {cap}"


def _settle(
    verdicts: Sequence[FeatureVerdict], cap: str, pin_failed: str, by_class: dict[str, Host], names: dict[str, str]
) -> None:
    """Each verdict's status and message once the machine pin (if any) is known."""
    for v in verdicts:
        if v.status == "all-have":
            unknown = [names.get(c, c) for c, s in v.hosts.items() if s == "unknown"]
            how = "kernel not known" if v.feature.kernel else "only a kernel_features declaration says otherwise"
            v.message = f"every chosen host has it (assumed for {', '.join(unknown)}: {how})" if unknown else v.message
            continue
        if v.status != "unpinnable":
            continue
        lacking = lacking_text(v, by_class, names)
        if v.feature.pin == "machine" and cap and not pin_failed:
            v.status, v.pinned_by = "pinned-off", f"machine version <= {cap}"
            v.message = f"turned off by an older machine type (<= {cap}): {lacking} lack(s) it"
        elif v.feature.pin == "machine":
            v.message = f"cannot be turned off: {pin_failed}; {lacking} lack(s) it. {v.feature.libvirt}"
        else:
            v.message = f"no domain XML turns it off; {lacking} lack(s) it. {v.feature.libvirt}"


def capability_tokens(host: Host) -> frozenset[str]:
    """Everything a host offers, one token per fact: machine names, every domcapabilities enum value,
    loader, CPU mode and model, Hyper-V feature and host-model CPU feature, per machine family, and each
    host-kernel-dependent feature the host has (or is taken to have). What a set of hosts can share is the
    intersection of their tokens."""
    from virtpolicy.knowledge.kernel_features import kernel_features

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
    has = [f for f in kernel_features() if f.assumed_has(f.status(host.kernel, host.kernel_features))]
    tokens |= {f"kernel-feature={f.id}" for f in has}
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
