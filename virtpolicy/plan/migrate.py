"""`virtpolicy plan migrate`: can this running domain live-migrate to that host, and if not, why.

Checked the way libvirt checks ABI stability on the destination (src/conf/domain_conf.c
virDomainDefCheckABIStability, src/qemu/qemu_migration.c qemuMigrationSrcIsAllowed and the CPU
comparison of qemuMigrationCookie): the exact machine type must exist there; the guest CPU must be
provided by the destination CPU (host-passthrough only between identical host CPUs; host-model as the
source expanded it; custom: the model usable there and every required feature present); and the domain,
exactly as it is (device models, Hyper-V features, addresses), must fit the destination, which is
`Engine.check` on that host. A custom model libvirt reports not usable as it stands still fits when the
features the domain disables cover what the host lacks (libvirt's baseline disables a model's blockers).

Host-kernel-dependent features (knowledge/data/host-kernel-features.toml) are checked too: a destination
whose kernel lacks a virtio-net offload the source offers the guest refuses the device state (QEMU:
"Features 0x... unsupported", "saved image requires TUN_F_UFO support"). That is a reason when both
hosts' status is known, a warning when one is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from virtpolicy.inputs.host import DomainCaps, Host
from virtpolicy.plan.kernel import migration_reasons

if TYPE_CHECKING:
    from virtpolicy.engine import Engine

SCHEMA = "virtpolicy-plan-migrate/1"


@dataclass
class Destination:
    host_class: str
    reasons: list[dict[str, str]] = field(default_factory=list)  # {"check", "message"}
    warnings: list[dict[str, str]] = field(default_factory=list)  # what could not be decided

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.host_class, "can_migrate": self.ok, "reasons": self.reasons, "warnings": self.warnings}


def _cpu_features(caps: DomainCaps) -> frozenset[str]:
    """What a host's CPU provides: its host-model model's features plus the extra ones, less disabled."""
    from virtpolicy.inputs.cpu_map import cpu_models

    models = cpu_models("x86") if caps.arch in ("x86_64", "i686") else {}
    base = models[caps.host_model].features if caps.host_model in models else frozenset()
    return (base | caps.host_model_features) - caps.host_model_disabled


def _caps(host: Host, root: etree._Element) -> DomainCaps | None:
    from virtpolicy.knowledge.machines import family_of

    machine = root.find("os/type").get("machine", "") if root.find("os/type") is not None else ""  # type: ignore[union-attr]
    fam = family_of(machine)
    arch = root.find("os/type").get("arch", host.arch) if root.find("os/type") is not None else host.arch  # type: ignore[union-attr]
    return host.domcaps_for(arch, root.get("type", "kvm"), fam.name) if fam else None


def cpu_reasons(root: etree._Element, source: Host | None, dest: Host) -> list[str]:
    cpu = root.find("cpu")
    mode = cpu.get("mode", "custom") if cpu is not None else "none"
    if mode == "none" or cpu is None:
        return []
    dest_caps = _caps(dest, root)
    if dest_caps is None:
        return []  # the machine check reports it
    if mode == "host-passthrough":
        src_caps = _caps(source, root) if source is not None else None
        if src_caps is None:
            return ["host-passthrough CPU: the source host is needed to compare (--from)"]
        if _cpu_features(src_caps) != _cpu_features(dest_caps) or src_caps.host_model != dest_caps.host_model:
            return ["host-passthrough CPU: live migration needs an identical host CPU, and this one differs"]
        return []
    if mode == "host-model":
        src_caps = _caps(source, root) if source is not None else None
        if src_caps is None:
            return ["host-model CPU: the source host's expansion is needed to compare (--from)"]
        missing = sorted(_cpu_features(src_caps) - _cpu_features(dest_caps))
        return [f"CPU feature(s) of the source's host-model CPU missing here: {', '.join(missing)}"] if missing else []
    from virtpolicy.inputs.cpu_map import cpu_models

    model = (cpu.findtext("model") or "").strip()
    reasons = []
    models = cpu_models("x86") if dest_caps.arch in ("x86_64", "i686") else {}
    wanted = {f.get("name", "") for f in cpu.iterfind("feature") if f.get("policy") in ("require", "force")}
    disabled = {f.get("name", "") for f in cpu.iterfind("feature") if f.get("policy") in ("disable", "forbid")}
    if model and model not in dest_caps.usable_models:
        lacking = sorted((models[model].features - disabled) - _cpu_features(dest_caps)) if model in models else []
        if model not in models or lacking:
            also = f" (it needs {', '.join(lacking)}, which the domain does not disable)" if lacking else ""
            reasons.append(f"CPU model {model} is not usable on this host's CPU{also}")
    missing = sorted(wanted - _cpu_features(dest_caps) - (models[model].features if model in models else set()))
    if missing:
        reasons.append(f"required CPU feature(s) missing on this host: {', '.join(missing)}")
    return reasons


def machine_reasons(root: etree._Element, dest: Host) -> list[str]:
    os_type = root.find("os/type")
    if os_type is None or not os_type.get("machine"):
        return ["the domain names no machine type: a running domain always has one (virsh dumpxml)"]
    machine = os_type.get("machine", "")
    arch = os_type.get("arch", dest.arch)
    names = {m.name for m in dest.machines.get((arch, root.get("type", "kvm")), [])}
    if machine not in names:
        kind = machine.rsplit("-", 1)[0]
        versions = sorted((n for n in names if n.startswith(kind + "-")), key=_version)[-3:]
        newest = f"its newest: {', '.join(versions)}" if versions else "none of that kind"
        return [f"machine {machine} does not exist on this host ({newest})"]
    return []


def _version(name: str) -> tuple[int, ...]:
    import re

    return tuple(int(n) for n in re.findall(r"\d+", name)) or (0,)


def plan_migrate(
    engine: Engine, domain: bytes, source_name: str, destinations: Sequence[str], source: str | None = None,
    os: str | None = None,
) -> list[Destination]:  # fmt: skip
    """The verdict for each destination host class of `engine`; `source` is the class it runs on now."""
    root = etree.fromstring(domain)
    src_host = engine.host(source) if source is not None else None
    verdicts = []
    for dest in destinations:
        if dest == source:
            continue
        host = engine.host(dest)
        verdict = Destination(dest)
        verdict.reasons += [{"check": "machine", "message": m} for m in machine_reasons(root, host)]
        verdict.reasons += [{"check": "cpu", "message": m} for m in cpu_reasons(root, src_host, host)]
        kernel, unsure = migration_reasons(root, src_host, host)
        verdict.reasons += [{"check": "kernel", "message": m} for m in kernel]
        verdict.warnings += [{"check": "kernel", "message": m} for m in unsure]
        if not any(r["check"] == "machine" for r in verdict.reasons):
            result = engine.check(domain, os=os, host=dest, source=source_name)
            for conflict in result.conflicts:
                for member in conflict.members:
                    if member.kind in ("host", "structural"):
                        verdict.reasons.append({"check": "devices", "message": f"{member.where}: {member.message}"})
        verdicts.append(verdict)
    return verdicts


def to_dict(domain: str, source: str | None, verdicts: Sequence[Destination], names: dict[str, str]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "domain": domain,
        "from": source,
        "destinations": [{**v.to_dict(), "hosts": names.get(v.host_class, "")} for v in verdicts],
        "can_migrate_to": [names.get(v.host_class, v.host_class) for v in verdicts if v.ok],
    }
