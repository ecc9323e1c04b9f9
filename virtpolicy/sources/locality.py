"""Which guest NUMA nodes a PCI device may take under Nova's PCI NUMA affinity policies.

A wish names a guest node (the app's metadata) or, for a passed-through device, comes from the host node
the device sits on (the host bundle's nodedev data). Guest cells map to host nodes through
`<numatune><memnode>` (or `<numatune><memory>` for all cells); with neither, guest cell i is taken to be
host node i, the layout the numa-aligned profile mirrors. Policies (nova/pci/stats.py
_filter_pools_for_numa_cells), as constraint strengths on the device's guest node:

- required: a guest cell on the device's host node; a device without a host node cannot satisfy it.
- legacy: like required when the device has a host node; no constraint when it has none.
- preferred: the same cells, as a soft wish.
- socket: any guest cell on a host node of the same socket; the host must report every cell's socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtpolicy.core.problem import Provenance, Source
from virtpolicy.inputs.domain import xpath_of
from virtpolicy.inputs.hostdevices import HostPciDevice, source_address
from virtpolicy.inputs.nodeset import parse_nodeset

if TYPE_CHECKING:
    from virtpolicy.sources.context import BuildContext, Instance


@dataclass
class Affinity:
    """An app's wish to place a device on a guest NUMA node (metadata), with Nova's policy names."""

    xpath: str
    node: int | None  # a guest node; None: the node of the hostdev's host device
    policy: str
    where: str


Wish = tuple[set[str], str, Provenance]  # allowed guest nodes, what the wish says, where it came from


class HostLocality:
    """Guest cells, the host nodes under them, and the sockets of those nodes, for one build."""

    def __init__(self, ctx: BuildContext) -> None:
        self.host = ctx.host
        root = ctx.domain.root
        self.memnodes: dict[int, set[int]] = {}
        self.all_cells: set[int] | None = None
        self.where = "identity (guest cell i on host node i; no <numatune>)"
        memory = root.find("numatune/memory[@nodeset]")
        if memory is not None:
            self.all_cells = parse_nodeset(memory.get("nodeset", ""))
            self.where = xpath_of(memory)
        for memnode in root.iterfind("numatune/memnode[@cellid][@nodeset]"):
            # the values were checked when the domain was read (inputs.domain.check_values)
            self.memnodes[int(memnode.get("cellid", "0"))] = parse_nodeset(memnode.get("nodeset", ""))
            self.where = xpath_of(memnode.getparent())

    def host_nodes(self, cell: int) -> set[int]:
        if cell in self.memnodes:
            return self.memnodes[cell]
        if self.all_cells is not None:
            return self.all_cells
        return {cell} if cell < self.host.host_numa_cells else set()

    def sockets(self, nodes: set[int]) -> set[int] | None:
        """The sockets of host nodes; None when the host does not report one of them."""
        found: set[int] = set()
        for node in nodes:
            if node not in self.host.cell_sockets:
                return None
            found |= self.host.cell_sockets[node]
        return found

    def device(self, inst: Instance) -> HostPciDevice | None:
        address = source_address(inst.element) if inst.element is not None else None
        return self.host.pci_devices.get(address or "")

    def allowed(self, inst: Instance, aff: Affinity, domain: tuple[str, ...]) -> Wish | None:
        """The guest nodes a wish allows; None when it constrains nothing."""
        if aff.node is not None:
            prov = Provenance(
                Source.APP,
                aff.where,
                f"node {aff.node}, policy {aff.policy}",
                data=(("xpath", aff.where), ("value", str(aff.node))),
            )
            if aff.policy != "socket":
                return {str(aff.node)}, f"on guest NUMA node {aff.node}", prov
            return self._same_socket(self.host_nodes(aff.node), domain, f"guest node {aff.node}", prov)
        dev = self.device(inst)
        address = source_address(inst.element) if inst.element is not None else None
        host_node = dev.numa_node if dev is not None else None
        prov = self._host_provenance(aff, dev, address, host_node)
        if host_node is None:
            if aff.policy in ("legacy", "preferred"):
                return None
            return set(), f"(host {address}) needs a host NUMA node, and the host bundle reports none for it", prov
        if aff.policy == "socket":
            return self._same_socket({host_node}, domain, f"host {address} (host node {host_node})", prov)
        cells = {v for v in domain if host_node in self.host_nodes(int(v))}
        placed = ", ".join(f"{v}->{sorted(self.host_nodes(int(v))) or '-'}" for v in domain)
        return (
            cells,
            f"(host {address}, on host node {host_node}) on a guest cell placed on host node {host_node} "
            f"(guest cell -> host nodes: {placed}; {self.where})",
            prov,
        )

    def _same_socket(self, nodes: set[int], domain: tuple[str, ...], what: str, prov: Provenance) -> Wish:
        wanted = self.sockets(nodes) if nodes else None
        if wanted is None:
            return (
                set(),
                f"in the socket of {what}: {self.host.caps_source or 'the host'} reports no socket for it",
                prov,
            )
        cells = set()
        for v in domain:
            theirs = self.sockets(self.host_nodes(int(v)))
            if theirs and theirs & wanted:
                cells.add(v)
        return cells, f"on a guest cell in the socket(s) {sorted(wanted)} of {what}", prov

    def _host_provenance(
        self, aff: Affinity, dev: HostPciDevice | None, address: str | None, host_node: int | None
    ) -> Provenance:
        fact = f"host node {host_node}" if host_node is not None else "no host node"
        if aff.where:  # the app named the policy in its metadata
            return Provenance(
                Source.APP,
                aff.where,
                f"policy {aff.policy}; {fact}",
                data=(("xpath", aff.where), ("value", aff.policy)),
            )
        return Provenance(
            Source.HOST,
            dev.where if dev is not None else f"{self.host.name} (no nodedev data for {address})",
            f"{address}: {fact}; Nova's default policy legacy",
            data=(
                ("device", address or ""),
                (
                    "action",
                    f"pass through a device on another host node, or give {aff.xpath} a looser policy "
                    "(<virtpolicy:numa><virtpolicy:device xpath=... policy='preferred'/>)",
                ),
            ),
        )
