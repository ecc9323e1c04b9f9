"""`plan common`: one domain for a whole fleet. On libvirt's own QEMU 6.2/7.2/8.0 test hosts it validates,
comes back unchanged from a solve on every host's bundle, pins a machine version all of them have and no
host-passthrough CPU; for the local host it is defined and started by the real libvirtd."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hostvariants import no_hyperv, no_secure_boot, variant
from libvirt_harness import LibvirtHarness
from livecpu import runnable_cpu
from lxml import etree
from support import cli, partial_domain

from virtpolicy import Engine
from virtpolicy.inputs.host import EMBEDDED_BUNDLE, load_host_bundle
from virtpolicy.plan.common import baseline_cpu, common_host

TEMPLATES = ("benchmarks/typical.xml", "examples/rhel6-on-q35.xml", "examples/windows10.xml")


@pytest.fixture(scope="module")
def mixed_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corpus import corpus_host_bundle, require_corpus

    require_corpus()
    base = tmp_path_factory.mktemp("mixed")
    fleet = base / "fleet"
    fleet.mkdir()
    for version in ("6.2.0", "7.2.0", "8.0.0"):
        shutil.move(str(corpus_host_bundle(base, version)), fleet / f"qemu-{version}")
    return fleet


@pytest.mark.parametrize("template", TEMPLATES)
def test_common_domain_runs_unchanged_on_every_host(mixed_fleet: Path, template: str, domain_schema) -> None:  # type: ignore[no-untyped-def]
    proc = cli("plan", "common", template, "--fleet", str(mixed_fleet))
    assert proc.returncode == 0, proc.stderr
    xml = proc.stdout
    tree = etree.ElementTree(etree.fromstring(xml))
    assert domain_schema.validate(tree), domain_schema.error_log
    root = tree.getroot()
    assert root.find("os/type").get("machine") == "pc-q35-6.2", "the newest q35 every host has"
    cpu = root.find("cpu")
    assert cpu is not None and cpu.get("mode") == "custom", etree.tostring(cpu)
    assert cpu.findtext("model"), "a named baseline model"
    for bundle in sorted(mixed_fleet.iterdir()):
        again = cli("solve", "-q", "--host", str(bundle), "-", stdin=xml)
        assert again.returncode == 0, (bundle.name, again.stderr)
        assert again.stdout == xml, f"{bundle.name} changed the common domain"
        check = cli("check", "--host", str(bundle), "-", stdin=xml)
        assert check.returncode == 0, (bundle.name, check.stderr)


def test_the_common_host_is_the_intersection(mixed_fleet: Path) -> None:
    hosts = [load_host_bundle(b) for b in sorted(mixed_fleet.iterdir())]
    common = common_host(hosts)
    q35 = next(m for m in common.machines[("x86_64", "kvm")] if m.name == "q35")
    assert q35.canonical == "pc-q35-6.2"
    assert "pc-q35-8.0" not in {m.name for m in common.machines[("x86_64", "kvm")]}
    caps = common.domcaps_for("x86_64", "kvm", "q35")
    for host in hosts:
        own = host.domcaps_for("x86_64", "kvm", "q35")
        assert set(caps.enum("devices/disk/bus") or ()) <= set(own.enum("devices/disk/bus") or ())
        assert caps.vcpu_max <= own.vcpu_max
    cpu = baseline_cpu([h.domcaps_for("x86_64", "kvm", "q35") for h in hosts])
    assert cpu is not None
    assert all(cpu.model in h.domcaps_for("x86_64", "kvm", "q35").usable_models for h in hosts)
    assert "invtsc" not in cpu.features, "non-migratable features stay out"


@pytest.mark.libvirt
def test_common_domain_for_the_local_host_starts(libvirt: LibvirtHarness, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    captured = cli("host", "capture", "--connect", libvirt.uri, str(fleet / "here"))  # this machine, live
    assert captured.returncode == 0, captured.stderr
    template = tmp_path / "template.xml"
    devices = "<disk type='file' device='disk'><source file='/var/lib/images/c.qcow2'/></disk><interface type='user'/>"
    template.write_text(partial_domain("vp-plan-common", "http://fedoraproject.org/fedora/37", None, devices))
    proc = cli("plan", "common", str(template), "--fleet", str(fleet))
    assert proc.returncode == 0, proc.stderr
    assert b"(libvirt hypervisor-cpu-baseline)" in proc.stderr, "a live host: libvirt's own baseline"
    cpu = etree.fromstring(proc.stdout).find("cpu")
    assert cpu is not None and cpu.get("mode") == "custom", "never this host's host-passthrough"
    xml, notes = runnable_cpu(proc.stdout.decode())
    started = libvirt.define_and_start(xml, tmp_path)
    live = etree.fromstring(started.live_xml.encode()).find("cpu")
    assert live is not None and live.findtext("model") == cpu.findtext("model"), (notes, started.live_xml)


def test_engine_from_the_fleet_is_reused(mixed_fleet: Path) -> None:
    from virtpolicy.plan.fleet import classes_of, load_fleet
    from virtpolicy.plan.hosts import engine_for

    fleet = load_fleet(mixed_fleet)
    engine = engine_for(fleet)
    assert isinstance(engine, Engine) and sorted(engine.hosts) == sorted(classes_of(fleet.hosts))


def _ten_host_fleet(base: Path) -> Path:
    """Ten hosts: seven stock, two without the secure-boot loader, one without Hyper-V enlightenments."""
    fleet = base / "ten"
    fleet.mkdir()
    for i in range(10):
        edits = (no_secure_boot,) if i in (7, 8) else (no_hyperv,) if i == 9 else ()
        variant(EMBEDDED_BUNDLE, fleet / f"h{i:02d}", *edits)
    return fleet


def test_min_hosts_leaves_out_the_odd_host_and_keeps_its_feature(tmp_path: Path) -> None:
    import json

    fleet = _ten_host_fleet(tmp_path)
    proc = cli("plan", "common", "examples/windows10.xml", "--fleet", str(fleet), "--min-hosts", "9",
               "--format", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (left,) = report["left_out"]
    assert left["hosts"] == "h09", left
    assert any("hyperv=" in t for t in left["would_lose"]), left
    assert "<hyperv" in report["xml"], "the Hyper-V enlightenments stay in the plan for the other nine"


def test_min_hosts_agrees_with_brute_force(tmp_path: Path) -> None:
    import itertools

    from virtpolicy.plan.common import capability_tokens, choose_classes
    from virtpolicy.plan.fleet import load_fleet

    fleet = load_fleet(_ten_host_fleet(tmp_path))
    weights = {c: len(fleet.members(c)) for c in fleet.classes}
    tokens = {c: capability_tokens(h) for c, h in fleet.classes.items()}
    names = list(fleet.classes)
    for k in range(1, 11):
        best = max(
            len(frozenset.intersection(*(tokens[c] for c in subset)))
            for r in range(1, len(names) + 1)
            for subset in itertools.combinations(names, r)
            if sum(weights[c] for c in subset) >= k
        )
        choice = choose_classes(fleet.classes, weights, k)
        assert choice is not None and choice.capability == best, (k, choice, best)
        assert sum(weights[c] for c in choice.chosen) >= k
    assert choose_classes(fleet.classes, weights, 11) is None


def test_hosts_of_two_cpu_vendors_get_no_custom_cpu_and_no_host_cpu(tmp_path: Path) -> None:
    """libvirt has no baseline of an Intel and an AMD host-model CPU ("CPU vendors do not match"), and neither
    has the engine; the common domain then leaves the CPU to QEMU's default model, the same on both, never
    a host-passthrough or host-model CPU that differs per host."""
    import json

    from corpus import corpus_host_bundle, require_corpus

    require_corpus()
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    for version in ("4.2.0", "6.2.0"):  # Skylake-Client-IBRS (Intel), EPYC-Rome (AMD)
        shutil.move(str(corpus_host_bundle(tmp_path, version)), fleet / f"qemu-{version}")
    proc = cli("plan", "common", "benchmarks/typical.xml", "--fleet", str(fleet), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["cpu"] is None and "CPU vendors differ (AMD, Intel)" in report["cpu_note"], report["cpu_note"]
    cpu = etree.fromstring(report["xml"].encode()).find("cpu")
    assert cpu is None or cpu.get("mode") not in ("host-passthrough", "host-model", "maximum"), etree.tostring(cpu)
    for bundle in sorted(fleet.iterdir()):
        again = cli("solve", "-q", "--host", str(bundle), "-", stdin=report["xml"].encode())
        assert again.returncode == 0 and again.stdout.decode() == report["xml"], (bundle.name, again.stderr)
