"""`virtpolicy plan capacity`: how many instances of each template fit on each host class and in the
fleet.

Instances are placed one after the other on a host's NUMA cells, the way Nova's NUMATopologyFilter
fits a guest (nova/virt/hardware.py numa_fit_instance_to_host): a guest with NUMA cells puts each of its
cells on a different host cell that has the CPUs and the memory left (huge pages of the asked size when
the template asks for them), trying host cells in order; a guest without NUMA cells needs only the
host's totals. Over-commit ratios are Nova's cpu_allocation_ratio / ram_allocation_ratio (default 1.0:
no over-commit). A template that does not run on a class (`plan hosts`) fits 0 times there, and a
template with passed-through PCI devices fits at most once per host that has them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import Domain, cpuset, memory_kib
from virtpolicy.inputs.host import Host

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.plan.fleet import Fleet

SCHEMA = "virtpolicy-plan-capacity/1"
MAX_INSTANCES = 100_000  # per host: a bound on the placement loop, far above any real host


@dataclass(frozen=True)
class GuestCell:
    cpus: int
    memory_kib: int


@dataclass(frozen=True)
class Demand:
    """What one instance of a template takes from a host."""

    vcpus: int
    memory_kib: int
    cells: tuple[GuestCell, ...]  # empty: no guest NUMA topology
    page_kib: int = 0  # huge page size asked for (0: ordinary memory)
    hostdevs: tuple[str, ...] = ()  # PCI addresses passed through (each can be given to one instance)

    @classmethod
    def of(cls, domain: Domain) -> Demand:
        root, source = domain.root, domain.source
        vcpus = domain.vcpus
        memory = root.find("memory")
        total = memory_kib(memory, source) if memory is not None else 0
        cells = []
        for cell in root.iterfind("cpu/numa/cell"):
            cpus = (
                len(cpuset(cell, "cpus", source, vcpus, "vCPU", f"/domain/vcpu is {vcpus}")) if cell.get("cpus") else 0
            )
            cells.append(GuestCell(cpus, memory_kib(cell, source, "memory")))
        page = 0
        hugepages = root.find("memoryBacking/hugepages")
        if hugepages is not None:
            size = hugepages.find("page")
            page = memory_kib(size, source, "size") if size is not None and size.get("size") else 2048
        hostdevs = tuple(
            " ".join(f"{k}={v}" for k, v in sorted(a.attrib.items()))
            for a in root.iterfind("devices/hostdev[@type='pci']/source/address")
        )
        return cls(vcpus, total, tuple(cells), page, hostdevs)


@dataclass
class _Free:
    cpus: list[float]
    memory: list[float]  # KiB per cell
    pages: list[int]  # free huge pages of the demand's size per cell


def _free(host: Host, demand: Demand, cpu_ratio: float, ram_ratio: float) -> _Free | None:
    if not host.cells:
        return None
    ids = sorted(host.cells)
    pages = [dict(host.cells[i].pages).get(demand.page_kib, 0) if demand.page_kib else 0 for i in ids]
    return _Free(
        [host.cells[i].cpus * cpu_ratio for i in ids], [host.cells[i].memory_kib * ram_ratio for i in ids], pages
    )


def _place(free: _Free, demand: Demand) -> bool:
    """Place one instance (and take its resources) or say it no longer fits."""
    cells = demand.cells or ()
    if not cells:
        if demand.page_kib:
            needed = -(-demand.memory_kib // demand.page_kib)
            if sum(free.pages) < needed or sum(free.cpus) < demand.vcpus:
                return False
            _take_spread(free.pages, needed)
        else:
            if sum(free.memory) < demand.memory_kib or sum(free.cpus) < demand.vcpus:
                return False
            _take_spread(free.memory, demand.memory_kib)
        _take_spread(free.cpus, demand.vcpus)
        return True
    for chosen in itertools.permutations(range(len(free.cpus)), len(cells)):
        if all(_fits(free, host_cell, cell, demand.page_kib) for host_cell, cell in zip(chosen, cells, strict=True)):
            for host_cell, cell in zip(chosen, cells, strict=True):
                free.cpus[host_cell] -= cell.cpus
                if demand.page_kib:
                    free.pages[host_cell] -= -(-cell.memory_kib // demand.page_kib)
                else:
                    free.memory[host_cell] -= cell.memory_kib
            return True
    return False


def _fits(free: _Free, host_cell: int, cell: GuestCell, page_kib: int) -> bool:
    if free.cpus[host_cell] < cell.cpus:
        return False
    if page_kib:
        return free.pages[host_cell] >= -(-cell.memory_kib // page_kib)
    return free.memory[host_cell] >= cell.memory_kib


def _take_spread(pool: list[Any], amount: float) -> None:
    for i, available in enumerate(pool):
        taken = min(available, amount)
        pool[i] -= taken
        amount -= taken
        if amount <= 0:
            return


@dataclass(frozen=True)
class Usage:
    """What a host already gives its running guests (taken from its cells in order, as a first fit would)."""

    cpus: float = 0.0
    memory_kib: int = 0


def instances_on(
    host: Host, demand: Demand, cpu_ratio: float = 1.0, ram_ratio: float = 1.0, used: Usage | None = None
) -> int | None:
    """How many more instances fit (None: the host data has no NUMA topology to count on)."""
    free = _free(host, demand, cpu_ratio, ram_ratio)
    if free is None:
        return None
    if used is not None:
        _take_spread(free.cpus, used.cpus)
        _take_spread(free.memory, used.memory_kib)
    if demand.hostdevs:
        owned = {" ".join(f"{k}={v}" for k, v in sorted(_address(d).items())) for d in host.pci_devices}
        if not set(demand.hostdevs) <= owned:
            return 0
        return 1 if _place(free, demand) else 0
    count = 0
    while count < MAX_INSTANCES and _place(free, demand):
        count += 1
    return count


def _address(pci: str) -> dict[str, str]:
    """'0000:3b:00.0' -> libvirt's address attributes, as a domain's hostdev source writes them."""
    domain, bus, rest = pci.split(":")
    slot, function = rest.split(".")
    return {"domain": f"0x{domain}", "bus": f"0x{bus}", "slot": f"0x{slot}", "function": f"0x{function}"}


def read_usage(path: Path, fleet: Fleet) -> dict[str, Usage]:
    """`--usage FILE`: [host."NAME"] tables with `cpus` (vCPUs allocated) and `memory_mib`, per fleet host."""
    import tomllib

    from virtpolicy.inputs.xmlsafe import read_file

    try:
        data = tomllib.loads(read_file(path).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not a TOML usage file: {exc}") from None
    hosts = data.get("host", {})
    if not isinstance(hosts, dict):
        raise InputError(f'{path}: usage is given as [host."NAME"] tables')
    names = {h.name for h in fleet.hosts}
    usage = {}
    for name, row in hosts.items():
        where = f'{path}: [host."{name}"]'
        if name not in names:
            raise InputError(f"{where}: no such host in the fleet")
        if not isinstance(row, dict) or set(row) - {"cpus", "memory_mib"}:
            raise InputError(f"{where}: give cpus and memory_mib only")
        cpus, mib = row.get("cpus", 0), row.get("memory_mib", 0)
        if any(isinstance(v, bool) or not isinstance(v, int | float) or v < 0 for v in (cpus, mib)):
            raise InputError(f"{where}: cpus and memory_mib must be numbers of 0 or more")
        usage[name] = Usage(float(cpus), int(mib * 1024))
    return usage


@dataclass
class CapacityPlan:
    templates: list[str]
    fleet: Fleet
    per_class: dict[str, dict[str, int | None]] = field(default_factory=dict)  # template -> class -> count
    per_host: dict[str, dict[str, int | None]] = field(default_factory=dict)  # template -> used host -> count

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for template in self.templates:
            classes = self.per_class[template]
            used = self.per_host.get(template, {})
            total = sum((used[h.name] if h.name in used else classes[h.host_class]) or 0 for h in self.fleet.hosts)
            rows.append(
                {
                    "template": template,
                    "fleet_total": total,
                    "classes": [
                        {
                            "class": c,
                            "hosts": len(self.fleet.members(c)),
                            "per_host": n,
                            "example": self.fleet.members(c)[0].name,
                        }  # fmt: skip
                        for c, n in classes.items()
                    ],
                    "hosts_in_use": [{"host": name, "more_instances": n} for name, n in sorted(used.items())],
                }
            )
        return {"schema": SCHEMA, "hosts_total": len(self.fleet.hosts), "templates": rows}


def plan_capacity(
    engine: Engine, fleet: Fleet, templates: Sequence[tuple[bytes, str]], os: str | None = None,
    cpu_ratio: float = 1.0, ram_ratio: float = 1.0, usage: dict[str, Usage] | None = None,
) -> CapacityPlan:  # fmt: skip
    """Instances per host for each template and class; 0 where the template does not run at all."""
    if cpu_ratio <= 0 or ram_ratio <= 0:
        raise InputError("plan capacity: allocation ratios must be above 0")
    plan = CapacityPlan([name for _, name in templates], fleet)
    for data, name in templates:
        demand = Demand.of(Domain.from_bytes(data, name))
        counts: dict[str, int | None] = {}
        for host_class, host in fleet.classes.items():
            runs = engine.solve(data, os=os, host=host_class, source=name).feasible
            counts[host_class] = instances_on(host, demand, cpu_ratio, ram_ratio) if runs else 0
        plan.per_class[name] = counts
        plan.per_host[name] = {
            h.name: (instances_on(fleet.classes[h.host_class], demand, cpu_ratio, ram_ratio, usage[h.name])
                     if counts[h.host_class] else counts[h.host_class])
            for h in fleet.hosts
            if usage and h.name in usage
        }  # fmt: skip
    return plan


def to_text(plan: CapacityPlan) -> str:
    data = plan.to_dict()
    lines = [f"virtpolicy plan capacity: {data['hosts_total']} host(s)"]
    for row in data["templates"]:
        lines.append(f"  {row['template']}: {row['fleet_total']} instance(s) in the fleet")
        for c in row["classes"]:
            per = "unknown (no NUMA topology in the host data)" if c["per_host"] is None else c["per_host"]
            lines.append(f"    class {c['class']} ({c['hosts']} host(s), e.g. {c['example']}): {per} per host")
    return "\n".join(lines)
