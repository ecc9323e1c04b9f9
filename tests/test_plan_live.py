"""The common CPU of live hosts comes from libvirt itself (`virsh hypervisor-cpu-baseline --migratable`,
virConnectBaselineHypervisorCPU), and the engine's own cpu_map baseline is checked against libvirt's on
libvirt's test-suite domcapabilities of QEMU 4.2 to 8.0 and on this machine's live host. libvirt's answer
is the reference: where it can answer, the engine must agree.

Two libvirt answers are compared with:
- `virsh cpu-baseline --migratable` (virConnectBaselineCPU): libvirt's baseline from its cpu_map alone, for
  hosts that are not live. The engine's method is this one; every same-vendor set of corpus hosts agrees
  feature for feature, and where the vendors differ neither has a baseline.
- `virsh hypervisor-cpu-baseline --migratable` on the live host over corpus hosts plus the live host: what
  `plan common` uses for a live fleet. It differs from cpu_map's only where the live QEMU's own
  migratability replaces cpu_map's migratable='no' (qemu_driver.c: "We got only migratable features from
  QEMU ..., no further filtering in virCPUBaseline is desired"), which the test allows and nothing else.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
from libvirt_harness import LibvirtError, LibvirtHarness
from livecpu import runnable_cpu
from lxml import etree
from support import cli, partial_domain

from virtpolicy.inputs.host import DomainCaps, load_host_bundle
from virtpolicy.plan.cpu import (
    LIBVIRT_METHOD,
    choose_cpu,
    engine_baseline,
    libvirt_baseline,
    not_migratable,
    parse_cpu,
)

VERSIONS = ("4.2.0", "5.0.0", "5.1.0", "5.2.0", "6.0.0", "6.1.0", "6.2.0", "7.0.0", "7.1.0", "7.2.0", "8.0.0")
TYPICAL = "benchmarks/typical.xml"


def _corpus_caps() -> dict[str, DomainCaps]:
    """libvirt's own q35 KVM domcapabilities of each QEMU version (tests/domaincapsdata)."""
    from corpus import require_corpus

    data = require_corpus() / "tests" / "domaincapsdata"
    return {v: load_host_bundle(data / f"qemu_{v}-q35.x86_64.xml").domcaps[0] for v in VERSIONS}


def _host_cpu(caps: DomainCaps) -> str:
    """A host-model CPU as the host CPU virConnectBaselineCPU parses (no feature policies there)."""
    assert not caps.host_model_disabled, "a host CPU cannot disable features"
    features = "".join(f"<feature name='{f}'/>" for f in sorted(caps.host_model_features))
    return (
        f"<cpu><arch>{caps.arch}</arch><model>{caps.host_model}</model>"
        f"<vendor>{caps.host_model_vendor}</vendor>{features}</cpu>"
    )


def _subsets(names: list[str]) -> list[tuple[str, ...]]:
    return [(n,) for n in names] + list(itertools.combinations(names, 2)) + [tuple(names)]


@pytest.fixture(scope="module")
def here(libvirt: LibvirtHarness, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's host, captured live: its host.toml names the harness's URI."""
    bundle = tmp_path_factory.mktemp("live") / "here"
    done = cli("host", "capture", "--connect", libvirt.uri, str(bundle))
    assert done.returncode == 0, done.stderr
    return bundle


@pytest.mark.libvirt
def test_engine_baseline_is_libvirts_cpu_map_baseline(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    caps = _corpus_caps()
    compared = refused = 0
    for subset in _subsets(list(VERSIONS)):
        chosen = [caps[v] for v in subset]
        engine, why = engine_baseline(chosen)
        cpus = tmp_path / "cpus.xml"
        cpus.write_text("\n".join(_host_cpu(c) for c in chosen))
        try:
            answer = parse_cpu(libvirt.virsh("cpu-baseline", str(cpus), "--migratable"))
        except LibvirtError as exc:
            assert "CPU vendors do not match" in exc.message, (subset, exc.message)
            assert engine is None and "vendors differ" in why, (subset, engine)
            refused += 1
            continue
        assert engine is not None, (subset, why)
        assert engine.provides() == answer.provides(), (
            subset,
            sorted(engine.provides() - answer.provides()),
            sorted(answer.provides() - engine.provides()),
        )
        compared += 1
    assert compared >= 40 and refused >= 18, (compared, refused)


@pytest.mark.libvirt
def test_engine_baseline_agrees_with_hypervisor_baseline_on_the_live_host(libvirt: LibvirtHarness, here: Path) -> None:
    local = load_host_bundle(here).domcaps_for("x86_64", "kvm", "q35")
    assert local is not None and local.host_model, "the live host reports a host-model CPU"
    caps = _corpus_caps()
    same = [v for v in VERSIONS if caps[v].host_model_vendor == local.host_model_vendor]
    other = [v for v in VERSIONS if caps[v].host_model_vendor != local.host_model_vendor]
    if not same:
        pytest.skip(f"no corpus host has this machine's CPU vendor ({local.host_model_vendor})")
    compared = 0
    for subset in _subsets(same):
        chosen = [caps[v] for v in subset] + [local]
        engine, why = engine_baseline(chosen)
        answer = libvirt_baseline([libvirt.uri], chosen, "x86_64", "kvm", local.machine)
        assert engine is not None, (subset, why)
        only_engine = engine.provides() - answer.provides()
        only_libvirt = answer.provides() - engine.provides()
        assert not only_engine, (subset, sorted(only_engine))
        assert only_libvirt <= not_migratable(), (subset, sorted(only_libvirt - not_migratable()))
        compared += 1
    assert compared == len(_subsets(same))
    twice = libvirt_baseline([libvirt.uri, libvirt.uri], [caps[same[0]], local], "x86_64", "kvm", local.machine)
    once = libvirt_baseline([libvirt.uri], [caps[same[0]], local], "x86_64", "kvm", local.machine)
    assert twice.provides() == once.provides(), "an answer fed to the next live host changes nothing it allows"
    if other:  # libvirt refuses hosts of another vendor; so does the plan
        choice = choose_cpu([caps[other[0]], local], [libvirt.uri], "x86_64", "kvm", local.machine)
        assert choice.cpu is None and "CPU vendors do not match" in choice.reason, choice


def _variant_without(here: Path, target: Path, feature: str) -> Path:
    """The live host as it would be with `feature` turned off (firmware that hides it), not live: a captured
    bundle edited the way tests/hostvariants.py edits one, its host.toml naming no URI."""
    shutil.copytree(here, target)
    for file in sorted(target.glob("domcaps-*.xml")):
        tree = etree.parse(str(file))
        mode = tree.getroot().find("cpu/mode[@name='host-model']")
        if mode is not None and mode.find("model") is not None:
            for el in mode.findall(f"feature[@name='{feature}']"):
                mode.remove(el)
            etree.SubElement(mode, "feature", policy="disable", name=feature)
            tree.write(str(file))
    (target / "host.toml").write_text('kernel = "5.14.0-503.el9.x86_64"\n')
    return target


@pytest.mark.libvirt
def test_plan_common_for_a_live_fleet_uses_libvirts_baseline(
    libvirt: LibvirtHarness, here: Path, tmp_path: Path, domain_schema
) -> None:  # type: ignore[no-untyped-def]
    from corpus import corpus_host_bundle

    local = load_host_bundle(here).domcaps_for("x86_64", "kvm", "q35")
    caps = _corpus_caps()
    same = [v for v in VERSIONS if caps[v].host_model_vendor == local.host_model_vendor]
    if not same:
        pytest.skip(f"no corpus host has this machine's CPU vendor ({local.host_model_vendor})")
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    shutil.copytree(here, fleet / "here")
    shutil.move(str(corpus_host_bundle(tmp_path, same[-1])), fleet / f"qemu-{same[-1]}")
    before = libvirt_baseline([libvirt.uri], [local, caps[same[-1]]], "x86_64", "kvm", local.machine)
    hidden = next(f for f in sorted(local.host_model_features) if f in before.provides() and f != "arch-capabilities")
    _variant_without(here, fleet / "here-hidden", hidden)

    template = tmp_path / "template.xml"
    devices = "<disk type='file' device='disk'><source file='/var/lib/images/l.qcow2'/></disk><interface type='user'/>"
    template.write_text(partial_domain("vp-plan-live", "http://fedoraproject.org/fedora/37", None, devices))
    proc = cli("plan", "common", str(template), "--fleet", str(fleet), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    cpu = report["cpu"]
    assert cpu["method"] == LIBVIRT_METHOD and cpu["libvirt"]["uris"] == [libvirt.uri], cpu
    assert cpu["check"]["only_engine"] == [], cpu["check"]
    assert set(cpu["check"]["only_libvirt"]) <= not_migratable(), cpu["check"]
    root = etree.fromstring(report["xml"].encode())
    assert domain_schema.validate(etree.ElementTree(root)), domain_schema.error_log
    planned = parse_cpu(etree.tostring(root.find("cpu"), encoding="unicode"))
    chosen = [load_host_bundle(b).domcaps_for("x86_64", "kvm", "q35") for b in sorted(fleet.iterdir())]
    direct = libvirt_baseline([libvirt.uri], chosen, "x86_64", "kvm", report["machine"])
    assert (planned.model, planned.provides()) == (direct.model, direct.provides()), "libvirt's own answer"
    assert hidden not in planned.provides(), f"{hidden}: the variant lacks it"
    assert planned.provides() < before.provides()
    for bundle in sorted(fleet.iterdir()):
        again = cli("solve", "-q", "--host", str(bundle), "-", stdin=report["xml"].encode())
        assert again.returncode == 0, (bundle.name, again.stderr)
        assert again.stdout.decode() == report["xml"], f"{bundle.name} changed the common domain"
    assert all(report["fits"].values()), report["fits"]
    xml, notes = runnable_cpu(report["xml"])
    started = libvirt.define_and_start(xml, tmp_path)
    live_cpu = etree.fromstring(started.live_xml.encode()).find("cpu")
    assert live_cpu is not None and live_cpu.findtext("model") == planned.model, (notes, started.live_xml)


@pytest.mark.libvirt
def test_an_inventory_connect_entry_is_a_live_host(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(f'[[host]]\nname = "here"\nconnect = "{libvirt.uri}"\ncount = 2\n')
    proc = cli("plan", "common", TYPICAL, "--fleet", str(inventory), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cpu"]["method"] == LIBVIRT_METHOD, report["cpu"]
    assert report["cpu"]["check"]["agrees"] is True, report["cpu"]["check"]
    assert b"libvirt hypervisor-cpu-baseline" in proc.stderr


def test_an_unreachable_live_host_falls_back_to_the_cpu_map_baseline(tmp_path: Path) -> None:
    """A captured bundle whose libvirt is gone: the engine's baseline, and the plan says why."""
    from virtpolicy.inputs.host import EMBEDDED_BUNDLE

    fleet = tmp_path / "fleet"
    shutil.copytree(EMBEDDED_BUNDLE, fleet / "gone")
    (fleet / "gone" / "host.toml").write_text('connect = "qemu:///system?socket=/nonexistent/libvirt-sock"\n')
    proc = cli("plan", "common", TYPICAL, "--fleet", str(fleet), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    cpu = json.loads(proc.stdout)["cpu"]
    assert cpu["method"] == "cpu_map" and "libvirt could not be asked" in cpu["note"], cpu
    assert "/nonexistent" in cpu["note"] and b"cpu: libvirt could not be asked" in proc.stderr
