"""sources.placement alone: slot variables, bus-number capacity and NUMA placement."""

from __future__ import annotations

from support import one_source, partial_domain

from virtpolicy.core.budget import BusBudget

NICS = "".join("<interface type='user'><model type='virtio'/></interface>" for _ in range(3))


def test_each_pci_device_has_a_slot_variable(host, osdb) -> None:
    ctx, added = one_source(partial_domain("p", None, "q35", NICS), "placement", host, osdb)
    assert [i.var("slot") for i, _ in ctx.pci_devices if i.cls.name == "interface"] == [
        f"interface[{i}].slot" for i in range(3)
    ]
    assert not [c for c in added if isinstance(c, BusBudget)]  # three devices can never fill pcie-root


def test_the_root_ports_are_a_budget_once_they_can_run_out(host, osdb) -> None:
    many = "<interface type='user'><model type='virtio'/></interface>" * 220
    _, added = one_source(partial_domain("p", None, "q35", many), "placement", host, osdb)
    budgets = [c for c in added if isinstance(c, BusBudget)]
    assert len(budgets) == 1 and "interface[219].slot" in budgets[0].variables
    assert budgets[0].limit < 220


def test_numa_cells_follow_the_app(host, osdb) -> None:
    cells = "".join(f"<cell id='{i}' cpus='{i}' memory='262144' unit='KiB'/>" for i in range(2))
    cells = f"<cpu><numa>{cells}</numa></cpu>"
    xml = partial_domain("p", None, "q35", NICS, extra=cells).replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")
    _, added = one_source(xml, "placement", host, osdb)
    assert any(c.variables == ("numa.cells",) and "2" in c.message for c in added), [c.id for c in added]
