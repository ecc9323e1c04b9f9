"""Conformance on the other architectures (issue 14): aarch64, ppc64le, ppc64, s390x and riscv64 under TCG.

The x86 suite (test_conformance.py) proves solved domains run on q35/pc; this one does the same on every other
architecture QEMU here emulates (Debian qemu-system-arm, -ppc, -misc, installed by scripts/setup.sh test):
for guest OSes osinfo-db lists on the architecture x a few device sets, the engine (the public API,
``Engine(host=<bundle>)`` on the shipped TCG bundles in tests/data/hosts/tcg-*) completes a partial domain
that names only the architecture, and then

* the output validates against libvirt's domain.rng,
* the session's libvirtd defines it and QEMU starts it, and it is still running (not paused, not crashed)
  a moment later,
* libvirt gave it the machine the engine decided (virt, pseries, s390-ccw-virtio),
* every virtio device is in a mode the guest can drive (the x86 suite's oracle, which knows CCW and
  virtio-mmio too).

osinfo-db (Debian 0.20221130) lists no riscv64 OS at all, so riscv64 runs with ``generic`` (an OS with no
known drivers): there the check is that the engine gave it no virtio device.  A guest needs nothing to boot
but firmware (UEFI shell, SLOF prompt, OpenSBI), except on s390x: with nothing bootable the s390-ccw BIOS
loads a disabled-wait PSW, QEMU reports a guest panic and libvirt stops the domain.  So the s390x request
boots a 16-byte kernel that spins (a PSW pointing at ``j .``), as part of what the app asked for.

Infeasible requests (a USB tablet on s390x, IDE on aarch64 virt, BIOS or secure boot on aarch64, ...) must be
minimal conflicts that name the architecture fact: a structural row limited to that architecture or machine
(in the conflict's background, where the engine puts libvirt/QEMU facts) or the bundle's domcaps file.  The
peer samples (tests/data/hosts/peer-samples, real KVM hosts of every architecture) go through the engine
too, without QEMU: schema-valid output for a typical VM and the expected conflicts.

Cost: the starts run 4 at a time on the session's one libvirtd (TCG guests spend most of a cycle waiting on
libvirt: define, swtpm/NVRAM set-up, QEMU's exit on destroy), each destroyed as soon as it has been looked at.
When the engine's output is refused by libvirt or QEMU, or the guest cannot drive what it got, that case is
marked xfail(strict=True) with libvirt's/QEMU's own words: an engine defect, not worked around here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from guest_driver_oracle import VirtioDevice, guest_can_drive, virtio_devices_needing_drivers
from libvirt_harness import LibvirtError, LibvirtHarness
from lxml import etree
from support import Outcome, assert_minimal
from written_examples import ELEMENTS
from written_examples import OS as WRITTEN_OS

from virtpolicy import Engine, InputError
from virtpolicy.errors import HostError, VirtpolicyError
from virtpolicy.inputs.host import load_host_bundle
from virtpolicy.results import Result

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parents[1]
HOSTS = Path(__file__).resolve().parent / "data" / "hosts"
PEERS = HOSTS / "peer-samples"
STRUCTURAL = REPO / "virtpolicy" / "knowledge" / "data" / "structural.toml"
SUPPLEMENT = REPO / "virtpolicy" / "knowledge" / "data" / "osinfo-supplement.toml"
VIRTIO_GPU = "http://pcisig.com/pci/1af4/1050"
START_WORKERS = 4  # measured on 2 cores: 1 worker 170 s, 3 workers 80 s, 4 workers 61 s for the 42 starts
SETTLE_S = 1.0  # s390x's disabled wait, QEMU aborts and firmware crashes all show within 0.5 s of a start
# An s390x kernel image of 16 bytes: a PSW (31-bit mode, address 8) and, at 8, `j .` (brc 15,0) for ever.
S390X_SPIN = bytes.fromhex("0008000080000008a7f4000000000000")


@dataclass(frozen=True)
class Arch:
    name: str
    bundle: str  # tests/data/hosts/<bundle>
    family: str  # the machine family the engine must pick; the live <type machine> starts with it
    oses: tuple[str, ...]  # osinfo short ids listing this architecture (test_the_oses_list_their_architecture)
    usb: bool  # the machine has USB (s390-ccw-virtio has none)


ARCHES = {
    # generic on aarch64: a guest without virtio-gpu, whose display is the firmware's ramfb
    "aarch64": Arch(
        "aarch64", "tcg-aarch64", "virt", ("fedora37", "rhel9.0", "ubuntu22.04", "debian11", "generic"), True
    ),
    "ppc64le": Arch("ppc64le", "tcg-ppc64le", "pseries", ("rhel9.0", "ubuntu22.04", "sle15sp4"), True),
    "ppc64": Arch("ppc64", "tcg-ppc64le", "pseries", ("rhel7.9", "sles12sp5"), True),
    "s390x": Arch("s390x", "tcg-s390x", "s390-ccw-virtio", ("rhel9.0", "ubuntu22.04", "sle15sp4", "rhel6.10"), False),
    "riscv64": Arch("riscv64", "tcg-riscv64", "virt", ("generic",), True),  # osinfo-db lists no riscv64 OS
}
DISK = (
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/a.qcow2'/></disk>"
)
DEVICE_SETS = {
    "minimal": "",
    "basic": DISK + "<interface type='user'/><console type='pty'/>",
    "desktop": "<graphics type='vnc'/><video/><input type='tablet'/><input type='keyboard'/>",
}
USB_CONTROLLER = "<controller type='usb'/>"  # the desktop set's USB controller, where the machine has USB


@dataclass(frozen=True)
class Case:
    arch: Arch
    os: str
    devices: str  # a DEVICE_SETS key

    @property
    def id(self) -> str:
        return f"{self.arch.name}-{self.os}-{self.devices}"

    @property
    def name(self) -> str:
        return "vp-arch-" + re.sub(r"[^a-z0-9]+", "-", self.id.lower())

    def __str__(self) -> str:
        return self.id


# Engine defects, as libvirt/QEMU or the guest-driver oracle report them (the engine side fixes them).
XFAIL: dict[str, str] = {}


def _cases() -> list[object]:
    params: list[object] = []
    for arch in ARCHES.values():
        for os_key in arch.oses:
            for devices in DEVICE_SETS:
                case = Case(arch, os_key, devices)
                reason = XFAIL.get(case.id)
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                params.append(pytest.param(case, id=case.id, marks=marks))
    return params


CASES = _cases()


# ----------------------------------------------------------------- helpers


_ENGINES: dict[str, Engine] = {}


def engine(bundle: Path) -> Engine:
    """One Engine per host bundle, as a service holds it (used from one thread only)."""
    key = str(bundle)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(host=bundle)
    return _ENGINES[key]


def partial_domain(
    name: str,
    arch: str,
    devices: str,
    *,
    machine: str = "",
    os_attrs: str = "",
    os_extra: str = "",
    after_os: str = "",
    kernel: Path | None = None,
) -> str:
    """What an app writes for a guest of another architecture: the architecture and its devices (the guest OS
    goes to the engine as `os=`; no domain type, machine or firmware unless the case is about them)."""
    machine_attr = f" machine='{machine}'" if machine else ""
    boot = f"<kernel>{kernel}</kernel>" if kernel else ""
    return (
        f"<domain><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
        f"<os{os_attrs}><type arch='{arch}'{machine_attr}>hvm</type>{boot}{os_extra}</os>{after_os}"
        f"<devices>{devices}</devices></domain>"
    )


def shipped_drivers(short_id: str) -> set[str]:
    """Drivers the OS ships that osinfo-db does not list: the cited `[[has]]` rows of the osinfo supplement
    (a fact table reviewed on its own, like osinfo-db), read as data, not through the engine."""
    rows = tomllib.loads(SUPPLEMENT.read_text()).get("has", [])
    return {d for r in rows if any(re.match(p, short_id) for p in r["short_ids"]) for d in r["device_ids"]}


def guest_ids(osdb, os_key: str) -> set[str]:  # type: ignore[no-untyped-def]
    if os_key == "generic":
        return set()
    guest = osdb.lookup(os_key)
    return set(guest.device_ids) | shipped_drivers(guest.short_id)


def video_models(bundle: Path, arch: str) -> set[str]:
    """The video models the bundle's domcaps offer for this architecture (read directly, not through the engine)."""
    models: set[str] = set()
    for path in bundle.glob(f"domcaps-{arch}-*.xml"):
        root = etree.parse(str(path)).getroot()
        models |= {v.text or "" for v in root.iterfind("devices/video/enum[@name='modelType']/value")}
    return models - {"none"}


def spin_kernel(workdir: Path) -> Path:
    path = workdir / "s390x-spin.img"
    path.write_bytes(S390X_SPIN)
    return path


@dataclass
class Cycle:
    """What libvirt and QEMU made of one domain: define, start, a look, destroy, undefine."""

    adaptations: tuple[str, ...] = ()
    stage: str = ""  # define | start | running: how far the cycle got
    error: str = ""  # libvirt's or QEMU's refusal, verbatim
    state: str = ""  # virsh domstate --reason, SETTLE_S after the start
    live_xml: str = ""
    seconds: float = 0.0


def start_cycle(libvirt: LibvirtHarness, name: str, xml: str, workdir: Path) -> Cycle:
    """One real start; libvirt's/QEMU's error is recorded, never raised, and the domain never outlives it."""
    began = time.monotonic()
    cycle = Cycle()
    try:
        xml = libvirt.prepare_disk_sources(xml, workdir)
        xml, notes = libvirt.runnable_here(xml)
        cycle.adaptations = tuple(notes)
        cycle.stage = "define"
        libvirt.define(xml)
        try:
            cycle.stage = "start"
            libvirt.start_domain(name)
            cycle.stage = "running"
            time.sleep(SETTLE_S)
            cycle.state = libvirt.virsh("domstate", "--reason", name).strip()
            cycle.live_xml = libvirt.virsh("dumpxml", name)
        finally:
            libvirt.destroy(name)
            libvirt.undefine(name)
    except LibvirtError as exc:
        cycle.error = exc.message
    cycle.seconds = time.monotonic() - began
    return cycle


@dataclass
class Run:
    """One case: the engine's answer and, when it solved, what libvirt and QEMU made of it."""

    case: Case
    result: Result | None  # None when the engine raised instead of answering (`error`)
    error: str = ""
    schema_error: str = ""
    cycle: Cycle | None = None


# ----------------------------------------------------------------- the matrix


@pytest.fixture(scope="module")
def runs(request, libvirt: LibvirtHarness, domain_schema, tmp_path_factory) -> dict[str, Run]:  # type: ignore[no-untyped-def]
    """Every selected case, solved here in order and started START_WORKERS at a time.

    Only the cases this session runs (after -k) are started; each test then judges its own record.
    """
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_solved_domain_runs_on_its_architecture"
    ]
    work = tmp_path_factory.mktemp("arches")
    kernel = spin_kernel(work)
    records: dict[str, Run] = {}
    pending: list[tuple[Run, str]] = []  # (run, the engine's XML) to start
    for case in selected:
        devices = DEVICE_SETS[case.devices] + (USB_CONTROLLER if case.devices == "desktop" and case.arch.usb else "")
        xml = partial_domain(case.name, case.arch.name, devices, kernel=kernel if case.arch.name == "s390x" else None)
        try:
            result = engine(HOSTS / case.arch.bundle).solve(xml, os=case.os, source=case.id)
        except VirtpolicyError as exc:  # only this case fails, with the engine's own message
            records[case.id] = Run(case, None, error=f"{type(exc).__name__}: {exc}")
            continue
        run = Run(case, result)
        records[case.id] = run
        if result.feasible:
            assert result.xml is not None
            if not domain_schema.validate(etree.fromstring(result.xml.encode())):
                run.schema_error = str(domain_schema.error_log)
            else:
                pending.append((run, result.xml))
    began = time.monotonic()
    with ThreadPoolExecutor(START_WORKERS) as pool:
        futures = [
            (run, pool.submit(start_cycle, libvirt, run.case.name, xml, work / run.case.name)) for run, xml in pending
        ]
        for run, future in futures:
            run.cycle = future.result()
    if pending:
        slowest = max(run.cycle.seconds for run, _ in pending if run.cycle)
        print(f"\n{len(pending)} starts in {time.monotonic() - began:.1f} s (slowest cycle {slowest:.1f} s)")
    return records


@pytest.mark.parametrize("case", CASES)
def test_solved_domain_runs_on_its_architecture(case: Case, runs: dict[str, Run], osdb) -> None:  # type: ignore[no-untyped-def]
    run = runs[case.id]
    result = run.result
    assert result is not None, f"{case}: the engine raised {run.error}"
    ids = guest_ids(osdb, case.os)
    # Expected infeasible, judged from the domcaps and osinfo directly: a display on a machine whose only video
    # is virtio-gpu (s390x), for a guest without a virtio-gpu driver.
    only_gpu = video_models(HOSTS / case.arch.bundle, case.arch.name) == {"virtio"}
    if case.devices == "desktop" and only_gpu and VIRTIO_GPU not in ids:
        assert not result.feasible, f"{case}: expected a conflict (the only video is virtio-gpu, {case.os} lacks it)"
        assert_minimal(Outcome(result.build, result.outcome, None))
        return
    assert result.feasible, f"{case}: expected a runnable domain: {result.summary()}"
    assert not run.schema_error, f"{case}: the output fails libvirt's domain.rng: {run.schema_error}"
    cycle = run.cycle
    assert cycle is not None
    assert not cycle.error, f"{case}: libvirt/QEMU refused it at {cycle.stage}: {cycle.error}"
    assert not cycle.adaptations, f"{case}: TCG output needed machine adaptations: {cycle.adaptations}"
    assert cycle.state.startswith("running"), f"{case}: {cycle.state!r} {SETTLE_S} s after start, not running"
    live = etree.fromstring(cycle.live_xml.encode())
    machine = live.find("os/type").get("machine", "")
    assert re.fullmatch(rf"{re.escape(case.arch.family)}(-[0-9.]+)?", machine), f"{case}: machine {machine}"
    devices = virtio_devices_needing_drivers(cycle.live_xml)
    undrivable = [(d.xpath, d.kind, d.mode) for d in devices if not guest_can_drive(d, ids)]
    assert not undrivable, f"{case}: {case.os} cannot drive {undrivable}"  # generic: no virtio device at all
    if not case.arch.usb:
        usb = live.xpath("devices/controller[@type='usb'][@model!='none'] | devices/*[@bus='usb']")
        assert not usb, f"{case}: USB on a machine without USB: {[etree.tostring(e) for e in usb]}"
    if case.arch.name == "aarch64":
        assert "AAVMF" in (live.findtext("os/loader") or ""), f"{case}: aarch64 virt boots UEFI (AAVMF)"
        if case.devices == "desktop" and VIRTIO_GPU not in ids:  # the firmware's framebuffer, not VGA
            assert live.xpath("devices/video/model/@type") == ["ramfb"], f"{case}: {live.xpath('devices/video')}"


def test_the_oses_list_their_architecture(osdb) -> None:  # type: ignore[no-untyped-def]
    """Each OS of the matrix declares its architecture in osinfo-db (a <media>, <tree> or <image> of its own
    file has arch=...); and osinfo-db lists no riscv64 OS at all, which is why riscv64 runs `generic`."""
    for arch in ARCHES.values():
        for os_key in arch.oses:
            if os_key == "generic":
                continue
            text = Path(osdb.lookup(os_key).source).read_text()
            assert re.search(rf'<(media|tree|image)\b[^>]*\barch="{arch.name}"', text), f"{os_key} lacks {arch.name}"
    riscv = [p for p in (osdb.path / "os").rglob("*.xml") if 'arch="riscv64"' in p.read_text()]
    assert not riscv, f"osinfo-db now lists riscv64 OSes ({riscv[:3]}): test them instead of generic"


def test_matrix_covers_every_architecture_and_device_set() -> None:
    ids = {p.values[0].id for p in CASES}  # type: ignore[attr-defined]
    assert {c.split("-")[0] for c in ids} == set(ARCHES)
    assert len(ids) == sum(len(a.oses) for a in ARCHES.values()) * len(DEVICE_SETS)
    assert set(XFAIL) <= ids, set(XFAIL) - ids


# ----------------------------------------------------------------- infeasible requests


@dataclass(frozen=True)
class Infeasible:
    arch: str
    what: str
    facts: tuple[str, ...]  # structural rule ids, or "domcaps" (a member from the bundle's domcaps of this arch)
    devices: str = ""
    machine: str = ""
    os_attrs: str = ""
    os_extra: str = ""
    after_os: str = ""

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.what}"


def _disk(dev: str, bus: str, model: str = "") -> str:
    model_attr = f" model='{model}'" if model else ""
    return (
        f"<disk type='file' device='disk'{model_attr}><driver name='qemu' type='qcow2'/>"
        f"<source file='/var/lib/libvirt/images/x.qcow2'/><target dev='{dev}' bus='{bus}'/></disk>"
    )


SECURE_BOOT = "<firmware><feature enabled='yes' name='secure-boot'/></firmware>"
INFEASIBLE = [
    Infeasible("s390x", "usb-tablet", ("s390-ccw-has-no-usb",), devices="<input type='tablet' bus='usb'/>"),
    Infeasible(
        "s390x", "usb-controller", ("s390-ccw-has-no-usb",), devices="<controller type='usb' model='qemu-xhci'/>"
    ),
    Infeasible(
        "s390x",
        "e1000-nic",
        ("s390-ccw-nics-are-virtio",),
        devices="<interface type='user'><model type='e1000'/></interface>",
    ),
    Infeasible("s390x", "sata-disk", ("domcaps",), devices=_disk("sda", "sata")),
    Infeasible(
        "s390x", "transitional-disk", ("virtio-models-need-pci",), devices=_disk("vda", "virtio", "virtio-transitional")
    ),
    Infeasible("aarch64", "ide-disk", ("domcaps",), devices=_disk("hda", "ide"), machine="virt"),
    Infeasible("aarch64", "bios", ("virt-machine-boots-uefi", "domcaps"), os_attrs=" firmware='bios'"),
    Infeasible(
        "aarch64", "secure-boot", ("secure-boot-needs-q35", "domcaps"), os_attrs=" firmware='efi'", os_extra=SECURE_BOOT
    ),
    Infeasible(
        "aarch64", "qxl-video", ("domcaps",), devices="<graphics type='vnc'/><video><model type='qxl'/></video>"
    ),
    Infeasible("ppc64le", "ide-disk", ("domcaps",), devices=_disk("hda", "ide")),
    Infeasible("ppc64le", "uefi", ("domcaps",), os_attrs=" firmware='efi'"),
    Infeasible("riscv64", "host-model-cpu", ("riscv64-has-no-cpu-driver",), after_os="<cpu mode='host-model'/>"),
    Infeasible("riscv64", "uefi", ("domcaps",), os_attrs=" firmware='efi'"),
    # what only an app writes, on a machine that lacks it (structural.toml `written` rows)
    Infeasible("aarch64", "sclp-console", ("sclp-console-needs-s390",), devices=ELEMENTS["sclp-console-needs-s390"][0]),
    Infeasible(
        "s390x", "spapr-vty", ("spapr-vio-serial-needs-pseries",), devices=ELEMENTS["spapr-vio-serial-needs-pseries"][0]
    ),
    Infeasible("ppc64le", "parallel-port", ("parallel-needs-isa",), devices=ELEMENTS["parallel-needs-isa"][0]),
    Infeasible(
        "riscv64", "pl011-serial", ("pl011-serial-needs-arm-virt",), devices=ELEMENTS["pl011-serial-needs-arm-virt"][0]
    ),
    Infeasible("s390x", "ibmvscsi", ("ibmvscsi-needs-pseries",), devices=ELEMENTS["ibmvscsi-needs-pseries"][0]),
    Infeasible("aarch64", "ibmvscsi", ("ibmvscsi-needs-pseries",), devices=ELEMENTS["ibmvscsi-needs-pseries"][0]),
]


def named_facts(result: Result, bundle: str, arch: str) -> set[str]:
    """The architecture facts a conflict report names: structural rules (its background) and 'domcaps' for a
    member taken from this bundle's domcaps of this architecture."""
    named = {r.where for r in result.background if r.kind == "structural"}
    for conflict in result.conflicts:
        named |= {m.where for m in conflict.members if m.kind == "structural"}
        if any(m.kind == "host" and m.where.startswith(f"{bundle}/domcaps-{arch}-") for m in conflict.members):
            named.add("domcaps")
    return named


def assert_architecture_rules(rule_ids: set[str], arch: str, family: str) -> None:
    """A structural rule counts as an architecture fact when its row is limited to the architecture or names a
    machine family (libvirt decides these per machine); a rule about every machine would not be one."""
    rows = {row["id"]: row for row in tomllib.loads(STRUCTURAL.read_text())["rule"]}
    for rule in rule_ids:
        assert rule in rows, f"{rule} is not a row of {STRUCTURAL.name}"
        row = rows[rule]
        scoped = (
            arch in row.get("arches", ()) or "machine" in row.get("when", {}) or "machine" in row.get("require", {})
        )
        assert scoped, f"{rule} is limited neither to {arch} nor to a machine family ({family}): {row}"


def try_start(libvirt: LibvirtHarness, name: str, xml: str, workdir: Path) -> str:
    """libvirt's/QEMU's verdict on output that should not exist: its error, or that it ran."""
    cycle = start_cycle(libvirt, name, xml, workdir)
    return cycle.error or f"it ran ({cycle.state})"


@pytest.mark.parametrize("case", INFEASIBLE, ids=lambda c: c.id)
def test_infeasible_request_is_a_minimal_conflict_naming_the_architecture_fact(
    case: Infeasible, libvirt: LibvirtHarness, tmp_path: Path
) -> None:
    arch = ARCHES[case.arch]
    name = f"vp-arch-x-{case.id}"
    xml = partial_domain(
        name,
        case.arch,
        case.devices,
        machine=case.machine,
        os_attrs=case.os_attrs,
        os_extra=case.os_extra,
        after_os=case.after_os,
        kernel=spin_kernel(tmp_path) if case.arch == "s390x" else None,
    )
    result = engine(HOSTS / arch.bundle).solve(xml, os=arch.oses[0], source=case.id)
    if result.feasible:
        assert result.xml is not None
        verdict = try_start(libvirt, name, result.xml, tmp_path)
        pytest.fail(f"{case.id}: the engine solved an infeasible request; libvirt/QEMU: {verdict}")
    assert_minimal(Outcome(result.build, result.outcome, None))
    named = named_facts(result, arch.bundle, case.arch)
    assert named & set(case.facts), f"{case.id}: the conflict names {sorted(named)}, not one of {case.facts}"
    assert_architecture_rules(named & set(case.facts) - {"domcaps"}, case.arch, arch.family)


# ----------------------------------------------------------------- what only an app writes (`written` rows)

# Each structural.toml `written` row (tests/written_examples.py has its element) is a claim about libvirt and
# QEMU: the element is refused on a machine the row excludes, and runs on one it allows. Both are tried here:
# the excluded one by adding the element to the engine's own output for that architecture (the engine
# refuses to write it), the allowed one as the engine solves it. A row that claimed too much would make the
# engine refuse domains that run; one that claimed too little lets through output that does not.
PROOF_ARCHES = [a for a in ARCHES.values() if a.name != "ppc64"]  # ppc64 shares ppc64le's bundle and rows


def _proof_arch(arches: tuple[str, ...]) -> str | None:
    """The architecture to try an example on: one this suite runs (x86_64 is test_conformance.py's)."""
    return next((a for a in arches if a in {x.name for x in PROOF_ARCHES}), None)


def _with_element(xml: str, element: str) -> str:
    root = etree.fromstring(xml.encode())
    root.find("devices").append(etree.fromstring(element))
    return etree.tostring(root, encoding="unicode")


@pytest.fixture(scope="module")
def written_proofs(libvirt: LibvirtHarness, tmp_path_factory) -> dict[tuple[str, str], Cycle | str]:  # type: ignore[no-untyped-def]
    """(rule id, 'refused' | 'allowed') -> libvirt's/QEMU's cycle, or the engine's reason it wrote nothing."""
    work = tmp_path_factory.mktemp("written")
    kernel = spin_kernel(work)
    pending: list[tuple[tuple[str, str], str, str]] = []
    verdicts: dict[tuple[str, str], Cycle | str] = {}
    for rule_id, (element, refused, allowed) in sorted(ELEMENTS.items()):
        for kind, arches in (("refused", refused), ("allowed", allowed)):
            arch_name = _proof_arch(arches)
            if arch_name is None:
                continue
            arch = ARCHES[arch_name]
            name = f"vp-w-{kind[0]}-{rule_id}"[:60]
            boot = kernel if arch_name == "s390x" else None
            devices = element if kind == "allowed" else ""
            xml = partial_domain(name, arch_name, devices, kernel=boot)
            result = engine(HOSTS / arch.bundle).solve(xml, os=WRITTEN_OS[arch_name], complete=False, source=name)
            if not result.feasible:
                verdicts[(rule_id, kind)] = f"the engine solved no domain: {result.summary()}"
                continue
            assert result.xml is not None
            pending.append(
                ((rule_id, kind), name, result.xml if kind == "allowed" else _with_element(result.xml, element))
            )
    with ThreadPoolExecutor(START_WORKERS) as pool:
        futures = [(key, pool.submit(start_cycle, libvirt, name, xml, work / name)) for key, name, xml in pending]
        for key, future in futures:
            verdicts[key] = future.result()
    return verdicts


@pytest.mark.parametrize("rule_id", sorted(ELEMENTS))
def test_a_written_row_is_what_libvirt_and_qemu_do(rule_id: str, written_proofs) -> None:  # type: ignore[no-untyped-def]
    element, refused, allowed = ELEMENTS[rule_id]
    tried = 0
    for kind, arches in (("refused", refused), ("allowed", allowed)):
        if _proof_arch(arches) is None:
            continue
        tried += 1
        verdict, where = written_proofs[(rule_id, kind)], _proof_arch(arches)
        assert isinstance(verdict, Cycle), f"{rule_id} ({kind}): {verdict}"
        if kind == "refused":
            assert verdict.error, (
                f"{rule_id}: {element} ran on {_proof_arch(arches)} ({verdict.state}): the row is wrong"
            )
        else:
            assert not verdict.error, f"{rule_id}: {element} on {where}: {verdict.stage}: {verdict.error}"
            assert verdict.state.startswith("running"), f"{rule_id} ({kind}): {verdict.state!r}"
    assert tried, f"{rule_id}: no example on an architecture this suite starts"


# ----------------------------------------------------------------- host capture --arch, the shipped bundles


def _capture(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "host", "capture", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )


SHIPPED = {
    "tcg-aarch64": ("aarch64",),
    "tcg-ppc64le": ("ppc64le", "ppc64"),
    "tcg-s390x": ("s390x",),
    "tcg-riscv64": ("riscv64",),
}


def _guests(caps: Path) -> list[bytes]:
    root = etree.parse(str(caps), etree.XMLParser(remove_blank_text=True)).getroot()
    return [etree.tostring(g, method="c14n") for g in root.iterfind("guest")]


@pytest.mark.parametrize("bundle", sorted(SHIPPED))
def test_shipped_bundle_is_what_host_capture_arch_writes_here(bundle: str, libvirt: LibvirtHarness, tmp_path: Path):
    """`host capture --arch A --virttype qemu` against this machine's libvirt writes the shipped bundle again:
    the same domcaps files, byte for byte, and the same <guest> capabilities (the <host> part is this machine's).
    A difference means the bundle is stale (libvirt or QEMU changed): capture it again (its README says how)."""
    arch_args = [a for arch in SHIPPED[bundle] for a in ("--arch", arch)]
    done = _capture("--connect", libvirt.uri, *arch_args, "--virttype", "qemu", str(tmp_path / bundle))
    assert done.returncode == 0, done.stderr
    fresh, shipped = tmp_path / bundle, HOSTS / bundle
    domcaps = sorted(p.name for p in shipped.glob("domcaps-*.xml"))
    assert sorted(p.name for p in fresh.glob("domcaps-*.xml")) == domcaps
    assert len(domcaps) == len(SHIPPED[bundle])  # only the machines the engine decides about
    for name in domcaps:
        assert (fresh / name).read_text() == (shipped / name).read_text(), f"{bundle}/{name} is stale"
    assert _guests(fresh / "capabilities.xml") == _guests(shipped / "capabilities.xml")
    host = load_host_bundle(shipped)
    assert sorted(host.machines) == sorted((arch, "qemu") for arch in SHIPPED[bundle])


def test_capture_arch_writes_only_that_architecture(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    done = _capture("--connect", libvirt.uri, "--arch", "s390x", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == ["capabilities.xml", "domcaps-s390x-s390-ccw-virtio-qemu.xml", "host.toml", "nodedev-pci.xml"]
    assert done.stdout.split() == [str(tmp_path / "b" / f) for f in (files[0], files[3], files[1], files[2])]
    host = load_host_bundle(tmp_path / "b")
    assert list(host.machines) == [("s390x", "qemu")] and host.families("s390x", "qemu") == ["s390-ccw-virtio"]
    assert host.arch == "x86_64"  # the <host> part is libvirt's own, whole


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--arch", "mips64el"], "--arch mips64el: virtpolicy knows no machine family for this architecture"),
        (
            ["--arch", "aarch64", "--virttype", "kvm"],
            "--virttype kvm: the libvirt at URI offers no kvm domains for aarch64",
        ),
        (["--arch", "aarch64", "--arch", "sparc64"], "--arch sparc64: virtpolicy knows no machine family"),
    ],
)
def test_capture_of_what_libvirt_cannot_give_is_one_line(
    args: list[str], named: str, libvirt: LibvirtHarness, tmp_path: Path
) -> None:
    done = _capture("--connect", libvirt.uri, *args, str(tmp_path / "b"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtpolicy: error: "), lines
    assert named.replace("URI", libvirt.uri) in lines[0], lines[0]
    assert not (tmp_path / "b").exists(), "bad input must not leave a half bundle"


def test_capture_of_an_arch_without_emulator_is_one_line(tmp_path: Path) -> None:
    """libvirt's test driver has only i686 guests: an s390x capture names the option and the missing emulator."""
    done = _capture("--connect", "test:///default", "--arch", "s390x", str(tmp_path / "b"))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "virtpolicy: error: --arch s390x: the libvirt at test:///default has no emulator for s390x "
        "(virsh capabilities lists no hvm guest for it)"
    )
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------- the peer samples: real KVM hosts, no QEMU


@dataclass(frozen=True)
class Peer:
    name: str  # tests/data/hosts/peer-samples/<name>.xml and <name>-domcaps.xml
    arch: str
    os: str
    family: str
    infeasible: tuple[str, ...]  # Infeasible.what of INFEASIBLE rows (of any arch) that must conflict here too


PEER_HOSTS = [
    Peer("kvm-aarch64", "aarch64", "fedora37", "virt", ("ide-disk", "bios", "secure-boot", "sclp-console", "ibmvscsi")),
    Peer("kvm-ppc64le", "ppc64le", "rhel9.0", "pseries", ("ide-disk", "uefi", "parallel-port")),
    Peer(
        "kvm-s390x",
        "s390x",
        "rhel9.0",
        "s390-ccw-virtio",
        ("usb-tablet", "usb-controller", "e1000-nic", "spapr-vty", "ibmvscsi"),
    ),
    Peer("qemu-riscv64", "riscv64", "generic", "virt", ("host-model-cpu", "pl011-serial")),
    Peer("kvm-armv7l", "armv7l", "debian11", "virt", ("bios",)),
]
TYPICAL = (
    "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
    "<source file='/var/lib/libvirt/images/typical.qcow2'/></disk>"
    "<interface type='network'><source network='default'/></interface><console type='pty'/><graphics type='vnc'/>"
)


def peer_bundle(peer: str, into: Path) -> Path:
    """A bundle directory from a peer sample's capabilities + domcaps pair, the domcaps named as a capture would."""
    domcaps = PEERS / f"{peer}-domcaps.xml"
    root = etree.parse(str(domcaps)).getroot()
    arch, virt_type, machine = (root.findtext(k, "").strip() for k in ("arch", "domain", "machine"))
    family = re.sub(r"-[0-9.]+$", "", machine)
    bundle = into / peer
    bundle.mkdir(parents=True)
    shutil.copy(PEERS / f"{peer}.xml", bundle / "capabilities.xml")
    shutil.copy(domcaps, bundle / f"domcaps-{arch}-{family}-{virt_type}.xml")
    return bundle


@pytest.fixture(scope="module")
def peer_bundles(tmp_path_factory) -> Iterator[dict[str, Path]]:  # type: ignore[no-untyped-def]
    into = tmp_path_factory.mktemp("peers")
    yield {p: peer_bundle(p, into) for p in [peer.name for peer in PEER_HOSTS] + ["kvm-loongarch64"]}


@pytest.mark.parametrize("peer", PEER_HOSTS, ids=lambda p: p.name)
def test_peer_host_typical_vm_is_schema_valid_and_follows_the_architecture(
    peer: Peer,
    peer_bundles: dict[str, Path],
    domain_schema,
    osdb,  # type: ignore[no-untyped-def]
) -> None:
    bundle = peer_bundles[peer.name]
    xml = partial_domain("typical", peer.arch, TYPICAL)
    result = engine(bundle).solve(xml, os=peer.os, source=peer.name)
    assert result.feasible, f"{peer.name}: {result.summary()}"
    assert result.xml is not None
    root = etree.fromstring(result.xml.encode())
    assert domain_schema.validate(root), str(domain_schema.error_log)
    machine = root.find("os/type").get("machine", "")
    assert re.fullmatch(rf"{re.escape(peer.family)}(-[0-9.]+)?", machine), machine
    (offered,) = {d.virt_type for d in load_host_bundle(bundle).domcaps}
    assert root.get("type") == offered, "the guest runs on the virt type the host's domcaps describe"
    if peer.arch in ("aarch64", "armv7l"):
        assert root.find("os").get("firmware") == "efi" or root.find("os/loader") is not None, "virt boots UEFI"
    if peer.arch == "s390x":
        assert not root.xpath("devices/controller[@type='usb'][@model!='none'] | devices/*[@bus='usb']")
    if peer.arch == "riscv64":
        assert root.find("cpu") is None or root.find("cpu").get("mode") is None, "libvirt 9.0: no riscv64 CPU driver"
    devices = virtio_devices_needing_drivers_or_empty(result.xml)
    ids = guest_ids(osdb, peer.os)
    assert all(guest_can_drive(d, ids) for d in devices), [d for d in devices if not guest_can_drive(d, ids)]


def virtio_devices_needing_drivers_or_empty(xml: str) -> list[VirtioDevice]:
    """The oracle on the engine's own output (no libvirt here to lay it out).  On s390-ccw-virtio the engine
    leaves addresses to libvirt, which gives every virtio device a CCW address (qemu_domain_address.c
    qemuDomainAssignS390Addresses), so those count as CCW; on the PCI machines the engine lays out every address."""
    root = etree.fromstring(xml.encode())
    if root.find("os/type").get("machine", "").startswith("s390-ccw"):
        for el in root.iterfind("devices/*"):
            if el.find("address") is None:
                etree.SubElement(el, "address", type="ccw", cssid="0xfe", ssid="0x0", devno="0x0000")
    try:
        return virtio_devices_needing_drivers(etree.tostring(root, encoding="unicode"))
    except ValueError as exc:
        pytest.fail(f"the engine left a plain virtio device without a PCI address on a PCI machine: {exc}")


INFEASIBLE_BY_WHAT = {(c.arch, c.what): c for c in INFEASIBLE}


@pytest.mark.parametrize(
    ("peer", "what"), [(p, w) for p in PEER_HOSTS for w in p.infeasible], ids=lambda v: getattr(v, "name", v)
)
def test_peer_host_conflicts_name_the_architecture_fact(peer: Peer, what: str, peer_bundles: dict[str, Path]) -> None:
    case = INFEASIBLE_BY_WHAT.get((peer.arch, what)) or next(c for c in INFEASIBLE if c.what == what)
    bundle = peer_bundles[peer.name]
    xml = partial_domain(
        "infeasible",
        peer.arch,
        case.devices,
        machine=case.machine,
        os_attrs=case.os_attrs,
        os_extra=case.os_extra,
        after_os=case.after_os,
    )
    result = engine(bundle).solve(xml, os=peer.os, source=f"{peer.name}-{what}")
    assert not result.feasible, f"{peer.name}: {what} solved: {result.xml}"
    assert_minimal(Outcome(result.build, result.outcome, None))
    named = named_facts(result, bundle.name, peer.arch)
    assert named & set(case.facts), f"{peer.name} {what}: the conflict names {sorted(named)}, not one of {case.facts}"
    assert_architecture_rules(named & set(case.facts) - {"domcaps"}, peer.arch, peer.family)


def test_loongarch64_is_refused_as_libvirt_9_refuses_it(peer_bundles: dict[str, Path]) -> None:
    """libvirt 9.0's domain.rng has no loongarch64 (it came with libvirt 9.1's schema): a loongarch64 domain
    is bad input, one line naming /domain/os, whatever the host offers."""
    xml = partial_domain("typical", "loongarch64", TYPICAL)
    with pytest.raises(InputError, match=r"/domain/os: libvirt's domain schema rejects this"):
        engine(peer_bundles["kvm-loongarch64"]).solve(xml, os="generic", source="kvm-loongarch64")


def test_loongarch64_host_with_the_arch_left_open_is_bad_input(peer_bundles: dict[str, Path]) -> None:
    xml = (
        "<domain><name>typical</name><memory unit='MiB'>512</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
        f"<devices>{TYPICAL}</devices></domain>"
    )
    with pytest.raises(
        HostError, match=r"the host's architecture 'loongarch64' is not one libvirt's domain schema knows"
    ):
        engine(peer_bundles["kvm-loongarch64"]).solve(xml, os="generic", source="kvm-loongarch64")
