"""Profiles: the language, selection and priorities, versioning, the draft's example and composition."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from lxml import etree
from support import cli

from virtpolicy.core.solve import Conflict, Solution, Solver
from virtpolicy.errors import ProfileError
from virtpolicy.inputs.domain import Domain
from virtpolicy.outputs.render import render, to_bytes
from virtpolicy.profiles.expr import ExprError, parse
from virtpolicy.profiles.facts import FUNCTION_NAMES
from virtpolicy.profiles.library import available, find_profile, load_profile
from virtpolicy.sources.build import build
from virtpolicy.sources.context import SelectedProfile

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
VP = "http://virtpolicy.org/xmlns/domain/1.0"


def solve_with(xml: bytes, os_key: str, names: list[str], host, osdb, paths=(), priorities=None):  # type: ignore[no-untyped-def]
    domain = Domain.from_bytes(xml, "<test>")
    selected = [SelectedProfile(find_profile(n, list(paths)), (priorities or {}).get(n, 0), "--profile") for n in names]
    built = build(domain, host, osdb.lookup(os_key), profiles=selected, device_names=osdb.device_names())
    result = Solver(built.problem).solve()
    xml_out = to_bytes(render(built, result)) if isinstance(result, Solution) else None
    return built, result, xml_out


# --- the condition language -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        '__import__("os")',
        "os.family.__class__",
        'open("/etc/passwd")',
        "eval('1')",
        "os.family[0]",
        "lambda: 1",
        "x = 1",
        "(" * 40 + "1" + ")" * 40,
        "1 " + "+ 1 " * 400,
        '"' + "a" * 5000 + '"',
    ],
)
def test_hostile_expressions_are_refused(source: str) -> None:
    with pytest.raises(ExprError):
        parse(source, FUNCTION_NAMES)


def test_expressions_evaluate_without_eval() -> None:
    expr = parse('os.family == "winnt" and domain.vcpus // 2 >= 2 or machine in ["q35"]', FUNCTION_NAMES)
    values = {"os.family": "winnt", "domain.vcpus": 4, "machine": "pc"}
    assert expr.evaluate(values.__getitem__, {}) is True
    values["domain.vcpus"] = 2
    assert expr.evaluate(values.__getitem__, {}) is False
    assert expr.names() == {"os.family", "domain.vcpus", "machine"}


# --- loading: every error names file:line -----------------------------------------------------------

HOSTILE = {
    "syntax.toml": ('name = "x"\nversion = "1"\ndescription = "d"\n[[rule]\nid = "a"\n', ":4:"),
    "unknown-variable.toml": (
        'name = "x"\nversion = "1"\ndescription = "d"\n\n[[rule]]\nid = "a"\nrequire = { "disk.colour" = ["red"] }\n',
        ":7:",
    ),
    "unknown-value.toml": (
        'name = "x"\nversion = "1"\ndescription = "d"\n\n[[rule]]\nid = "a"\nprefer = { machine = ["isapc"] }\n',
        ":7:",
    ),
    "call.toml": (
        'name = "x"\nversion = "1"\ndescription = "d"\n\n[[rule]]\nid = "a"\nwhen = \'__import__("os")\'\n'
        'prefer = { machine = ["pc"] }\n',
        ":7:",
    ),
    "attribute.toml": (
        'name = "x"\nversion = "1"\ndescription = "d"\n\n[[rule]]\nid = "a"\nwhen = "os.family.__class__"\n'
        'prefer = { machine = ["pc"] }\n',
        ":7:",
    ),
    "deep.toml": ('name = "x"\nversion = "1"\ndescription = "d"\nx = ' + "[" * 5000 + "]" * 5000 + "\n", ":"),
    "huge.toml": ('name = "x"\nversion = "1"\ndescription = "' + "d" * 300_000 + '"\n', ":1:"),
    "no-effect.toml": ('name = "x"\nversion = "1"\ndescription = "d"\n\n[[rule]]\nid = "a"\n', ":6:"),
    "entity.xml": (
        '<?xml version="1.0"?>\n<!DOCTYPE p [<!ENTITY a "aaaa">]>\n<profile name="x"><add>&a;</add></profile>\n',
        ":2:",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_profiles_are_rejected_with_file_and_line(name: str, tmp_path: Path) -> None:
    text, line = HOSTILE[name]
    path = tmp_path / name
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert time.perf_counter() - started < 2
    assert str(info.value).startswith(str(path) + line.rstrip(":") if line != ":" else str(path) + ":"), info.value
    checked = cli("profiles", "check", str(path))
    assert checked.returncode == 1
    assert f"{path}{line}" in checked.stdout.decode() or f"{path}:" in checked.stdout.decode()
    assert b"Traceback" not in checked.stderr
    solved = cli("solve", str(REPO / "examples" / "rhel6-on-q35.xml"), "--profile", str(path))
    assert solved.returncode == 1
    assert len(solved.stderr.decode().strip().splitlines()) == 1
    assert str(path) in solved.stderr.decode()


def test_unknown_profile_and_pinned_version_are_input_errors(tmp_path: Path) -> None:
    unknown = cli("solve", str(REPO / "examples" / "rhel6-on-q35.xml"), "--profile", "windwos")
    assert unknown.returncode == 1 and b"did you mean windows" in unknown.stderr
    pinned = cli("solve", str(REPO / "examples" / "rhel6-on-q35.xml"), "--profile", "windows@0.9")
    assert pinned.returncode == 1 and b"pinned to version 0.9" in pinned.stderr


# --- the shipped library ---------------------------------------------------------------------------


def test_shipped_library_has_the_profiles_the_issue_names() -> None:
    names = set(available())
    wanted = {
        "modern-q35",
        "legacy-pc",
        "virtio-everywhere",
        "windows",
        "windows-11",
        "secure-boot",
        "desktop-spice",
        "headless-server",
        "hotplug-ready",
        "migration-safe",
        "virt-install-defaults",
        "kubevirt-preferences",
    }
    assert wanted <= names
    for name in wanted:
        profile = find_profile(name)
        assert profile.description and profile.use_when, name


def test_profiles_check_of_the_library_finds_the_incompatible_pairs() -> None:
    done = cli("profiles", "check")
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    out = done.stdout.decode()
    assert "'legacy-pc' and 'modern-q35' can never be combined" in out
    assert "'desktop-spice' and 'headless-server' can never be combined" in out
    assert "'legacy-pc' and 'secure-boot' can never be combined" in out
    assert "'modern-q35' and 'windows' can never" not in out


# --- semantics -------------------------------------------------------------------------------------


def test_draft_full_example_gives_the_drafts_output(host, osdb) -> None:
    xml = (DATA / "draft" / "domain.xml").read_bytes()
    domain = Domain.from_bytes(xml, "draft")
    selected = [
        SelectedProfile(find_profile(sel.name, [DATA / "draft"]), sel.priority, sel.where)
        for sel in domain.profile_selections()
    ]
    assert [s.profile.name for s in selected] == [
        "spice-stuff",
        "sensible-defaults",
        "hyperv-defaults",
        "myapp-defaults",
    ]
    built = build(domain, host, osdb.lookup("centos7.0"), profiles=selected, device_names=osdb.device_names())
    result = Solver(built.problem).solve()
    assert isinstance(result, Solution)
    root = etree.fromstring(to_bytes(render(built, result)))
    assert root.find("devices/interface/model").get("type") == "e1000e"  # priority-50 hard default wins
    videos = root.findall("devices/video")
    assert [v.find("model").get("type") for v in videos] == ["qxl"]  # one QXL video, not two
    redirdevs = root.findall("devices/redirdev")
    assert [(r.get("bus"), r.get("type")) for r in redirdevs] == [("usb", "spicevmc")] * 2
    assert root.find("features/hyperv") is None  # centos7 is not Windows
    assert root.find("devices/graphics").get("type") == "spice"


@pytest.mark.parametrize("machine_profile", ["q35", "pc"])
def test_one_numa_profile_composes_with_either_machine(machine_profile, host, osdb, domain_schema) -> None:
    xml = (DATA / "compose" / "domain.xml").read_bytes()
    _, result, out = solve_with(
        xml, "fedora37", [machine_profile, "numa-layout", "nfv-networking"], host, osdb, [DATA / "compose"]
    )
    assert isinstance(result, Solution), result
    root = etree.fromstring(out)
    expander = {"q35": "pcie-expander-bus", "pc": "pci-expander-bus"}[machine_profile]
    assert root.find(f"devices/controller[@model='{expander}']/target/node").text == "1"
    assert len(root.findall("cpu/numa/cell")) == 2
    assert root.find("devices/interface/driver").get("queues") == "2"  # derived: one queue per vCPU
    assert domain_schema.validate(etree.ElementTree(root)), domain_schema.error_log


def test_contradictory_machine_profiles_conflict_with_both_file_lines(host, osdb) -> None:
    xml = (DATA / "compose" / "domain.xml").read_bytes()
    _, result, _ = solve_with(xml, "fedora37", ["pc", "q35", "numa-layout"], host, osdb, [DATA / "compose"])
    assert isinstance(result, Conflict)
    wheres = sorted(m.provenance.where for m in result.members)
    assert wheres == [f"{DATA / 'compose' / 'pc.toml'}:5", f"{DATA / 'compose' / 'q35.toml'}:5"]


def test_nfv_profile_on_a_guest_without_virtio_is_a_clear_conflict(host, osdb) -> None:
    xml = (DATA / "compose" / "domain.xml").read_bytes()
    _, result, _ = solve_with(xml, "winxp", ["nfv-networking"], host, osdb, [DATA / "compose"])
    assert isinstance(result, Conflict)
    assert {m.provenance.source.value for m in result.members} == {"guest", "profile"}


def test_app_xml_outranks_soft_profile_rules(host, osdb) -> None:
    xml = b"""<domain type='kvm'><name>a</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
    <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
    <interface type='user'><model type='e1000'/></interface></devices></domain>"""
    _, result, out = solve_with(xml, "fedora37", ["virtio-everywhere", "kubevirt-preferences"], host, osdb)
    assert isinstance(result, Solution)
    assert result.assignment["interface[0].model"] == "e1000"
    assert result.assignment["machine"] == "pc"


def test_hard_profile_rule_against_app_xml_is_a_conflict(host, osdb) -> None:
    xml = b"""<domain type='kvm'><name>a</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
    <os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""
    _, result, _ = solve_with(xml, "fedora37", ["modern-q35"], host, osdb)
    assert isinstance(result, Conflict)
    assert {m.provenance.source.value for m in result.members} == {"app", "profile"}


def test_soft_rules_are_ordered_by_priority_then_selection(host, osdb, tmp_path: Path) -> None:
    for name, model in (("wants-vga", "vga"), ("wants-bochs", "bochs")):
        (tmp_path / f"{name}.toml").write_text(
            f'name = "{name}"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "v"\n'
            f'prefer = {{ "video.model" = ["{model}"] }}\n'
        )
    xml = (DATA / "compose" / "domain.xml").read_bytes()
    _, first, _ = solve_with(xml, "fedora37", ["wants-vga", "wants-bochs"], host, osdb, [tmp_path])
    assert first.assignment["video.model"] == "vga"  # same priority: selection order
    _, second, _ = solve_with(
        xml, "fedora37", ["wants-vga", "wants-bochs"], host, osdb, [tmp_path], {"wants-bochs": 10}
    )
    assert second.assignment["video.model"] == "bochs"  # higher priority wins


def test_snippet_touching_a_modelled_variable_is_a_constraint(host, osdb, tmp_path: Path) -> None:
    """A host without QXL makes 'add a QXL video' a conflict, not broken XML."""
    (tmp_path / "qxl.toml").write_text(
        'name = "qxl"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "qxl"\nstrength = "hard"\n'
        "add = \"<devices><video><model type='qxl'/></video></devices>\"\n"
    )
    bundle = tmp_path / "host"
    shutil.copytree(host.source, bundle)
    for caps in bundle.glob("domcaps-*.xml"):
        caps.write_text(caps.read_text().replace("<value>qxl</value>", ""))
    from virtpolicy.inputs.host import load_host_bundle

    xml = (DATA / "compose" / "domain.xml").read_bytes()
    _, result, _ = solve_with(xml, "fedora37", ["qxl"], load_host_bundle(bundle), osdb, [tmp_path])
    assert isinstance(result, Conflict)
    assert {m.provenance.source.value for m in result.members} == {"host", "profile"}


def test_windows_profile_with_declared_virtio_win_gets_virtio(host, osdb) -> None:
    xml = f"""<domain type='kvm'><name>w</name><memory unit='GiB'>4</memory><vcpu>2</vcpu>
    <metadata><virtpolicy:guest xmlns:virtpolicy='{VP}' drivers='virtio-win'/></metadata>
    <os><type arch='x86_64'>hvm</type></os><devices>
    <disk type='file' device='disk'><source file='/w.qcow2'/></disk><interface type='user'/></devices></domain>"""
    _, plain, _ = solve_with(xml.replace("virtio-win", "none").encode(), "win10", ["windows"], host, osdb)
    assert plain.assignment["disk[0].bus"] == "sata"
    assert plain.assignment["clock.offset"] == "localtime"
    _, declared, _ = solve_with(xml.encode(), "win10", ["windows", "virtio-everywhere"], host, osdb)
    assert declared.assignment["disk[0].bus"] == "virtio"
    assert declared.assignment["interface[0].model"] == "virtio"


def test_metadata_selection_record_and_idempotence() -> None:
    xml = f"""<domain type='kvm'><name>m</name><memory unit='MiB'>1024</memory><vcpu>2</vcpu>
    <metadata><virtpolicy:profiles xmlns:virtpolicy='{VP}'>
      <virtpolicy:profile name='desktop-spice' priority='10'/><virtpolicy:profile name='hotplug-ready'/>
    </virtpolicy:profiles></metadata>
    <os><type arch='x86_64'>hvm</type></os><devices>
    <disk type='file' device='disk'><source file='/m.qcow2'/></disk></devices></domain>""".encode()
    first = cli("solve", "-", "--os", "fedora37", "-q", stdin=xml)
    assert first.returncode == 0, first.stderr.decode()
    root = etree.fromstring(first.stdout)
    applied = root.findall(f"metadata/{{{VP}}}policy/{{{VP}}}applied")
    assert [(a.get("name"), a.get("version"), a.get("priority")) for a in applied] == [
        ("desktop-spice", "1.0", "10"),
        ("hotplug-ready", "1.2", "0"),
    ]
    assert all(len(a.get("digest")) == 16 for a in applied)
    assert len(root.findall("devices/redirdev")) == 2
    ports = {p.get("index") for p in root.findall("devices/controller[@model='pcie-root-port']")}
    used = {str(int(a.get("bus"), 16)) for a in root.iterfind("devices/*/address[@type='pci']")}
    assert len(ports - used) == 8  # eight spare root ports beyond the ones devices use
    assert root.find("devices/sound").get("model") == "ich9"
    again = cli("solve", "-", "--os", "fedora37", "-q", stdin=first.stdout)
    assert again.stdout == first.stdout


def test_existing_domain_keeps_its_abi_until_refresh(tmp_path: Path) -> None:
    profile = tmp_path / "video.toml"
    profile.write_text(
        'name = "video"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "v"\nprefer = { "video.model" = ["vga"] }\n'
    )
    args = ["--os", "fedora37", "--profile-path", str(tmp_path), "--profile", "video", "-q"]
    src = DATA / "compose" / "domain.xml"
    first = cli("solve", str(src), *args)
    assert etree.fromstring(first.stdout).find("devices/video/model").get("type") == "vga"
    solved = tmp_path / "solved.xml"
    solved.write_bytes(first.stdout)
    profile.write_text(profile.read_text().replace('version = "1"', 'version = "2"').replace("vga", "bochs"))
    kept = cli("solve", str(solved), *args)
    assert etree.fromstring(kept.stdout).find("devices/video/model").get("type") == "vga"  # ABI kept
    refreshed = cli("solve", str(solved), *args, "--refresh")
    assert refreshed.returncode == 0, refreshed.stderr.decode()
    assert etree.fromstring(refreshed.stdout).find("devices/video/model").get("type") == "bochs"
    assert b'-      <model type="vga"/>' in refreshed.stderr and b'+      <model type="bochs"/>' in refreshed.stderr


def test_derived_values_from_the_domain(host, osdb, domain_schema, tmp_path: Path) -> None:
    (tmp_path / "derived.toml").write_text(
        'name = "derived"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "io"\n'
        'set = { "iothreads/text()" = "domain.disks", "devices/interface/driver/@queues" = "min(domain.vcpus, 8)" }\n'
    )
    xml = (DATA / "compose" / "domain.xml").read_bytes()
    _, result, out = solve_with(xml, "fedora37", ["derived"], host, osdb, [tmp_path])
    root = etree.fromstring(out)
    assert root.findtext("iothreads") == "1"
    assert root.find("devices/interface/driver").get("queues") == "2"
    assert domain_schema.validate(etree.ElementTree(root)), domain_schema.error_log
