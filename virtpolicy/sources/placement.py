"""PCI slot types, guest NUMA cells and device NUMA nodes as solver variables, with capacity constraints.

libvirt auto-places devices but never decides NUMA locality and keeps only one spare hotplug port, so
the engine decides both: `X.slot` (pcie | pci | integrated | none) and `X.node` per device, `numa.cells`
and `hotplug.ports` per domain. Capacities (root ports, bus numbers under each expander) are constraints,
so running out is a conflict that names the numbers rather than a libvirt define error.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from lxml import etree

from virtpolicy.core.budget import BusBudget
from virtpolicy.core.problem import Constraint, Provenance, Source, Strength
from virtpolicy.inputs.domain import VIRTPOLICY_NS, Explicit, xpath_of
from virtpolicy.inputs.hostdevices import NODEDEV_FILE, source_address
from virtpolicy.knowledge.machines import lays_out_topology, root_of
from virtpolicy.knowledge.pci import (
    POLICIES,
    Addressing,
    addressing,
    bridge_cost,
    bus_numbers,
    bus_rule,
    controller_families,
    hotplug_port_values,
    max_cells,
    pci_roots,
    root_port_capacity,
    slot_values,
    table,
    takes_slots,
)
from virtpolicy.knowledge.tables import Preference, placement_preferences
from virtpolicy.sources.context import Kept, structural_provenance
from virtpolicy.sources.locality import Affinity, HostLocality

if TYPE_CHECKING:
    from virtpolicy.sources.context import BuildContext, Instance

NOVA = "nova/virt/hardware.py _get_numa_topology_auto: vCPUs and memory must divide evenly by nodes"
NOVA_DEFAULT_POLICY = "legacy"  # nova/objects/fields.py PCINUMAAffinityPolicy: the default when none is asked


def cells_in(domain_root: etree._Element) -> int:
    return len(domain_root.findall("cpu/numa/cell"))


_SLOT_TYPES = Provenance(
    Source.STRUCTURAL,
    "pci-slot-types",
    "pci.toml",
    "libvirt src/qemu/qemu_domain_address.c qemuDomainDeviceCalculatePCIConnectFlags",
    data=(("rule", "pci-slot-types"), ("file", "pci.toml"), ("line", 0)),
)
_SlotRecipe = tuple[tuple[str, tuple[str, ...], tuple[frozenset[str], ...], str], ...]
# PciPlanner._slot_types' answers by key, each with the [slots] table it was read from (a reloaded table's
# answers are its own); bounded, so a stream of unusual domains cannot grow it without end
_SLOT_RECIPES: Kept[_SlotRecipe] = Kept(2048)


class PciPlanner:
    """The PCI and NUMA placement variables, their capacity and affinity constraints, and libvirt's own
    placement habits as preferences."""

    name = "placement"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self.slots = table()["slots"]
        self.devices = ctx.pci_devices  # (instance, the variable that decides its slot)
        self.never_pci: set[str] = set()  # prefixes of instances libvirt never gives a PCI address
        self._controllers_by_index: dict[int, etree._Element] | None = None

    def _driver_var(self, inst: Instance) -> str | None:
        for var in inst.cls.variables:
            if f"{inst.cls.name}.{var}" in self.slots:
                return var
        return None

    def declare(self) -> None:
        p = self.ctx.problem
        app_cells = cells_in(self.ctx.domain.root)
        cells = [str(k) for k in range(1, max(max_cells(), app_cells) + 1)]
        p.add_variable("numa.cells", cells, "guest NUMA cells")
        p.add_variable("hotplug.ports", hotplug_port_values(), "spare hot-plug root ports (q35), free PCI slots (pc)")
        numa = app_cells > 1 or self._numa_wanted()
        for inst in self.ctx.instances:
            var = self._driver_var(inst)
            if var is None:
                continue
            self.devices.append((inst, var))
            p.add_variable(inst.var("slot"), slot_values(), f"{inst.cls.label} slot type {inst.xpath}")
            limit = app_cells if app_cells > 1 else max_cells()
            nodes = [str(n) for n in range(limit)] if numa else ["0"]
            p.add_variable(inst.var("node"), nodes, f"{inst.cls.label} guest NUMA node {inst.xpath}")

    def _numa_wanted(self) -> bool:
        """Node variables cost search time: only where NUMA can matter (profiles, affinity metadata)."""
        if self.affinities():
            return True
        if self.ctx.host.host_numa_cells > 1 and self.ctx.domain.root.find("devices/hostdev[@type='pci']") is not None:
            return True  # a passed-through device has a host node of its own
        return any(
            any(v.startswith("numa.") or v.endswith(".node") for v in (*r.require, *r.prefer, *r.forbid, *r.equal))
            or (r.when is not None and any(n.startswith("numa.") for n in r.when.names()))
            for sel in self.ctx.profiles
            for r in sel.profile.rules
        )

    def affinities(self) -> list[Affinity]:
        """The app's wishes from metadata; a hostdev's wish may leave out the node (its host node decides)."""
        found = []
        for el in self.ctx.domain.root.iterfind(f"metadata/{{{VIRTPOLICY_NS}}}numa/{{{VIRTPOLICY_NS}}}device"):
            policy = el.get("policy", "required")
            node = el.get("node")
            from_host = node is None and "/hostdev" in el.get("xpath", "")
            if policy not in POLICIES or not (from_host or (node or "").isdigit()):
                from virtpolicy.errors import InputError

                raise InputError(
                    f"{self.ctx.domain.source}:{el.sourceline}: {xpath_of(el)}: node='{node or ''}' "
                    f"policy='{policy}' (node is a number, left out only for a hostdev, whose host node "
                    f"decides; policy one of {', '.join(POLICIES)})"
                )
            found.append(Affinity(el.get("xpath", ""), None if from_host else int(node or 0), policy, xpath_of(el)))
        return found

    def constrain(self) -> None:
        structural = _SLOT_TYPES
        families = tuple(self._possible_families())
        for inst, var in self.devices:
            driver = inst.var(var)
            el = self.app_element(inst)
            kind = addressing(el) if el is not None else None
            addr = el.find("address[@type='pci']") if el is not None else None
            at = _slots_at(addr, self._controllers()) if addr is not None else None
            never = kind is not None and kind.takes == "none"
            if never:
                self.never_pci.add(inst.prefix)
                if not self._slot_rows_say_none(inst, var):
                    # one fact, whatever the model: ramfb, usb-net, an unassigned hostdev, a non-PCI address
                    self.ctx.forbid(
                        f"structural:pci-slot:{inst.var('slot')}",
                        [(inst.var("slot"), frozenset(s for s in slot_values() if s != "none"))],
                        f"{inst.prefix} ({kind.element}) never takes a PCI address",
                        _addressing_provenance(kind),
                    )
                    self.ctx.add(_node_in_cells(inst.var("node")))
                    continue
            for cid, names, sets, message in self._slot_types(inst, var, driver, families, kind, at):
                self.ctx.forbid_sets(cid, names, sets, message, structural, Strength.HARD, 0, (), "")
            # a device's node is a guest cell
            self.ctx.add(_node_in_cells(inst.var("node")))
        self._app_cells()
        self._app_controllers_need_their_bus_kind()
        self._even_split()
        self._affinity()
        self._existing_addresses()
        if self.ctx.focus is not None:
            self._hotplug_slots()
        else:
            self._capacity()

    def _slot_types(
        self,
        inst: Instance,
        var: str,
        driver: str,
        families: tuple[str, ...],
        kind: Addressing | None,
        at: list[str] | None,
    ) -> tuple[tuple[str, tuple[str, ...], tuple[frozenset[str], ...], str], ...]:
        """The slot-type Forbids of one device, one per (value of its driver, machine family), as forbid_sets'
        arguments in order.

        They depend only on the device's names, the [slots] rows, the [[addressing]] kind, the slot types of
        its address and the domains of the variables involved: every request for a typical VM asks the same
        ~80 of them, so they are worked out once per such key and kept across builds."""
        variables = self.ctx.problem.variables
        slot = inst.var("slot")
        domain = variables[driver].values
        key = (
            driver,
            slot,
            inst.cls.name,
            var,
            domain,
            families,
            variables["machine"].values if "machine" in variables else None,
            variables[slot].values,
            kind.takes if kind is not None else None,
            tuple(at) if at is not None else None,
        )
        kept = _SLOT_RECIPES.get(key, self.slots)
        if kept is not None:
            return kept
        found = []
        for value in domain:
            row = self.slots[f"{inst.cls.name}.{var}"].get(value)
            for fam in families:
                allowed = _allowed_slots(fam, row, kind, at)
                settled = self.ctx.settle(
                    [
                        (driver, _just(value)),
                        ("machine", _just(fam)),
                        (slot, _slots_but(tuple(allowed))),
                    ]
                )
                if settled is not None:
                    message = f"{inst.prefix} as {value} on {fam} sits in a {' or '.join(allowed)} slot"
                    found.append((f"structural:pci-slot:{slot}:{value}:{fam}", *settled, message))
        return _SLOT_RECIPES.put(key, self.slots, tuple(found))

    def _slot_rows_say_none(self, inst: Instance, var: str) -> bool:
        """Whether the [slots] row of the value the app wrote already puts the device in no PCI slot (a USB
        tablet, model='none'): then those rows decide, as they do for the same device the engine adds, so that
        re-solving an output records the same reason."""
        from virtpolicy.sources.context import read_explicit

        written = read_explicit(inst.element, inst.cls.variables[var])
        row = self.slots[f"{inst.cls.name}.{var}"].get(written.value) if written is not None else None
        return row is not None and all(allowed == ["none"] for allowed in row.values())

    def app_element(self, inst: Instance) -> etree._Element | None:
        """The app's own element that is this instance's PCI device, if the app wrote one.

        The agent's PCI device is its virtio-serial controller, but only when the agent channel is there: a
        virtio-serial controller without the agent's channel is just a controller (it serves other channels)."""
        if inst.element is None:
            return None
        return pci_element(inst, self.ctx.domain.root)

    def _app_controllers_need_their_bus_kind(self) -> None:
        """A PCI controller the app wrote exists only on the machine families pci.toml [controllers] names
        for its model (libvirt's 'pcie-expander-bus controllers are not supported with this machine type')."""
        families = self.ctx.problem.variables["machine"].values
        for el in self.ctx.domain.root.iterfind("devices/controller[@type='pci']"):
            model = el.get("model", "")
            found = controller_families(model, self.ctx.arch, families)
            if found is None:
                continue
            allowed = list(found)
            here = Explicit(model, xpath_of(el) + "/@model")
            self.ctx.pin(
                "machine", allowed, here, f"a {model} controller needs a {' or '.join(allowed) or 'different'} machine"
            )  # noqa: SLF001

    def _app_cells(self) -> None:
        numa = self.ctx.domain.root.find("cpu/numa")
        if numa is not None:
            self.ctx.warnings.extend(
                check_app_cells(self.ctx.domain.root, self.ctx.domain.source, self.ctx.domain.vcpus)
            )
            count = str(cells_in(self.ctx.domain.root))
            here = Explicit(count, xpath_of(numa))
            self.ctx.pin("numa.cells", [count], here, f"the domain has {count} NUMA cell(s)")  # noqa: SLF001
        elif self.ctx.realized:
            here = Explicit("1", "/domain/cpu (no <numa> in a laid-out domain)")
            self.ctx.pin("numa.cells", ["1"], here, "a laid-out domain keeps its single NUMA cell")  # noqa: SLF001

    def _possible_families(self) -> list[str]:
        """Machine families the app's own machine attribute still allows (all, when it wrote none)."""
        machine = self.ctx.app_machine
        families = list(self.ctx.problem.variables["machine"].values)
        if machine is None:
            return families
        from virtpolicy.knowledge.machines import family_of

        fam = family_of(machine.value)
        return [fam.name] if fam is not None and fam.name in families else families

    def _even_split(self) -> None:
        if cells_in(self.ctx.domain.root):
            return
        vcpus = self.ctx.domain.vcpus
        memory = self.ctx.facts.resolve("domain.memory_mib")
        uneven = [c for c in self.ctx.problem.variables["numa.cells"].values if vcpus % int(c) or int(memory) % int(c)]  # type: ignore[call-overload]
        if uneven:
            self.ctx.forbid(
                "structural:numa-even-split",
                [("numa.cells", frozenset(uneven))],
                f"{vcpus} vCPUs and {memory} MiB cannot be split evenly into {'/'.join(uneven)} cells",
                Provenance(
                    Source.STRUCTURAL,
                    "numa-even-split",
                    "Nova",
                    NOVA,
                    data=(("rule", "numa-even-split"), ("file", "nova"), ("line", 0)),
                ),
            )

    def _affinity(self) -> None:
        by_xpath = {inst.xpath: inst for inst, _ in self.devices}
        wishes = self.affinities()
        for aff in wishes:
            if aff.xpath not in by_xpath and self.ctx.focus is None:
                from virtpolicy.errors import InputError

                raise InputError(
                    f"{self.ctx.domain.source}: {aff.where}: xpath='{aff.xpath}' names no PCI device "
                    f"(known: {', '.join(sorted(by_xpath))})"
                )
        wished = {aff.xpath for aff in wishes}
        for inst, _ in self.devices:
            if inst.prefix in self.never_pci:
                continue  # not in the guest's PCI topology (an unassigned host device): no node to wish for
            if inst.cls.name == "hostdev" and inst.xpath not in wished:
                wishes.append(Affinity(inst.xpath, None, NOVA_DEFAULT_POLICY, ""))  # Nova's default
        locality = HostLocality(self.ctx)
        self._host_devices(locality)
        for aff in wishes:
            inst = by_xpath.get(aff.xpath)
            if inst is None:
                continue  # hot-plug: a laid-out device's wish, already where it is
            name = inst.var("node")
            domain = self.ctx.problem.variables[name].values
            wish = locality.allowed(inst, aff, domain)
            if wish is None:
                continue
            allowed, text, prov = wish
            strength = Strength.SOFT if aff.policy == "preferred" else Strength.HARD
            # a host node matters only to a guest with NUMA cells (Nova: no NUMA topology, no PCI affinity)
            numa = [] if aff.node is not None else [("numa.cells", frozenset(self._multi_cell()))]
            self.ctx.forbid(
                f"{prov.source.value}:{aff.where or prov.where}:{inst.prefix}",
                [(name, frozenset(v for v in domain if v not in allowed)), *numa],
                f"{inst.prefix} {text} ({aff.policy})",
                prov,
                strength=strength,
                priority=200 if strength is Strength.SOFT else 0,
            )

    def _multi_cell(self) -> list[str]:
        return [v for v in self.ctx.problem.variables["numa.cells"].values if v != "1"]

    def _host_devices(self, locality: HostLocality) -> None:
        """A passed-through device is PCIe or conventional as the host says, and must exist on the host."""
        if not self.ctx.host.pci_devices:
            return  # a bundle without nodedev data: libvirt decides at start, as it does without us
        for inst, _ in self.devices:
            if inst.cls.name != "hostdev" or inst.element is None:
                continue
            address = source_address(inst.element)
            dev = locality.device(inst)
            if dev is None:
                self.ctx.forbid(
                    f"host:nodedev:{inst.prefix}",
                    [(inst.var("link"), frozenset(self.ctx.problem.variables[inst.var("link")].values))],
                    f"{inst.prefix}: the host has no PCI device {address} "
                    f"({len(self.ctx.host.pci_devices)} listed in {NODEDEV_FILE})",
                    Provenance(
                        Source.HOST,
                        f"{self.ctx.host.name}/{NODEDEV_FILE}",
                        f"no {address}",
                        data=(
                            ("device", address or ""),
                            ("action", f"pass through a device the host has, not {address}"),
                        ),
                    ),
                )
                continue
            link = "pcie" if dev.pcie else "pci"
            self.ctx.forbid(
                f"host:nodedev-link:{inst.prefix}",
                [
                    (
                        inst.var("link"),
                        frozenset(v for v in self.ctx.problem.variables[inst.var("link")].values if v != link),
                    )
                ],
                f"{inst.prefix}: host {dev.address} is {'a PCI Express' if dev.pcie else 'a conventional PCI'} device",
                Provenance(
                    Source.HOST, dev.where, f"{dev.address} {dev.product}".strip(), data=(("device", dev.address),)
                ),
            )

    def _capacity(self) -> None:
        pcie = [(i.var("slot"), i.var("node")) for i, _ in self.devices]
        if not pcie:
            return
        most_spare = max(int(v) for v in self.ctx.problem.variables["hotplug.ports"].values)
        # root ports exist on PCIe machines only: on pc, hotplug.ports counts free PCI slots, which
        # pci-bridges provide; of several PCIe families the smallest root complex bounds the count
        on_pcie = self._root_kind() != "pci"
        pcie_families = [f for f in self._possible_families() if root_of(f) == "pcie" and lays_out_topology(f)]
        ports = min((root_port_capacity(f) for f in pcie_families), key=lambda c: c.limit, default=None)
        bridges = bridge_cost()
        pcie_root_can_fill = on_pcie and ports is not None and len(pcie) + most_spare > ports.limit
        if pcie_root_can_fill and ports is not None:  # a count that can never exceed its limit only slows the search
            file, _, line = ports.where.partition(":")
            prov = Provenance(
                Source.STRUCTURAL,
                "pcie-root-ports",
                ports.where,
                ports.cite,
                data=(("rule", "pcie-root-ports"), ("file", file), ("line", int(line))),
            )
            self.ctx.add(
                BusBudget(
                    "structural:pcie-root-port-capacity",
                    pcie,
                    None,
                    "hotplug.ports",
                    ports.limit,
                    "PCIe devices plus spare hot-plug ports need one root port each; "
                    f"pcie-root has room for {ports.limit}",
                    prov,
                    bridge_slots=bridges.slots,
                    buses_per_bridge=bridges.buses,
                )
            )
        for node, bus_nr, upper in self._fixed_expanders():
            limit = upper - bus_nr - 1
            self.ctx.add(
                BusBudget(
                    f"app:expander-capacity:{node}",
                    pcie,
                    str(node),
                    "hotplug.ports",
                    limit,
                    f"the PCI devices on node {node} and its spare hot-plug ports need a bus each as PCIe endpoints "
                    f"(or {bridges.buses} buses per {bridges.slots} behind a bridge); the expander's busNr range "
                    f"({bus_nr + 1}-{upper - 1}) allows {limit}",
                    Provenance(
                        Source.APP,
                        f"/domain/devices/controller[@model='pcie-expander-bus'][node={node}]",
                        f"busNr='{bus_nr}'",
                        data=(("xpath", f"target/@busNr of node {node}"), ("value", str(bus_nr))),
                    ),
                    bridge_slots=bridges.slots,
                    buses_per_bridge=bridges.buses,
                )
            )

    def _hotplug_slots(self) -> None:
        """Hot-plug: the new device takes a free slot the domain already has, since a running domain gains
        no controllers. An empty root port or bridge slot outside every expander has no NUMA node: it serves
        any node unless the app requires one."""
        from virtpolicy.errors import InputError
        from virtpolicy.knowledge.machines import family_of
        from virtpolicy.outputs.topology import TopologyBuilder

        root = self.ctx.domain.root
        fam = family_of(self.ctx.app_machine.value) if self.ctx.app_machine else None
        if fam is None or fam.root not in ("pcie", "pci") or root.find("devices/controller[@index='0']") is None:
            raise InputError(
                f"{self.ctx.domain.source}: /domain/os/type/@machine: hot-plug needs a laid-out q35 or pc domain "
                "(with its machine and PCI controllers, as `virtpolicy solve` or `virsh dumpxml` writes it)"
            )
        topology = TopologyBuilder(root.find("devices"), fam.name, cells_in(root), 0)
        slots = topology.hotplug_slots()
        hard = {a.xpath for a in self.affinities() if a.policy != "preferred"}
        counts: dict[tuple[str, int | None], int] = {}
        for slot in slots:
            counts[(slot.model, slot.node)] = counts.get((slot.model, slot.node), 0) + 1
        free = ", ".join(
            f"{n} on {model}{'' if node is None else f' (node {node})'}"
            for (model, node), n in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1] is None, kv[0][1] or 0))
        )
        for inst, _ in self.devices:
            el = self.app_element(inst)
            if inst.prefix in self.never_pci or (el is not None and el.find("address[@type='pci']") is not None):
                continue  # takes no new slot: never a PCI one (usb-net), or one it has (the agent's controller)
            slot_var, node_var = inst.var("slot"), inst.var("node")
            nodes = self.ctx.problem.variables[node_var].values
            pairs: set[tuple[str, str]] = set()
            for slot in slots:
                if slot.node is not None:
                    pairs.add((slot.slot_type, str(slot.node)))
                elif len(nodes) == 1 or inst.xpath not in hard:
                    pairs |= {(slot.slot_type, n) for n in nodes}
            self.ctx.add(
                _pairs_in(
                    f"app:hotplug-slots:{inst.prefix}",
                    slot_var,
                    node_var,
                    pairs,
                    f"{inst.prefix} must take a free hot-plug slot of the running domain; it has "
                    f"{free or 'none'} (pcie-root slots never hot-plug)",
                    Provenance(
                        Source.APP,
                        "/domain/devices (free hot-plug slots)",
                        free or "none",
                        data=(("xpath", "/domain/devices"), ("value", free or "none")),
                    ),
                )
            )

    def _fixed_expanders(self) -> list[tuple[int, int, int]]:
        """(node, busNr, next higher busNr or the domain's bus-number count) of expanders the app wrote itself."""
        found = []
        for el in self.ctx.domain.root.iterfind("devices/controller[@model='pcie-expander-bus']"):
            node = el.findtext("target/node")
            bus_nr = el.find("target").get("busNr") if el.find("target") is not None else None
            if node and bus_nr and node.isdigit() and bus_nr.isdigit():
                found.append((int(node), int(bus_nr)))
        found.sort(key=lambda t: t[1])
        upper = bus_numbers()
        return [(n, b, found[i + 1][1] if i + 1 < len(found) else upper) for i, (n, b) in enumerate(found)]

    def _existing_addresses(self) -> None:
        """A device that already has a PCI address keeps it: its slot type and node follow from where it is."""
        if self.ctx.focus is not None:
            here = Explicit("0", "/domain/devices (a running domain gains no controllers)")
            self.ctx.problem.add_variable("hotplug.ports", ["0"])
            self.ctx.pin("hotplug.ports", ["0"], here, "hot-plug adds no root ports")  # noqa: SLF001
        elif self.ctx.realized:
            empty = self._spare_of_laid_out()
            here = Explicit(str(empty), "/domain/devices (spare hot-plug slots of a laid-out domain)")
            self.ctx.problem.add_variable("hotplug.ports", [str(empty)])
            what = "spare root port(s)" if self._root_kind() == "pcie" else "free hot-plug PCI slot(s)"
            self.ctx.pin("hotplug.ports", [str(empty)], here, f"{empty} {what} stay as they are")  # noqa: SLF001
        controllers = {
            int(c.get("index", "-1")): c for c in self.ctx.domain.root.iterfind("devices/controller[@type='pci']")
        }
        nodes = {bus: _node_of_bus(bus, controllers) for bus in controllers}
        for inst, _ in self.devices:
            # a device that never takes a PCI address but has one (ramfb at a PCI address) is a conflict here:
            # libvirt refuses it ("'address' is not supported for 'ramfb' video devices")
            el = self.app_element(inst)
            addr = el.find("address[@type='pci']") if el is not None else None
            if addr is None:
                self._existing_agent_controller(inst)
                continue
            bus = int(addr.get("bus", "0"), 0)
            slots = _slots_at(addr, controllers)
            here = Explicit(",".join(slots), xpath_of(addr))
            refused = _refused_address(addr, controllers)
            if refused is not None:
                self.ctx.forbid(
                    f"app:{xpath_of(addr)}:bus",
                    [(inst.var("slot"), frozenset(slot_values()))],
                    f"{inst.prefix}: {refused}",
                    Provenance(
                        Source.APP,
                        xpath_of(addr),
                        _address_text(addr),
                        "libvirt src/conf/domain_addr.c virDomainPCIAddressBusSetModel, virDomainPCIAddressValidate",
                        data=(("xpath", xpath_of(addr)), ("value", _address_text(addr))),
                    ),
                )
            self.ctx.pin(inst.var("slot"), slots, here, f"{inst.prefix} keeps its PCI address")  # noqa: SLF001
            node = nodes.get(bus)
            if node is not None and str(node) in self.ctx.problem.variables[inst.var("node")].values:
                self.ctx.pin(inst.var("node"), [str(node)], here, f"{inst.prefix} stays on node {node}")  # noqa: SLF001

    def _existing_agent_controller(self, inst: Instance) -> None:
        """An agent channel the engine may add attaches to the virtio-serial controller already there: if it is
        added (model not none), its model and slot are that controller's, which keeps its address."""
        if inst.cls.name != "agent" or inst.element is not None:
            return
        controller = self.ctx.domain.root.find("devices/controller[@type='virtio-serial']")
        if controller is None:
            return
        model_var = inst.var("model")
        models = self.ctx.problem.variables[model_var].values
        written = controller.get("model")
        addr = controller.find("address[@type='pci']")
        if written is not None:
            same = [written]
        elif addr is not None:
            same = ["virtio"]  # laid out as plain virtio: its mode is fixed by its address
        else:
            same = [m for m in models if m.startswith("virtio")]
        where = xpath_of(controller)
        prov = Provenance(
            Source.APP, where, f"'{written or 'virtio'}'", data=(("xpath", where), ("value", written or "virtio"))
        )
        added = frozenset(m for m in models if m != "none")
        self.ctx.forbid(
            f"app:{where}:agent-model",
            [(model_var, frozenset(m for m in added if m not in same))],
            f"an added agent channel attaches to the existing virtio-serial controller ({written or 'virtio'})",
            prov,
        )
        if addr is None:
            return
        slots = _slots_at(addr, self._controllers())
        self.ctx.forbid(
            f"app:{xpath_of(addr)}:agent-slot",
            [(model_var, added), (inst.var("slot"), frozenset(s for s in slot_values() if s not in slots))],
            "an added agent channel uses the existing virtio-serial controller, at its PCI address",
            prov,
        )

    def _controllers(self) -> dict[int, etree._Element]:
        """The PCI controllers the app wrote, by index (read once: the app's XML does not change in a build)."""
        if self._controllers_by_index is None:
            found = self.ctx.domain.root.iterfind("devices/controller[@type='pci']")
            self._controllers_by_index = {int(c.get("index", "-1")): c for c in found}
            kind = self._root_kind()
            if 0 not in self._controllers_by_index and kind in ("pci", "pcie"):
                # bus 0 is the machine's root even when unwritten (libvirt adds it at define:
                # qemu_domain.c qemuDomainDefAddDefaultDevices), so an address on it means the same whether
                # or not the app wrote the controller: solving the output again decides the same slots
                implied = etree.Element("controller", type="pci", index="0", model=f"{kind}-root")
                self._controllers_by_index[0] = implied
        return self._controllers_by_index

    def _root_kind(self) -> str:
        """pcie or pci when every machine the app's XML still allows has that root bus, else 'either'."""
        roots = {root_of(f) for f in self._possible_families()}
        return roots.pop() if len(roots) == 1 else "either"

    def _spare_of_laid_out(self) -> int:
        """The spare hot-plug room a laid-out domain keeps (root ports on q35, free PCI slots on pc), at most
        what the engine recorded deciding, so that re-solving neither adds nor reports a change."""
        from virtpolicy.knowledge.machines import family_of
        from virtpolicy.outputs.topology import TopologyBuilder

        root = self.ctx.domain.root
        fam = family_of(self.ctx.app_machine.value) if self.ctx.app_machine else None
        if fam is not None and fam.root == "pci" and root.find("devices/controller[@index='0']") is not None:
            count = len(TopologyBuilder(root.find("devices"), fam.name, cells_in(root), 0).hotplug_slots())
        else:
            count = _spare_ports_of(root)
        recorded = self.ctx.domain.previous_decisions().get("hotplug.ports")
        if recorded is not None and recorded[0].isdigit():
            count = min(count, int(recorded[0]))
        return count

    def prefer(self) -> None:
        """Lowest preferences, taken after the device models are decided (a slot follows from a model)."""
        rows = placement_preferences()
        for row_id in ("engine.numa-cells", "engine.hotplug-ports"):
            row = rows[row_id]
            value = row.order[0]
            self._prefer(row.variable, value, f"{row.id}:{value}", f"prefer {row.why}", row.id, _provenance(row))
        slot_row, node_row = rows["engine.slot"], rows["engine.node"]
        for inst, _ in self.devices:
            slot, node = inst.var("slot"), inst.var("node")
            value = slot_row.order[0]
            self._prefer(
                slot,
                value,
                f"{slot_row.id}:{slot}={value}",
                f"prefer {slot} = {value}: {slot_row.why}",
                f"{slot_row.id}:{slot}",
                _provenance(slot_row),
            )
            if len(self.ctx.problem.variables[node].values) > 1:
                value = node_row.order[0]
                self._prefer(
                    node,
                    value,
                    f"{node_row.id}:{node}={value}",
                    f"prefer {node} = {value}",
                    f"{node_row.id}:{node}",
                    _provenance(node_row),
                )

    def _prefer(self, name: str, value: str, cid: str, message: str, group: str, provenance: Provenance) -> None:
        """An engine default: soft, lowest priority, `name = value` (`provenance`: the data row that says so)."""
        domain = self.ctx.problem.variables[name].values
        self.ctx.forbid(
            cid,
            [(name, _rest(domain, value))],
            message,
            provenance,
            strength=Strength.SOFT,
            group=group,
        )


def _provenance(row: Preference) -> Provenance:
    """An engine-defaults.toml [[placement_prefer]] row as provenance: its id and file:line.

    Made once per row (frozen, so shared): every device's slot and node preference asks for one."""
    kept = _ROW_PROVENANCE.get(id(row))
    if kept is not None and kept[0] is row:
        return kept[1]
    prov = Provenance(Source.ENGINE, row.id, row.where, data=(("preference", row.id),))
    _ROW_PROVENANCE[id(row)] = (row, prov)  # the row is held, so its id is not reused
    return prov


_ROW_PROVENANCE: dict[int, tuple[Preference, Provenance]] = {}


@lru_cache(maxsize=1024)
def _just(value: str) -> frozenset[str]:
    """One value as a set, shared: the kept slot-type recipes hold thousands of these."""
    return frozenset([value])


@lru_cache(maxsize=256)
def _slots_but(allowed: tuple[str, ...]) -> frozenset[str]:
    """The slot types a device may not take, when it may take `allowed` (shared, as _just)."""
    return frozenset(s for s in slot_values() if s not in allowed)


@lru_cache(maxsize=1024)
def _rest(domain: tuple[str, ...], value: str) -> frozenset[str]:
    """A domain but one value: the set a preference for that value forbids (one per domain and value)."""
    return frozenset(v for v in domain if v != value)


def _allowed_slots(
    family: str, row: dict[str, list[str]] | None, kind: Addressing | None, at: list[str] | None
) -> list[str]:
    """The slot types a device may take on a machine of `family` (a [slots] row's family key, else its
    root bus kind's).

    `row` is the pci.toml [slots] row of the value (how libvirt auto-places it), `kind` the [[addressing]] row
    of the app's element, `at` the slot types of the PCI address the app (or libvirt) already wrote, if any.
    An explicit address needs no particular slot type: libvirt checks an address from the XML with its
    fromConfig relaxation (domain_addr.c virDomainPCIAddressFlagsCompatible: a bus that takes any endpoint
    takes PCI and PCIe ones, and pcie-root takes integrated endpoints), so where the auto-placement row
    disagrees, the address decides. A value with no row is one the engine does not model: its element's
    [[addressing]] row says what libvirt gives it; without one the device is carried through untouched
    (slot none: libvirt places it, as it would without the engine)."""
    root = root_of(family)
    if kind is not None and kind.takes == "none":
        return ["none"]  # a device libvirt never gives a PCI address (ramfb, usb-net, unassigned, USB ...)
    if root not in pci_roots():
        # channel I/O (s390): no PCI slot of the engine's making, but an explicit zPCI address stays
        return list(at) if at is not None else ["none"]
    if row is not None:
        allowed = list(row.get(family) or row[root])
    elif kind is not None:
        allowed = list(takes_slots(kind.takes, root))  # pci.toml [takes]
    else:
        allowed = ["none"]
    if at is not None and allowed != ["none"]:
        allowed = [s for s in allowed if s in at] or list(at)
    elif at is not None and row is None:
        allowed = list(at)  # a kind the engine does not model, already at a PCI address: it stays there
    return allowed


def _addressing_provenance(row: Addressing) -> Provenance:
    """The citation of an [[addressing]] row, for a device that never takes a PCI address."""
    return Provenance(
        Source.STRUCTURAL,
        "pci-addressing",
        "pci.toml [[addressing]]",
        f"libvirt {row.cite}",
        data=(("rule", "pci-addressing"), ("file", "pci.toml"), ("line", 0)),
    )


def _slots_at(addr: etree._Element, controllers: dict[int, etree._Element]) -> list[str]:
    """The slot type an existing PCI address is, from the kind of bus it sits on (pci.toml [buses] slot_type)."""
    bus = int(addr.get("bus", "0"), 0)
    model = controllers[bus].get("model", "") if bus in controllers else ""
    return list(bus_rule(model).slot_types)


def _address_text(addr: etree._Element) -> str:
    """An address as libvirt prints it (virPCIDeviceAddressAsString: 0000:00:1f.2)."""
    try:
        parts = [int(addr.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function")]
    except ValueError:
        return " ".join(f"{k}={addr.get(k)}" for k in ("domain", "bus", "slot", "function"))
    return f"{parts[0]:04x}:{parts[1]:02x}:{parts[2]:02x}.{parts[3]}"


def _refused_address(addr: etree._Element, controllers: dict[int, etree._Element]) -> str | None:
    """libvirt's own error for an explicit device address its bus does not take (pci.toml [buses]), or None.

    A bus index with no controller is one libvirt adds with its default model, so nothing is known to refuse."""
    bus = int(addr.get("bus", "0"), 0)
    model = controllers[bus].get("model", "") if bus in controllers else ""
    rule = table().get("buses", {}).get(model)
    if rule is None:
        return None
    where = _address_text(addr)
    if not rule["endpoints"]:
        return (
            f"The device at PCI address {where} cannot be plugged into the PCI controller with index='{bus}' "
            f"({model} takes no endpoint devices)"
        )
    slot = int(addr.get("slot", "0"), 0)
    low, high = rule["slots"]
    if slot < low:
        return f"Invalid PCI address {where}. slot must be >= {low} (on a {model})"
    if slot > high:
        return f"Invalid PCI address {where}. slot must be <= {high} (on a {model})"
    return None


def _node_in_cells(node_var: str) -> Constraint:
    from virtpolicy.core.problem import Predicate

    return Predicate(
        id=f"structural:node-in-cells:{node_var}",
        variables=(node_var, "numa.cells"),
        message=f"{node_var} must be one of the guest's NUMA cells",
        provenance=structural_provenance("node-in-cells"),
        test=lambda v, _n=node_var: int(v[_n]) < int(v["numa.cells"]),
    )


def check_app_cells(root: etree._Element, source: str, vcpus: int) -> list[str]:
    """The app's own cells must hold each vCPU exactly once (Nova's manual-topology rules; libvirt rejects
    overlaps and CPUs beyond <vcpu>). Memory that does not add up is what libvirt accepts and fixes itself
    (<memory> becomes the cells' sum plus the memory modules), so it is a warning, not an error."""
    from virtpolicy.errors import InputError
    from virtpolicy.inputs.nodeset import parse_nodeset
    from virtpolicy.inputs.units import to_kib

    owner: dict[int, str] = {}
    total_kib = 0
    for cell in root.iterfind("cpu/numa/cell"):
        where = xpath_of(cell)
        try:
            cpus = parse_nodeset(cell.get("cpus", ""))
            kib = to_kib(cell.get("memory", "0"), cell.get("unit"))
        except ValueError:
            raise InputError(f"{source}:{cell.sourceline}: {where}: cpus or memory is not a number") from None
        total_kib += kib
        for cpu in sorted(cpus):
            if cpu >= vcpus:
                raise InputError(
                    f"{source}:{cell.sourceline}: {where}: cpus='{cell.get('cpus')}' names vCPU {cpu}, "
                    f"but /domain/vcpu is {vcpus} (vCPUs 0-{vcpus - 1})"
                )
            if cpu in owner:
                raise InputError(
                    f"{source}:{cell.sourceline}: {where}: vCPU {cpu} is in {owner[cpu]} already (each vCPU belongs "
                    "to exactly one cell)"
                )
            owner[cpu] = where
    missing = [c for c in range(vcpus) if c not in owner]
    numa = root.find("cpu/numa")
    if missing:
        raise InputError(
            f"{source}:{numa.sourceline}: /domain/cpu/numa: vCPU(s) {', '.join(map(str, missing))} of /domain/vcpu's "
            f"{vcpus} are in no cell (Nova: every vCPU belongs to exactly one cell)"
        )
    modules_kib = 0
    for module in root.iterfind("devices/memory/target/size"):
        if (module.text or "").strip().isdigit():
            modules_kib += to_kib(module.text or "0", module.get("unit"))
    memory = root.find("memory")
    if memory is not None and (memory.text or "").strip().isdigit():
        domain_kib = to_kib(memory.text or "0", memory.get("unit"))
        if abs(domain_kib - total_kib - modules_kib) >= 1:
            modules = f" and the memory modules {modules_kib / 1024:g} MiB" if modules_kib else ""
            return [
                f"{source}:{numa.sourceline}: /domain/cpu/numa: the cells hold {total_kib / 1024:g} MiB{modules} "
                f"but /domain/memory is {domain_kib / 1024:g} MiB; libvirt takes the sum "
                f"({(total_kib + modules_kib) / 1024:g} MiB) at define (libvirt "
                "virDomainDefPostParseMemory, src/conf/domain_postparse.c:44-53)"
            ]
    return []


def _spare_ports_of(root: etree._Element) -> int:
    """Spare root ports a laid-out domain keeps: the fewest under any expander, or all, without expanders."""
    used = {int(b, 0) for a in root.iterfind("devices/*/address[@type='pci']") if (b := a.get("bus"))}
    expanders = {int(el.get("index", "-1")) for el in root.iterfind("devices/controller[@model='pcie-expander-bus']")}
    per_parent = dict.fromkeys(expanders, 0) if expanders else {0: 0}
    for el in root.iterfind("devices/controller[@model='pcie-root-port']"):
        addr = el.find("address[@type='pci']")
        parent = int(addr.get("bus", "0"), 0) if addr is not None else 0
        if el.get("index", "").isdigit() and int(el.get("index", "")) not in used:
            if not expanders:
                parent = 0
            if parent in per_parent:
                per_parent[parent] += 1
    return min(per_parent.values())


def _pairs_in(
    cid: str, first: str, second: str, pairs: set[tuple[str, str]], message: str, provenance: Provenance
) -> Constraint:
    from virtpolicy.core.problem import Predicate

    return Predicate(
        id=cid,
        variables=(first, second),
        message=message,
        provenance=provenance,
        test=lambda v: (v[first], v[second]) in pairs,
    )


def pci_element(inst: Instance, root: etree._Element) -> etree._Element | None:
    """The element that is the PCI device of an instance (the agent's is its virtio-serial controller)."""
    if inst.cls.name == "agent":
        return root.find("devices/controller[@type='virtio-serial']")
    return inst.element


def _node_of_bus(bus: int, controllers: dict[int, etree._Element]) -> int | None:
    """Follow a bus up to the expander it hangs off; that expander's <node> is the device's node."""
    seen = set()
    while bus in controllers and bus not in seen:
        seen.add(bus)
        ctrl = controllers[bus]
        node = ctrl.findtext("target/node")
        if node is not None and node.isdigit():
            return int(node)
        addr = ctrl.find("address[@type='pci']")
        if addr is None:
            return None
        bus = int(addr.get("bus", "0"), 0)
    return None
