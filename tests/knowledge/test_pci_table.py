"""pci.toml's bus rows and derived capacities against the libvirt source they cite (libvirt 9.0.0)."""

from __future__ import annotations

import re

from corpus import require_corpus

from virtpolicy.knowledge.pci import bus_rules, controller_families, root_port_capacity, table


def _bus_set_model_cases() -> dict[str, str]:
    """Each controller model's case body in virDomainPCIAddressBusSetModel (src/conf/domain_addr.c)."""
    text = (require_corpus() / "src" / "conf" / "domain_addr.c").read_text()
    body = text[text.index("virDomainPCIAddressBusSetModel(") :]
    body = body[: body.index("\n}\n")]
    cases: dict[str, str] = {}
    pending: list[str] = []
    for chunk in re.split(r"(case VIR_DOMAIN_CONTROLLER_MODEL_\w+:)", body)[1:]:
        if chunk.startswith("case "):
            pending.append(chunk[len("case VIR_DOMAIN_CONTROLLER_MODEL_") : -1].lower().replace("_", "-"))
            continue
        if chunk.strip():
            for model in pending:
                cases[model] = chunk
            pending = []
    return cases


def test_every_bus_row_matches_libvirt_slot_range_and_hotplug() -> None:
    cases = _bus_set_model_cases()
    for model, rule in bus_rules().items():
        body = cases[model]
        low = re.search(r"minSlot = (\d+);", body)
        high = re.search(r"maxSlot = (\w+);", body)
        assert low and high, model
        last = 31 if high.group(1) == "VIR_PCI_ADDRESS_SLOT_LAST" else int(high.group(1))
        assert (rule.first_slot, rule.last_slot) == (int(low.group(1)), last), model
        assert bool(rule.hotplug) == ("hotplugFlag" in body), model


def test_the_root_port_capacity_is_derived_from_the_table() -> None:
    fixed = table()["fixed"]["q35"]
    taken = {fixed["video"], *fixed["reserved"]}
    assert root_port_capacity("q35").limit == (31 - len(taken)) * 8 == 216
    assert root_port_capacity("virt").limit == 31 * 8  # no chipset slot on bus 0
    assert root_port_capacity("q35").where.startswith("pci.toml:")


def test_pcie_expander_bus_is_q35_and_arm_virt_only() -> None:
    """qemuDomainControllerDefPostParse: `qemuDomainIsQ35(def) || qemuDomainIsARMVirt(def)`."""
    source = (require_corpus() / "src" / "qemu" / "qemu_domain.c").read_text()
    assert "!(qemuDomainIsQ35(def) || qemuDomainIsARMVirt(def))" in source
    families = ("q35", "pc", "virt")
    assert controller_families("pcie-expander-bus", "x86_64", families) == ("q35", "virt")
    assert controller_families("pcie-expander-bus", "aarch64", families) == ("q35", "virt")
    assert controller_families("pcie-expander-bus", "riscv64", families) == ()
    assert controller_families("pci-expander-bus", "x86_64", families) == ("pc",)
    assert controller_families("virtio-serial", "x86_64", families) is None
