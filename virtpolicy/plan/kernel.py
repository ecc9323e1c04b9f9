"""Host-kernel-dependent features in planning: which of a domain's interfaces would use one, which hosts
have it, and what `plan common` and `plan migrate` make of that (knowledge/data/host-kernel-features.toml).

`plan common` needs every chosen host to have a feature the common domain leaves on, or the domain must
turn it off: through the machine type where QEMU's compat properties do (USO: machine 8.1 and older),
never through XML libvirt 9.0 refuses. Where nothing can turn it off, the plan says so. `plan migrate`
refuses a destination that lacks a feature the source offers the guest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from virtpolicy.inputs.host import Host
from virtpolicy.knowledge.kernel_features import KernelFeature, kernel_features


def interfaces_using(root: etree._Element, feature: KernelFeature) -> list[str]:
    """The domain's interfaces whose backend and model would carry the feature: 'interface[0] (network, virtio)'."""
    found = []
    for i, iface in enumerate(root.iterfind("devices/interface")):
        model = iface.find("model")
        kind, name = iface.get("type", ""), model.get("type", "") if model is not None else ""
        if feature.uses(kind, name):
            found.append(f"interface[{i}] ({kind}, {name})")
    return found


def host_status(feature: KernelFeature, host: Host) -> str:
    return feature.status(host.kernel, host.kernel_features)


def describe_host(name: str, feature: KernelFeature, host: Host) -> str:
    """'h2 (kernel 5.14.0-503.el9)', 'h3 (declared)', 'h4 (kernel unknown)'."""
    if feature.id in host.kernel_features:
        return f"{name} (declared {'true' if host.kernel_features[feature.id] else 'false'})"
    return f"{name} (kernel {host.kernel or 'unknown'})"


@dataclass
class FeatureVerdict:
    """One feature for `plan common`: what it applies to, each class's status, and what the plan did."""

    feature: KernelFeature
    interfaces: list[str]
    machine: str  # the machine type the domain was solved with before any pin
    offered: bool | None  # whether that machine offers it by default (None: a downstream machine name)
    hosts: dict[str, str] = field(default_factory=dict)  # class -> has | lacks | unknown
    status: str = "not-used"  # not-used | all-have | pinned-off | unpinnable
    pinned_by: str = ""
    message: str = ""

    @property
    def lacking(self) -> list[str]:
        return [c for c, s in self.hosts.items() if not self.feature.assumed_has(s)]

    def to_dict(self) -> dict[str, Any]:
        f = self.feature
        return {
            "id": f.id,
            "title": f.title,
            "status": self.status,
            "interfaces": self.interfaces,
            "hosts": self.hosts,
            "pinned_by": self.pinned_by or None,
            "message": self.message,
            "libvirt_xml": f.libvirt_xml or None,
            "rule": f.where,
            "citation": f.citation,
        }


def assess(root: etree._Element, hosts: Mapping[str, Host]) -> list[FeatureVerdict]:
    """Every feature against the solved domain and the chosen classes, before anything is pinned."""
    os_type = root.find("os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    verdicts = []
    for feature in kernel_features():
        verdict = FeatureVerdict(feature, interfaces_using(root, feature), machine, feature.offered_by(machine))
        verdict.hosts = {c: host_status(feature, h) for c, h in hosts.items()}
        if not verdict.interfaces:
            verdict.message = "no interface of the domain would use it (a virtio model on a tap or macvtap backend)"
        elif verdict.offered is False:
            verdict.message = f"machine {machine} does not offer it (QEMU turns it on from machine version " + (
                ".".join(map(str, feature.on_from_machine or ())) + ")"
            )
        elif not verdict.lacking:
            verdict.status = "all-have"
            verdict.message = "every chosen host has it"
        else:
            verdict.status = "unpinnable"  # until a pin below succeeds
        verdicts.append(verdict)
    return verdicts


def lacking_text(verdict: FeatureVerdict, hosts: Mapping[str, Host], names: Mapping[str, str]) -> str:
    return ", ".join(describe_host(names.get(c, c), verdict.feature, hosts[c]) for c in verdict.lacking)


def machine_cap(verdicts: Sequence[FeatureVerdict]) -> str:
    """The newest machine version that turns off every feature that needs it, or "" when none needs one."""
    caps = [
        v.feature.off_up_to_machine
        for v in verdicts
        if v.status == "unpinnable" and v.feature.pin == "machine" and v.offered is not False
    ]
    return min(caps, key=lambda c: tuple(int(n) for n in c.split("."))) if caps else ""


def migration_reasons(root: etree._Element, source: Host | None, dest: Host) -> tuple[list[str], list[str]]:
    """(reasons, warnings) for a live migration to `dest`: a reason when the source offers a feature the guest
    may have negotiated and `dest` is known to lack it; a warning when either side is not known."""
    os_type = root.find("os/type")
    machine = os_type.get("machine", "") if os_type is not None else ""
    reasons: list[str] = []
    warnings: list[str] = []
    for feature in kernel_features():
        interfaces = interfaces_using(root, feature)
        offered = feature.offered_by(machine)
        if not interfaces or offered is False:
            continue
        src = host_status(feature, source) if source is not None else "unknown"
        dst = host_status(feature, dest)
        if src == "lacks" or dst == "has" or (dst == "unknown" and feature.unknown == "has"):
            continue
        where = ", ".join(interfaces)
        src_text = "the source" if source is None else f"the source (kernel {source.kernel or 'unknown'})"
        dst_text = describe_host("this host", feature, dest)
        on = f"machine {machine} offers it" if offered else f"machine {machine} may offer it (not an upstream name)"
        text = (
            f"{feature.id}: {src_text} offers {feature.title} to {where} ({on}); {dst_text} lacks it, so a guest "
            f"that negotiated it cannot be loaded here ({feature.citation.split(' (')[0]})"
        )
        if dst == "lacks" and feature.assumed_has(src) and offered:
            reasons.append(text)
        else:
            known = "not known" if src == "unknown" or dst == "unknown" else "uncertain"
            warnings.append(f"{feature.id}: {known} whether {src_text} offers it and {dst_text} lacks it ({where})")
    return reasons, warnings
