"""A capacity constraint on bus numbers, counted on partial assignments (the one global constraint).

Devices that take a PCIe slot cost one bus each (their root port), conventional PCI devices a few buses per
bridge-full (a root port and a pcie-to-pci-bridge: 2 per 31 on libvirt's PCIe machines); the sources say which
devices share a budget, how large it is and what a bridge holds and costs (knowledge/data/pci.toml), so this
module knows nothing about libvirt. The solver's search counts it incrementally, python-constraint's through
BudgetCheck.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from constraint import Constraint as CSPConstraint
from constraint import Unassigned

from virtpolicy.core.problem import BUDGET, Constraint, Provenance

# bus kinds a device costs a BusBudget (pair_class)
NO_COST, PCIE, PCI, OPEN = 0, 1, 2, 3


@functools.lru_cache(maxsize=65536)
def cheapest(pci: int, free: int, bridge_slots: int, buses_per_bridge: int) -> int:
    """Buses the conventional devices and the still undecided ones need at the least: k of the undecided as
    PCIe endpoints (one bus each), the rest behind bridges (`buses_per_bridge` per `bridge_slots` devices).
    Cached: a search asks for the same few counts thousands of times."""
    return min(
        k + buses_per_bridge * -(-(pci + free - k) // bridge_slots) for k in range(0, min(free, bridge_slots) + 1)
    )


class BusBudget(Constraint):
    """Buses a group of devices needs, at most a budget: one per PCIe endpoint (its root port),
    `buses_per_bridge` per `bridge_slots` conventional devices (a bridge and what it sits in). Prunes on
    partial assignments."""

    partial = True
    kind = BUDGET

    def __init__(
        self,
        cid: str,
        pairs: list[tuple[str, str]],
        node: str | None,
        limit_var: str | None,
        limit: int,
        message: str,
        provenance: Provenance,
        bridges: bool = True,
        *,
        bridge_slots: int,
        buses_per_bridge: int,
    ) -> None:
        variables = tuple(v for pair in pairs for v in pair) + ((limit_var,) if limit_var else ())
        super().__init__(id=cid, variables=variables, message=message, provenance=provenance)
        self.npairs = len(pairs)
        self.node = node
        self.limit = limit
        self.limit_var = limit_var
        self.bridges = bridges
        self.bridge_slots = bridge_slots
        self.buses_per_bridge = buses_per_bridge

    def holds(self, *values: object) -> bool:
        """Fails as soon as even the cheapest completion of the devices still undecided would not fit."""
        spare = self.spare_given(values[-1]) if self.limit_var is not None else 0
        counts = [0, 0, 0, 0]
        for i in range(self.npairs):
            counts[self.holds_class(values[2 * i], values[2 * i + 1])] += 1
        return self.fits(spare, counts[PCIE], counts[PCI], counts[OPEN])

    def holds_class(self, slot: object, node: object) -> int:
        """What one device costs in `holds`: its value, or Unassigned (open, whatever its domain still holds)."""
        if self.node is not None and node != self.node:
            return NO_COST  # on another node, or not placed yet: no cost here
        if slot == "pcie":
            return PCIE
        if slot == "pci" and self.bridges:
            return PCI
        if slot is Unassigned and self.bridges:
            return OPEN
        return NO_COST

    @staticmethod
    def spare_given(value: object) -> int:
        """The spare ports in `holds`: none counted until the limit variable has a value."""
        return 0 if value is Unassigned else int(str(value))

    def fits(self, spare: int, pcie: int, pci: int, free: int) -> bool:
        """The bound itself, on counts of each kind (kept apart so that a search can count incrementally)."""
        return spare + pcie + cheapest(pci, free, self.bridge_slots, self.buses_per_bridge) <= self.limit

    def pair_class(self, slot: str | Sequence[str], node: str | Sequence[str]) -> int:
        """What one device costs on current domains: a value (a string) or the values still open (a list).

        A device whose slot can only be PCIe counts before it is decided, one that may still take a PCI slot
        is open (the cheapest completion decides), one that may still need no slot or sit elsewhere costs
        nothing yet: a lower bound that only grows as domains narrow, so failing it on some domains proves
        that no assignment within them fits."""
        if self.node is not None and node != self.node:
            return NO_COST  # elsewhere, or may still go elsewhere: no cost here yet
        if slot == "pcie":
            return PCIE
        if slot == "pci" and self.bridges:
            return PCI
        if not isinstance(slot, str) and self.bridges:
            if "pci" in slot:
                return OPEN
            if "pcie" in slot and "none" not in slot and "integrated" not in slot:
                return PCIE
        return NO_COST

    @staticmethod
    def spare_of(value: str | Sequence[str]) -> int:
        """The spare ports a limit variable asks for at the least, on its value or its open values."""
        return int(value) if isinstance(value, str) else min(int(v) for v in value)

    def search_check(self, fixed: dict[str, str]) -> BudgetCheck:
        return BudgetCheck(self, fixed)


class BudgetCheck(CSPConstraint):
    """A BusBudget inside python-constraint's search, reading the current (forward-checked) domains.

    A device whose slot domain is already down to {pcie}, or whose node domain is down to this node,
    counts before it is assigned: the bound fails as early as the facts allow, which keeps a tight
    capacity from turning chronological backtracking exponential. (`search.Search` keeps the same counts
    incrementally; this rescans, and serves python-constraint, which the engine's own search is checked
    against.)
    """

    def __init__(self, budget: BusBudget, fixed: dict[str, str]) -> None:
        self.budget = budget
        self.fixed = fixed

    def _value(self, var: str, domains: dict[str, list[str]], assignments: dict[str, str]) -> str | list[str]:
        if var in self.fixed:
            return self.fixed[var]
        if var in assignments:
            return assignments[var]
        current = list(domains[var])
        return current[0] if len(current) == 1 else current

    def __call__(
        self,
        variables: Sequence[str],
        domains: dict[str, list[str]],
        assignments: dict[str, str],
        forwardcheck: bool = False,
    ) -> bool:
        b = self.budget
        names = b.variables
        spare = 0
        if b.limit_var is not None:
            spare = b.spare_of(self._value(b.limit_var, domains, assignments))
        counts = [0, 0, 0, 0]
        for i in range(b.npairs):
            slot = self._value(names[2 * i], domains, assignments)
            node = self._value(names[2 * i + 1], domains, assignments)
            counts[b.pair_class(slot, node)] += 1
        return b.fits(spare, counts[PCIE], counts[PCI], counts[OPEN])
