"""engine-defaults.toml [[placement_prefer]]: the spare hot-plug port the engine keeps, as libvirt does."""

from __future__ import annotations

import re

from corpus import require_corpus

from virtpolicy import Engine
from virtpolicy.knowledge.pci import hotplug_port_values
from virtpolicy.knowledge.tables import DATA, placement_preferences


def test_the_spare_port_is_the_one_libvirt_reserves() -> None:
    spare = placement_preferences()["engine.hotplug-ports"]
    first, last = (int(n) for n in re.search(r":(\d+)-(\d+)", spare.cite).groups())
    lines = (require_corpus() / "src/qemu/qemu_domain_address.c").read_text().splitlines()[first - 1 : last]
    cited = " ".join(line.strip() for line in lines)
    assert "Only for *new* domains with pcie-root" in cited and '"one time" reservation of one extra' in cited
    assert "VIR_PCI_CONNECT_TYPE_PCIE_DEVICE" in cited and "qemuDomainPCIAddressReserveNextAddr" in cited
    assert spare.variable == "hotplug.ports" and spare.order == ("1",) == hotplug_port_values()[:1]


def test_the_decision_names_the_row() -> None:
    spare = placement_preferences()["engine.hotplug-ports"]
    file, _, line = spare.where.partition(":")
    assert (DATA / file).read_text().splitlines()[int(line) - 1] == f'id = "{spare.id}"'
    xml = "<domain type='kvm'><name>h</name><memory>1048576</memory><vcpu>1</vcpu></domain>"
    decision = Engine().solve(xml, os="rhel9.0").to_dict()["decisions"]
    (ports,) = [d for d in decision if d["variable"] == "hotplug.ports"]
    assert ports["value"] == "1" and ports["reason"]["id"] == "engine.hotplug-ports:1"
    assert ports["reason"]["provenance"]["detail"] == spare.where
