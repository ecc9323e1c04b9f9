"""pci.toml's rows and derived capacities against the libvirt source and schema they cite (libvirt 9.0.0).

Only the corpus's src/conf/*.c and src/qemu/*.c are extracted (no headers): a fact libvirt states in a header
(VIR_PCI_ADDRESS_SLOT_LAST in domain_addr.h) is checked where a .c file or the installed schema states it too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from corpus import require_corpus

from virtpolicy.knowledge.machines import families
from virtpolicy.knowledge.pci import (
    bridge_cost,
    bus_numbers,
    bus_rules,
    controller_families,
    fixed_layout,
    pci_address_limits,
    pci_roots,
    root_port_capacity,
    root_port_functions,
    table,
    takes_slots,
    takes_values,
    usb2_layouts,
)

SCHEMAS = Path("/usr/share/libvirt/schemas")  # libvirt-daemon 9.0.0's, the same as its src/conf/schemas


def _source(path: str) -> str:
    return (require_corpus() / "src" / path).read_text()


def _lines(path: str, first: int, last: int) -> str:
    """Lines first..last (1-based, inclusive) of a corpus source file: what a citation points at."""
    return "\n".join(_source(path).splitlines()[first - 1 : last])


def _function(path: str, name: str) -> tuple[int, int, str]:
    """A C function's first and last line and its text (from `name(` at the start of a line to its `}`)."""
    text = _source(path)
    start = text.index(f"\n{name}(") + 1
    end = text.index("\n}\n", start) + 2
    return text.count("\n", 0, start) + 1, text.count("\n", 0, end) + 1, text[start:end]


def _ranges(cite: str, prefix: str = "") -> list[tuple[int, int]]:
    """The ':first-last' (or ':line') line ranges a citation names after `prefix` (three digits at least: an
    address such as 00:1F.0 is no line)."""
    found = re.findall(r":(\d{3,})(?:-(\d+))?", cite[cite.index(prefix) :] if prefix else cite)
    return [(int(a), int(b or a)) for a, b in found]


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
    fixed = fixed_layout("q35")
    assert fixed.video is not None
    taken = {fixed.video[0], *fixed.reserved}
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


# --- [buses]: slot types, model names, <target> ------------------------------------------------------
def test_each_bus_rows_slot_type_follows_its_flags() -> None:
    """A bus taking PCIe endpoints (VIR_PCI_CONNECT_TYPE_PCIE_DEVICE) gives a device a PCIe slot, or an
    integrated one on the root complex itself; one taking PCI devices a conventional slot (on pci-root also
    the chipset's integrated ones); one taking neither takes no endpoint at all."""
    cases = _bus_set_model_cases()
    for model, rule in bus_rules().items():
        flags = set(re.findall(r"VIR_PCI_CONNECT_TYPE_(\w+)", cases[model]))
        root = model.endswith("-root")
        assert rule.endpoints == bool(flags & {"PCI_DEVICE", "PCIE_DEVICE"}), model
        if not rule.endpoints:
            continue
        expected = set()
        if "PCIE_DEVICE" in flags:
            expected.add("integrated" if root else "pcie")
        if "PCI_DEVICE" in flags:
            expected |= {"pci", "integrated"} if root else {"pci"}
        assert set(rule.slot_types) == expected, model


def test_each_model_name_is_the_one_libvirt_gives() -> None:
    """qemuDomainPCIControllerSetDefaultModelName: the QEMU device of each model (QEMU 7.2 has
    pcie-root-port, so the first choice); pci-root and pcie-root get none (pci-root only on pSeries)."""
    first, last, body = _function("qemu/qemu_domain_address.c", "qemuDomainPCIControllerSetDefaultModelName")
    assert (first, last) == (2436, 2485)  # the [buses] comment cites :2446-2484, the switch
    names: dict[str, str] = {}
    pending: list[str] = []
    for chunk in re.split(r"(case VIR_DOMAIN_CONTROLLER_MODEL_\w+:)", body)[1:]:
        if chunk.startswith("case "):
            pending.append(chunk[len("case VIR_DOMAIN_CONTROLLER_MODEL_") : -1].lower().replace("_", "-"))
            continue
        named = re.search(r"\*modelName = VIR_DOMAIN_CONTROLLER_PCI_MODEL_NAME_(\w+);", chunk)
        for model in pending:
            if named and "qemuDomainIsPSeries" not in chunk:
                names[model] = named.group(1).lower().replace("_", "-")
        pending = []
    enum = _source("conf/domain_conf.c")
    enum = enum[enum.index("VIR_ENUM_IMPL(virDomainControllerPCIModelName") :]
    strings = set(re.findall(r'"([^"]+)"', enum[: enum.index(");")]))
    for model, rule in bus_rules().items():
        assert rule.model_name == names.get(model, ""), model
        assert not rule.model_name or rule.model_name in strings, model


def test_each_target_default_is_libvirts() -> None:
    """qemuDomainAssignPCIAddresses fills a new controller's chassisNr, chassis and port from its index and
    address; each row's `target` computes the same for any index and address (busNr, which libvirt finds
    with qemuDomainAddressFindNewBusNr, is the engine's own: no row has it)."""
    first, last = _ranges(table()["target"]["cite"])[0]
    assert (first, last) == (2817, 2833)
    cited = _lines("qemu/qemu_domain_address.c", first, last)
    defaults: dict[str, dict[str, str]] = {}
    model = ""
    for line in cited.splitlines():
        case = re.search(r"case VIR_DOMAIN_CONTROLLER_MODEL_(\w+):", line)
        if case:
            model = case.group(1).lower().replace("_", "-")
        assigned = re.search(r"options->(\w+) = (.+);", line)
        if assigned and "(def)" not in assigned.group(2):
            defaults.setdefault(model, {})[assigned.group(1)] = assigned.group(2)
    assert set(defaults) == {"pci-bridge", "pcie-root-port", "pcie-switch-downstream-port"}
    for model, rule in bus_rules().items():
        assert {a for a, _ in rule.target} == set(defaults.get(model, {})), model
        for index, slot, function in ((1, 2, 0), (7, 3, 5), (30, 0x1E, 7)):
            written = rule.target_attributes(index, slot, function)
            for attr, expr in defaults.get(model, {}).items():
                c = (
                    expr.replace("cont->idx", "index")
                    .replace("addr->slot", "slot")
                    .replace("addr->function", "function")
                )
                assert int(written[attr], 0) == eval(c, {}, {"index": index, "slot": slot, "function": function})  # noqa: S307


def test_each_target_attribute_is_written_as_libvirt_writes_it() -> None:
    first, last = _ranges(table()["target"]["cite"], "domain_conf.c")[0]
    cited = _lines("conf/domain_conf.c", first, last)
    written = dict(re.findall(r" (\w+)='(%d|0x%x)'", cited))
    assert written == {"chassisNr": "%d", "chassis": "%d", "port": "0x%x", "busNr": "%d"}
    formats = table()["target"]["format"]
    assert formats == {attr: "hex" if fmt == "0x%x" else "decimal" for attr, fmt in written.items()}


# --- capacities ----------------------------------------------------------------------------------------
def test_a_conventional_device_costs_a_root_port_and_a_bridge() -> None:
    """virDomainPCIAddressSetGrow adds a pcie-root-port, then a pcie-to-pci-bridge in it: two bus numbers
    per bridge, each bridge holding its slot range of devices."""
    first, last = _ranges(bridge_cost().cite)[0]
    cited = _lines("conf/domain_addr.c", first, last)
    added = re.findall(r"VIR_DOMAIN_CONTROLLER_MODEL_(PCIE_ROOT_PORT|PCIE_TO_PCI_BRIDGE)", cited)
    assert added == ["PCIE_ROOT_PORT", "PCIE_TO_PCI_BRIDGE"]
    assert bridge_cost().buses == len(added) == 2
    bridge = bus_rules()[table()["capacity"]["pci-bridges"]["bridge"]]
    assert bridge_cost().slots == bridge.last_slot - bridge.first_slot + 1 == 31


def test_root_ports_fill_every_function_of_a_slot() -> None:
    """pcie-root-port is an aggregate-slot model (domain_addr.c:253): one port per function of a slot."""
    assert "PCIE_ROOT_PORT | VIR_PCI_CONNECT_AGGREGATE_SLOT" in _lines("conf/domain_addr.c", 253, 253)
    assert root_port_functions() == pci_address_limits()["function"] + 1 == 8


# --- bus 0 ------------------------------------------------------------------------------------------------
def test_the_fixed_bus0_addresses_are_libvirts() -> None:
    q35_first, q35_last, q35 = _function("qemu/qemu_domain_address.c", "qemuDomainValidateDevicePCISlotsQ35")
    pc_first, pc_last, pc = _function("qemu/qemu_domain_address.c", "qemuDomainValidateDevicePCISlotsPIIX3")
    for family, first, last in (("q35", q35_first, q35_last), ("pc", pc_first, pc_last)):
        assert all(first <= a <= b <= last for a, b in _ranges(fixed_layout(family).cite)), family
    video = re.compile(
        r"primaryVideo->info\)\) \{\s+memset\(&tmp_addr, 0, sizeof\(tmp_addr\)\);\s+tmp_addr.slot = (\d+);"
    )
    assert fixed_layout("q35").video == (int(video.search(q35).group(1)), 0) == (1, 0)
    assert fixed_layout("pc").video == (int(video.search(pc).group(1)), 0) == (2, 0)
    piix3 = re.search(r"piix3USBAddr = \{[^}]*\.slot = (\d+), \.function = (\d+)\}", pc)
    assert piix3 and fixed_layout("pc").piix3_usb == (int(piix3.group(1)), int(piix3.group(2))) == (1, 2)
    assert "tmp_addr.slot = 1;" in pc[pc.index("Implicit PIIX3 devices living on slot 1") :]
    assert 1 in fixed_layout("pc").reserved
    uhci = q35[q35.index("MODEL_USB_ICH9_UHCI1") : q35.index("case VIR_DOMAIN_CONTROLLER_TYPE_PCI:")]
    tried = tuple(int(s, 16) for s in re.findall(r"tmp_addr.slot = (0x[0-9A-F]+);", uhci))
    assert fixed_layout("q35").usb2_slots == tried == (0x1D, 0x1A)
    assert "tmp_addr.slot = 0x1F;" in q35 and 0x1F in fixed_layout("q35").reserved
    assert fixed_layout("virt-or-any-family-without-a-row").video is None


def test_the_usb2_companions_sit_at_libvirts_functions() -> None:
    (layout,) = usb2_layouts().values()
    first, last = _ranges(layout.cite)[0]
    cited = _lines("qemu/qemu_domain_address.c", first, last)
    assert "USB2 needs special handling to put all companions in the same slot" in cited
    functions = {
        f"ich9-{m.lower()}": int(n)
        for m, n in re.findall(r"case VIR_DOMAIN_CONTROLLER_MODEL_USB_ICH9_(\w+):\s+addr.function = (\d+);", cited)
    }
    assert functions == {layout.controller: layout.function, **dict(layout.companions)}
    multi = re.search(r"ICH9_(\w+):\s+addr.function = 0;\s+addr.multi = VIR_TRISTATE_SWITCH_ON;", cited)
    assert multi and dict(layout.companions)[f"ich9-{multi.group(1).lower()}"] == 0  # function 0 is multifunction


# --- [takes] ----------------------------------------------------------------------------------------------
def test_what_each_takes_value_means_follows_the_connect_flags() -> None:
    """qemuDomainFillDevicePCIConnectFlagsIterInit: pcieFlags is a PCIe slot on a PCIe root, a PCI one
    otherwise; virtioFlags is pcieFlags (the engine allows a bridge slot after it); pciFlags is always PCI."""
    _, _, init = _function("qemu/qemu_domain_address.c", "qemuDomainFillDevicePCIConnectFlagsIterInit")
    assert re.search(r"HasPCIeRoot\(def\)\) \{\s+data->pcieFlags = \(VIR_PCI_CONNECT_TYPE_PCIE_DEVICE", init)
    assert re.search(r"\} else \{\s+data->pcieFlags = \(VIR_PCI_CONNECT_TYPE_PCI_DEVICE", init)
    assert "data->virtioFlags = data->pcieFlags;" in init
    assert takes_slots("pcie", "pcie") == ("pcie",) and takes_slots("pcie", "pci") == ("pci",)
    assert takes_slots("virtio", "pcie")[0] == "pcie" and takes_slots("virtio", "pci") == ("pci",)
    assert all(takes_slots("pci", root) == ("pci",) for root in pci_roots())
    assert all(takes_slots(t, root) == ("none",) for t in ("bus", "none") for root in pci_roots())
    assert {row["takes"] for row in table()["addressing"]} <= set(takes_values())


def test_only_channel_io_has_no_pci_slots_of_the_engines_making() -> None:
    assert {f.root for f in families()} - pci_roots() == {"ccw"}
    assert "addPCIRoot = virQEMUCapsGet(qemuCaps, QEMU_CAPS_DEVICE_ZPCI);" in _lines("qemu/qemu_domain.c", 4076, 4080)


# --- [limits] ---------------------------------------------------------------------------------------------
def _schema_maximum(define: str) -> int:
    """The maxInclusive of a basictypes.rng define, following its <ref>s."""
    text = (SCHEMAS / "basictypes.rng").read_text()
    body = re.search(rf'<define name="{define}">(.*?)</define>', text, re.S)
    assert body, define
    ref = re.fullmatch(r'\s*<ref name="(\w+)"/>\s*', body.group(1))
    if ref:
        return _schema_maximum(ref.group(1))
    return int(re.findall(r'<param name="maxInclusive">(\d+)</param>', body.group(1))[-1])


@pytest.mark.parametrize(
    "field, define", [("domain", "pciDomain"), ("bus", "pciBus"), ("slot", "pciSlot"), ("function", "pciFunc")]
)
def test_each_pci_address_limit_is_the_schemas(field: str, define: str) -> None:
    if not (SCHEMAS / "basictypes.rng").exists():
        pytest.fail("libvirt's schemas are missing (Debian libvirt0: scripts/setup.sh test)", pytrace=False)
    assert pci_address_limits()[field] == _schema_maximum(define)
    first, last = _ranges(table()["limits"][field]["cite"], "basictypes.rng")[0]
    lines = (SCHEMAS / "basictypes.rng").read_text().splitlines()[first - 1 : last]
    assert f'<define name="{define}">' in lines[0] and "</define>" in lines[-1], field


def test_the_function_limit_is_the_one_libvirt_checks() -> None:
    assert "function must be <= %u" in _lines("conf/domain_addr.c", 468, 471)
    assert "VIR_PCI_ADDRESS_FUNCTION_LAST" in _lines("conf/domain_addr.c", 468, 471)


def test_new_expanders_count_down_from_libvirts_bus_number_count() -> None:
    (line, _), *_ = _ranges(table()["limits"]["bus-numbers"]["cite"])
    assert re.search(rf"int lowestBusNr = {bus_numbers()};", _lines("qemu/qemu_domain_address.c", line, line))
    assert bus_numbers() == pci_address_limits()["bus"] + 1


def test_the_input_checks_use_the_limits() -> None:
    """A host PCI domain above 0xFFFF (a VMD domain) is one libvirt reads; a 33-bit one, or bus 256, is not."""
    from lxml import etree

    from virtpolicy.errors import InputError
    from virtpolicy.inputs.domain import check_values

    hostdev = "<domain><devices><hostdev type='pci'><source><address {}/></source></hostdev></devices></domain>"
    check_values(
        etree.fromstring(hostdev.format("type='pci' domain='0x10000' bus='0x01' slot='0x00' function='0x0'")), "t"
    )
    for bad in ("domain='0x100000000'", "bus='0x100'", "slot='0x20'", "function='0x8'"):
        with pytest.raises(InputError):
            check_values(etree.fromstring(hostdev.format(f"type='pci' {bad}")), "t")
