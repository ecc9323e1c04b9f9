"""The PCI topology: controllers and an explicit address for every PCI device, built on a small bus graph.

q35: endpoints each get a pcie-root-port (packed 8 per slot as multifunction, as libvirt does);
conventional devices go behind a pcie-to-pci-bridge; with guest NUMA cells, each cell's devices hang off
a pcie-expander-bus carrying that cell's <node> and a busNr range sized for its buses. pc: devices on
pci-root, a pci-bridge when it is full, a pci-expander-bus per cell. Addresses already in the XML are
kept (ABI); new devices take free slots; removing a device shifts nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from virtpolicy.errors import InputError
from virtpolicy.inputs.domain import xpath_of
from virtpolicy.knowledge.machines import family_named, lays_out_topology
from virtpolicy.knowledge.pci import bus_numbers, bus_rule, fixed_layout, root_port_functions, usb2_layouts

EXPANDER_HEADROOM = 4  # bus numbers kept free under each expander, for devices added to that cell later


@dataclass
class Placement:
    element: etree._Element
    slot_type: str  # pcie | pci | integrated
    node: int | None
    fixed: tuple[int, int] | None = None  # (slot, function) on bus 0 for integrated devices
    companions: list[etree._Element] = field(default_factory=list)  # USB2 companions (pci.toml [usb2])


@dataclass
class Bus:
    index: int
    model: str
    first_slot: int
    last_slot: int
    used: set[tuple[int, int]] = field(default_factory=set)  # (slot, function)
    reserved: set[int] = field(default_factory=set)  # slots kept for the chipset's fixed devices
    functions: dict[int, set[int]] = field(default_factory=dict)  # slot -> functions in use: `used` by slot

    def use(self, slot: int, function: int) -> None:
        """Take (slot, function); `functions` keeps the lookups by slot constant-time for big domains."""
        self.used.add((slot, function))
        self.functions.setdefault(slot, set()).add(function)

    def free_slots(self) -> list[int]:
        return [
            slot
            for slot in range(self.first_slot, self.last_slot + 1)
            if slot not in self.functions and slot not in self.reserved
        ]

    def free_slot(self) -> int | None:
        free = self.free_slots()
        return free[0] if free else None

    def next_slot(self) -> int:
        """The first free slot of a bus the caller knows has one (slot 0 included: a pxb's first is 0)."""
        slot = self.free_slot()
        if slot is None:
            raise TopologyError(f"PCI bus {self.index} is full")
        return slot


@dataclass(frozen=True)
class HotplugSlot:
    """A free slot a running domain can take a device into: an empty root port, or a bridge or pci-root slot."""

    bus: int
    slot: int
    slot_type: str  # pcie (a root or downstream port) | pci (a bridge, or pci-root on pc)
    node: int | None  # the guest NUMA node of the expander above it, if any
    model: str


EXPANDERS = ("pcie-expander-bus", "pci-expander-bus")


def _where(el: etree._Element, source: str) -> str:
    line = f"{source}:{el.sourceline}: " if source and el.sourceline else ""
    return f"{line}{xpath_of(el)}"


def check_controllers(devices: etree._Element | None, source: str = "") -> None:
    """Refuse PCI controller graphs that are not trees, with libvirt's words, before anything walks them.

    Every walk up from a bus (its expander's NUMA node, the bridge above a root port) assumes each bus
    has one parent and the chain ends at the root; a root controller with an address, a controller on its
    own bus or two bridges behind each other would make those walks loop forever. Cheap (one pass over
    the controllers, each chain walked at most once), so complete domains are checked too.
    """
    if devices is None:
        return
    parent: dict[int, int] = {}
    address_of: dict[int, etree._Element] = {}
    for ctrl in devices.iterfind("controller[@type='pci']"):
        model = ctrl.get("model", "")
        addr = ctrl.find("address")
        if model in ("pci-root", "pcie-root") and addr is not None:
            # domain_validate.c virDomainControllerDefValidate
            raise InputError(f"{_where(addr, source)}: pci-root and pcie-root controllers should not have an address")
        index, bus = ctrl.get("index", ""), addr.get("bus", "") if addr is not None else ""
        if addr is None or addr.get("type") != "pci" or not index.isdigit():
            continue
        try:
            parent[int(index)] = int(bus or "0", 0)
        except ValueError:
            continue  # not a number: the typed input checks name it; nothing to walk here
        address_of[int(index)] = addr
    settled: set[int] = set()  # buses known to lead to the root (or to a bus without a controller)
    for index in sorted(parent):
        chain = [index]
        current = parent.get(index)
        while current is not None and current not in settled and current not in chain:
            chain.append(current)
            current = parent.get(current)
        if current is None or current in settled:
            settled.update(chain)
            continue
        where = _where(address_of[current], source)
        if current == index and len(chain) == 1:
            # qemu_domain_address.c qemuDomainAssignPCIAddresses says so for a pci-bridge; any bus alike
            raise InputError(
                f"{where}: PCI controller at index {index} (0x{index:02x}) has bus='0x{index:02x}', "
                "but index must be larger than bus"
            )
        loop = " behind ".join(str(i) for i in [*chain[chain.index(current) :], current])
        raise InputError(
            f"{where}: the PCI controllers with index {loop} are plugged into each other; each controller "
            "needs a bus that leads to the root (pci-root or pcie-root, index 0)"
        )


class _BusGraph:
    """Buses and what plugs into them: the few graph operations the builder needs (networkx's DiGraph API
    for them, without importing networkx on every solve: it was a sixth of a CLI run's start-up)."""

    def __init__(self) -> None:
        self.nodes: dict[Any, dict[str, Any]] = {}
        self._children: dict[Any, list[Any]] = {}
        self._parents: dict[Any, list[Any]] = {}

    def __contains__(self, node: object) -> bool:
        return node in self.nodes

    def add_node(self, node: Any, **attrs: Any) -> None:
        self.nodes.setdefault(node, {}).update(attrs)

    def add_edge(self, parent: Any, child: Any, **_attrs: Any) -> None:
        self.add_node(parent)
        self.add_node(child)
        if child not in self._children.setdefault(parent, []):
            self._children[parent].append(child)
            self._parents.setdefault(child, []).append(parent)

    def predecessors(self, node: Any) -> list[Any]:
        return list(self._parents.get(node, ()))

    def descendants(self, node: Any) -> set[Any]:
        seen: set[Any] = set()
        stack = list(self._children.get(node, ()))
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self._children.get(current, ()))
        return seen


class TopologyBuilder:
    def __init__(
        self, devices_el: etree._Element, family: str, cells: int, hotplug_ports: int, source: str = ""
    ) -> None:
        self.devices = devices_el
        self.source = source
        self.family = family
        self.root_kind = family_named(family).root if lays_out_topology(family) else "other"
        self.cells = cells
        self.hotplug_ports = hotplug_ports
        self.graph = _BusGraph()
        self.buses: dict[int, Bus] = {}
        # indexes over the graph, kept as edges are added, so that placing each of thousands of devices does
        # not rescan every bus: what hangs off each (bus, slot), and the empty root ports under each parent
        self._children: dict[tuple[int, int], list[tuple[tuple[str, int], int]]] = {}
        self._empty_ports: dict[int, set[int]] = {}
        self._last_controller: etree._Element | None = None
        self.next_index = 1
        self.layout = fixed_layout(family)  # pci.toml [fixed.FAMILY]
        self.reserved = set(self.layout.reserved)
        self.video_slot = self.layout.video[0] if self.layout.video is not None else None  # x86 only
        self.first_port_slot = self.layout.first_port_slot
        self._read_existing()

    # --- hot-plug: only what is there ----------------------------------------------------------------
    def hotplug_slots(self) -> list[HotplugSlot]:
        """Every free slot this domain can hot-plug into, in address order (a running domain gains no buses)."""
        found = []
        for index, bus in sorted(self.buses.items()):
            kind = bus_rule(bus.model).hotplug
            element = self.graph.nodes[("bus", index)]["element"]
            if not kind or element.find("target[@hotplug='off']") is not None:
                continue
            node = self.node_of_bus(index)
            found += [HotplugSlot(index, slot, kind, node, bus.model) for slot in bus.free_slots()]
        return found

    def node_of_bus(self, index: int) -> int | None:
        """The <node> of the expander a bus hangs off, walking up the graph.

        The walk keeps the buses it has seen: `_read_existing` refuses cycles, but a walk that can loop
        forever on a malformed graph is not worth the one set it saves.
        """
        current: int | None = index
        seen: set[int] = set()
        while current is not None and current not in seen and ("bus", current) in self.graph:
            seen.add(current)
            node = self.graph.nodes[("bus", current)].get("element")
            text = node.findtext("target/node") if node is not None else None
            if text is not None and text.isdigit():
                return int(text)
            current = self._parent_of(current)
        return None

    def hotplug(self, p: Placement) -> HotplugSlot:
        """Put one device into the first free hot-plug slot of its slot type and node."""
        fitting = [s for s in self.hotplug_slots() if s.slot_type == p.slot_type]
        # on its own node first; a slot outside every expander (no node) only when the node has none left
        for slot in sorted(fitting, key=lambda s: s.node != p.node and self.cells > 1):
            if self.cells < 2 or slot.node in (p.node, None):
                self._address(p.element, slot.bus, slot.slot)
                return slot
        raise TopologyError(f"no free hot-plug slot for a {p.slot_type} device on node {p.node}")

    # --- what is there already ---------------------------------------------------------------------
    def _read_existing(self) -> None:
        root_model = "pcie-root" if self.root_kind == "pcie" else "pci-root"
        for ctrl in self.devices.findall("controller[@type='pci']"):
            index = int(ctrl.get("index", "-1"))
            model = ctrl.get("model", "")
            if index >= 0:
                self._add_bus(index, model, ctrl)
                self.next_index = max(self.next_index, index + 1)
        if 0 not in self.buses and self.root_kind in ("pcie", "pci"):
            el = etree.Element("controller", type="pci", index="0", model=root_model)
            self._insert(el)
            self._add_bus(0, root_model, el)
        check_controllers(self.devices, self.source)
        for addr in self.devices.iterfind("*/address[@type='pci']"):
            bus, slot, function = (int(addr.get(k, "0"), 0) for k in ("bus", "slot", "function"))
            self._link(bus, slot, function, self._node_of(addr.getparent()))

    def _link(self, bus: int, slot: int, function: int, child: tuple[str, int]) -> None:
        """`child` sits at (slot, function) of `bus`: the graph edge, the bus's use and the indexes."""
        if bus in self.buses:
            self.buses[bus].use(slot, function)
            parent = self._parent_of(bus)
            if parent is not None:
                self._empty_ports.get(parent, set()).discard(bus)
        self.graph.add_edge(("bus", bus), child, slot=slot, function=function)
        self._children.setdefault((bus, slot), []).append((child, function))
        if child[0] == "bus" and child[1] in self.buses:
            port = self.buses[child[1]]
            if port.model == "pcie-root-port" and not port.used:
                self._empty_ports.setdefault(bus, set()).add(child[1])

    @staticmethod
    def _node_of(el: etree._Element) -> tuple[str, int]:
        """Graph node of an element: a bus for PCI controllers, a device otherwise."""
        if el.tag == "controller" and el.get("type") == "pci" and el.get("index", "").isdigit():
            return ("bus", int(el.get("index", "0")))
        return ("device", id(el))

    def _add_bus(self, index: int, model: str, el: etree._Element) -> None:
        rule = bus_rule(model)
        bus = Bus(index, model, rule.first_slot, rule.last_slot, reserved=set(self.reserved) if index == 0 else set())
        self.buses[index] = bus
        self.graph.add_node(("bus", index), model=model, element=el)

    def empty_root_ports(self, parent: int) -> Iterator[int]:
        for index in sorted(self._empty_ports.get(parent, ())):
            bus = self.buses[index]
            if bus.model == "pcie-root-port" and not bus.used and self._parent_of(index) == parent:
                yield index

    def _parent_of(self, index: int) -> int | None:
        preds = list(self.graph.predecessors(("bus", index)))
        return preds[0][1] if preds else None

    # --- building ----------------------------------------------------------------------------------
    def _insert(self, el: etree._Element) -> None:
        """After the last controller (libvirt's order). Only this builder adds controllers while it runs, so
        the last one is looked up once and then remembered, not searched for with every new root port."""
        last = self._last_controller
        if last is None or last.getparent() is not self.devices:
            controllers = self.devices.findall("controller")
            last = controllers[-1] if controllers else None
        if last is not None:
            last.addnext(el)
            self._last_controller = el
        else:
            disks = self.devices.findall("disk")
            if disks:
                disks[-1].addnext(el)
            else:
                self.devices.insert(0, el)
            self._last_controller = el

    def _address(self, el: etree._Element, bus: int, slot: int, function: int = 0, new_bus: int | None = None) -> None:
        """Give `el` the PCI address (bus, slot, function), replacing any it has.

        `new_bus` is the index of the controller `el` when this builder has just made it: it has no
        address yet and is that bus's graph node, which saves reading both back from the element.
        """
        if new_bus is None:
            for old in el.findall("address"):
                el.remove(old)
        # one set() per attribute, in the order libvirt writes them: SubElement's keyword attributes cost
        # about twice as much, and every placed device and new controller gets one
        address = etree.SubElement(el, "address")
        address.set("type", "pci")
        address.set("domain", "0x0000")
        address.set("bus", f"0x{bus:02x}")
        address.set("slot", f"0x{slot:02x}")
        address.set("function", f"0x{function:01x}")
        self._link(bus, slot, function, self._node_of(el) if new_bus is None else ("bus", new_bus))

    def _controller(
        self,
        model: str,
        parent: int,
        slot: int,
        function: int = 0,
        target: dict[str, str] | None = None,
        node: int | None = None,
    ) -> int:
        """A new controller at (parent, slot, function), with the QEMU model name and <target> attributes
        libvirt would give it (pci.toml [buses] model_name, target), plus `target` and `node`."""
        index = self.next_index
        self.next_index += 1
        rule = bus_rule(model)
        el = etree.Element("controller")  # attributes one set() each, as in _address
        el.set("type", "pci")
        el.set("index", str(index))
        el.set("model", model)
        etree.SubElement(el, "model").set("name", rule.model_name)
        attributes = {**rule.target_attributes(index, slot, function), **(target or {})}
        if attributes or node is not None:
            t = etree.SubElement(el, "target")
            for name, value in attributes.items():
                t.set(name, value)
            if node is not None:
                etree.SubElement(t, "node").text = str(node)
        self._insert(el)
        self._add_bus(index, model, el)
        self._address(el, parent, slot, function, new_bus=index)
        return index

    def _root_port(self, parent: int) -> int:
        """A new pcie-root-port on `parent`, packed into multifunction slots like libvirt does."""
        bus = self.buses[parent]
        slot_function = None
        for slot in range(max(bus.first_slot, self.first_port_slot if parent == 0 else 0), bus.last_slot + 1):
            if parent == 0 and (slot == self.video_slot or slot in bus.reserved):
                continue
            used_here = bus.functions.get(slot, set())
            if used_here and not self._ports_only(parent, slot):
                continue
            free = [f for f in range(root_port_functions()) if f not in used_here]
            if free:
                slot_function = (slot, free[0])
                break
        if slot_function is None:
            raise TopologyError(f"no free slot for a pcie-root-port on bus {parent}")
        slot, function = slot_function
        index = self._controller("pcie-root-port", parent, slot, function)
        self._mark_multifunction(parent, slot)
        return index

    def _ports_only(self, bus: int, slot: int) -> bool:
        for child, _ in self._children.get((bus, slot), ()):
            if child[0] == "bus" and self.buses[child[1]].model != "pcie-root-port":
                return False
            if child[0] == "device":
                return False
        return True

    def _mark_multifunction(self, bus: int, slot: int) -> None:
        if len(self.buses[bus].functions.get(slot, ())) < 2:
            return
        for child, function in self._children.get((bus, slot), ()):
            if function == 0 and child[0] == "bus":
                el = self.graph.nodes[child]["element"]
                addr = el.find("address")
                if addr is not None:
                    addr.set("multifunction", "on")

    def _bridge(self, parent_kind: str, parent: int) -> int:
        if parent_kind == "pcie":
            port = self._root_port(parent)
            return self._controller("pcie-to-pci-bridge", port, 0)
        slot = self.buses[parent].free_slot()
        if slot is None:
            raise TopologyError(f"PCI bus {parent} is full and has no slot left for a pci-bridge")
        return self._controller("pci-bridge", parent, slot)

    def place(self, placements: list[Placement]) -> None:
        """Give every placement without an address one, building controllers as needed."""
        todo = [p for p in placements if p.element.find("address[@type='pci']") is None]
        for p in [p for p in todo if p.companions]:
            self._with_companions(p)
        for p in todo:
            if p.companions and p.element.find("address[@type='pci']") is not None:
                continue  # placed with its companions, at their slot (which may not be p.fixed's)
            if p.slot_type == "integrated" and p.fixed is not None:
                slot, function = p.fixed
                if (slot, function) not in self.buses[0].used:
                    self._address(p.element, 0, slot, function)
                    continue
                p.slot_type = "pcie" if self.root_kind == "pcie" else "pci"
        by_node: dict[int | None, list[Placement]] = {}
        for p in todo:
            if p.element.find("address[@type='pci']") is None:
                by_node.setdefault(p.node if self.cells > 1 else None, []).append(p)
        nodes = {n for n in by_node if n is not None}
        fresh = not any(bus.model in EXPANDERS for bus in self.buses.values())
        if fresh and self.cells > 1 and self.hotplug_ports and self.root_kind == "pcie":
            nodes |= set(range(self.cells))  # every cell gets spare ports of its own, for NUMA-local hot-plug
        expanders = self._expanders(sorted(nodes), by_node)
        for node, group in sorted(by_node.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
            parent = 0 if node is None else expanders[node]
            self._place_group(group, parent)
        self._spare_ports(expanders)
        self._bus_numbers(expanders)

    def _with_companions(self, p: Placement) -> None:
        """A USB2 controller and its companions at their functions of one bus-0 slot (pci.toml [usb2]): the
        family's own slots first, the first free one of them ([fixed.FAMILY] ich9_usb: 00:1D, else 00:1A), then
        any free slot, as libvirt does. The companion at function 0 is multifunction."""
        layout = usb2_layouts().get(p.element.get("model", ""))
        bus = self.buses[0]
        if layout is None:
            return  # not a USB2 controller the table lays out: libvirt places it
        own = self.layout.usb2_slots if p.fixed is not None else ()
        slot = next((s for s in own if s not in bus.functions), None)
        if slot is None:
            slot = next(
                (
                    s
                    for s in range(max(bus.first_slot, self.first_port_slot), bus.last_slot + 1)
                    if s not in bus.reserved and s != self.video_slot and s not in bus.functions
                ),
                None,
            )
        if slot is None:
            return  # leave it to libvirt
        self._address(p.element, 0, slot, layout.function)
        functions = dict(layout.companions)
        for companion in p.companions:
            function = functions.get(companion.get("model", ""))
            if function is not None and companion.find("address") is None and (slot, function) not in bus.used:
                self._address(companion, 0, slot, function)
                if function == 0:
                    companion.find("address").set("multifunction", "on")

    def _existing_bridge(self, parent: int) -> int | None:
        """A bridge below `parent` (directly or through its root port) that still has a free slot."""
        for index, bus in sorted(self.buses.items()):
            if bus.model not in ("pcie-to-pci-bridge", "pci-bridge") or bus.free_slot() is None:
                continue
            up = self._parent_of(index)
            if up == parent or (up is not None and self._parent_of(up) == parent):
                return index
        return None

    def _place_group(self, group: list[Placement], parent: int) -> None:
        bridge: int | None = self._existing_bridge(parent)
        # how many devices from each position on still need an address (only each one's own turn gives it one)
        remaining_from = [0] * (len(group) + 1)
        for i in range(len(group) - 1, -1, -1):
            unplaced = group[i].element.find("address[@type='pci']") is None
            remaining_from[i] = remaining_from[i + 1] + unplaced
        for position, p in enumerate(group):
            if self.root_kind == "pcie" and p.slot_type in ("pcie", "integrated"):
                free = next(self.empty_root_ports(parent), None)
                port = free if free is not None else self._root_port(parent)
                self._address(p.element, port, 0)
                continue
            if self.root_kind == "pcie":
                if bridge is None or self.buses[bridge].free_slot() is None:
                    bridge = self._bridge("pcie", parent)
                self._address(p.element, bridge, self.buses[bridge].next_slot())
                continue
            current = bridge if bridge is not None else parent
            free = self.buses[current].free_slots()
            remaining = remaining_from[position]
            if not free:
                raise TopologyError(f"PCI bus {current} is full")
            if len(free) == 1 and (remaining > 1 or self.hotplug_ports):
                # the last slot takes a bridge with 31 more (also to keep spare hot-plug slots)
                bridge = current = self._bridge("pci", current)
            self._address(p.element, current, self.buses[current].next_slot())

    def _expanders(self, nodes: list[int], by_node: dict[int | None, list[Placement]]) -> dict[int, int]:
        found: dict[int, int] = {}
        model = "pcie-expander-bus" if self.root_kind == "pcie" else "pci-expander-bus"
        for index, bus in self.buses.items():
            if bus.model == model:
                el = self.graph.nodes[("bus", index)]["element"]
                node = el.findtext("target/node")
                if node is not None and node.isdigit():
                    found.setdefault(int(node), index)
        for node in nodes:
            if node in found:
                continue
            slot = self.buses[0].free_slot()
            if slot is None:
                raise TopologyError(f"no slot on bus 0 for the expander bus of NUMA node {node}")
            found[node] = self._controller(model, 0, slot, target={"busNr": "0"}, node=node)
        del by_node
        return found

    def _spare_ports(self, expanders: dict[int, int]) -> None:
        """`hotplug_ports` empty root ports under each expander (so each NUMA cell can take a hot-plugged
        device), or on pcie-root when there are no expanders."""
        if self.root_kind == "pci":
            self._spare_legacy_slots()
        if self.root_kind != "pcie":
            return
        for parent in sorted(set(expanders.values())) or [0]:
            spare = len(list(self.empty_root_ports(parent)))
            for _ in range(max(0, self.hotplug_ports - spare)):
                self._root_port(parent)

    def _spare_legacy_slots(self) -> None:
        """pc: at least `hotplug_ports` free hot-pluggable PCI slots, adding a pci-bridge (31 slots) if needed."""
        while len(self.hotplug_slots()) < self.hotplug_ports:
            host = next((s.bus for s in self.hotplug_slots()), None)
            if host is None:
                raise TopologyError("no PCI slot left for a pci-bridge to hold spare hot-plug slots")
            self._bridge("pci", host)

    def _buses_below(self, index: int) -> int:
        return sum(1 for n in self.graph.descendants(("bus", index)) if n[0] == "bus")

    def _bus_numbers(self, expanders: dict[int, int]) -> None:
        """Give each expander a busNr range sized for the buses under it, counting down from the highest bus
        number (pci.toml [limits.bus-numbers], as libvirt's qemuDomainAddressFindNewBusNr)."""
        upper = bus_numbers()
        for node in sorted(expanders):
            index = expanders[node]
            target = self.graph.nodes[("bus", index)]["element"].find("target")
            current = target.get("busNr")
            if current not in (None, "0"):
                upper = min(upper, int(current))
                continue
            need = 1 + self._buses_below(index) + (1 if self.root_kind == "pci" else 0) + EXPANDER_HEADROOM
            bus_nr = upper - need
            target.set("busNr", str(bus_nr))
            upper = bus_nr
        below_expanders: set[tuple[str, int]] = set()  # one walk per expander, not one path search per bus
        for e in expanders.values():
            below_expanders |= self.graph.descendants(("bus", e))
        root_buses = 1 + sum(1 for i in self.buses if i not in expanders.values() and ("bus", i) not in below_expanders)
        if expanders and root_buses >= upper:
            raise TopologyError(f"the root complex needs {root_buses} bus numbers but the expanders start at {upper}")


class TopologyError(RuntimeError):
    """The capacity constraints should have made this impossible; raised if they did not."""
