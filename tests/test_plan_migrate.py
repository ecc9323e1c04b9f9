"""`plan migrate`: destinations libvirt's ABI check would reject are refused with that reason (machine
version missing, CPU feature missing, device model missing); a domain planned for the whole fleet can
go anywhere in it."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from hostvariants import no_tpm, variant
from lxml import etree
from support import cli, plan_migrate_json

from virtpolicy.inputs.host import EMBEDDED_BUNDLE


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from corpus import corpus_host_bundle, require_corpus

    require_corpus()
    base = tmp_path_factory.mktemp("migrate")
    fleet = base / "fleet"
    fleet.mkdir()
    for version in ("6.2.0", "8.0.0"):
        shutil.move(str(corpus_host_bundle(base, version)), fleet / f"qemu-{version}")
    return fleet


def _laid_out(host: Path, template: str = "examples/windows10.xml") -> bytes:
    proc = cli("solve", "-q", "--host", str(host), template)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_machine_version_missing_on_the_destination(fleet: Path) -> None:
    domain = _laid_out(fleet / "qemu-8.0.0")
    report = plan_migrate_json(domain, "--from", str(fleet / "qemu-8.0.0"), "--to", str(fleet / "qemu-6.2.0"))
    (dest,) = report["destinations"]
    assert not dest["can_migrate"]
    machine = [r["message"] for r in dest["reasons"] if r["check"] == "machine"]
    assert machine and "pc-q35-8.0 does not exist" in machine[0] and "pc-q35-6.2" in machine[0], dest


def test_a_cpu_feature_missing_on_the_destination(fleet: Path) -> None:
    root = etree.fromstring(_laid_out(fleet / "qemu-6.2.0"))
    cpu = root.find("cpu")
    cpu.attrib.clear()
    cpu.set("mode", "custom")
    cpu.set("match", "exact")
    for child in list(cpu):
        cpu.remove(child)
    etree.SubElement(cpu, "model", fallback="forbid").text = "qemu64"
    etree.SubElement(cpu, "feature", policy="require", name="avx512f")  # no EPYC-Rome has it
    report = plan_migrate_json(etree.tostring(root), "--to", str(fleet / "qemu-8.0.0"))
    reasons = [r["message"] for r in report["destinations"][0]["reasons"] if r["check"] == "cpu"]
    assert reasons and "avx512f" in reasons[0], report


def test_a_device_model_missing_on_the_destination(tmp_path: Path) -> None:
    tpm_less = variant(EMBEDDED_BUNDLE, tmp_path / "no-tpm", no_tpm)
    laid_out = cli("solve", "-q", "--profile", "windows-11", "examples/windows10.xml")
    assert laid_out.returncode == 0, laid_out.stderr
    domain = laid_out.stdout
    assert b"<tpm" in domain
    report = plan_migrate_json(domain, "--from", str(EMBEDDED_BUNDLE), "--to", str(tpm_less))
    (dest,) = report["destinations"]
    devices = [r["message"] for r in dest["reasons"] if r["check"] == "devices"]
    assert devices and any("tpm" in m.lower() for m in devices), dest


def test_a_domain_planned_for_the_fleet_migrates_anywhere_in_it(fleet: Path) -> None:
    common = cli("plan", "common", "examples/windows10.xml", "--fleet", str(fleet))
    assert common.returncode == 0, common.stderr
    report = plan_migrate_json(common.stdout, "--from", str(fleet / "qemu-8.0.0"), "--fleet", str(fleet))
    assert report["can_migrate_to"] == ["qemu-6.2.0"], report
    assert all(d["can_migrate"] for d in report["destinations"]), report


def test_a_custom_model_fits_where_the_features_it_disables_are_its_blockers(tmp_path: Path) -> None:
    """libvirt's hypervisor baseline names a model the host reports not usable, and disables the model's
    features the host lacks (this machine's EPYC-Milan: pni, sse4.1, ...): that CPU runs there. Without those
    disables it does not, and the reason names what the model needs."""
    from virtpolicy.inputs.host import load_host_bundle
    from virtpolicy.plan.cpu import BaselineCpu

    caps = load_host_bundle(EMBEDDED_BUNDLE).domcaps_for("x86_64", "kvm", "q35")
    assert caps.host_model not in caps.usable_models and caps.host_model_disabled, "the premise: blockers"
    root = etree.fromstring(_laid_out(EMBEDDED_BUNDLE))

    def verdict(cpu: BaselineCpu) -> dict:  # type: ignore[type-arg]
        domain = copy.deepcopy(root)
        domain.replace(domain.find("cpu"), cpu.element())
        return plan_migrate_json(etree.tostring(domain), "--to", str(EMBEDDED_BUNDLE))["destinations"][0]

    required = tuple(sorted(caps.host_model_features))
    fits = verdict(BaselineCpu(caps.host_model, required, tuple(sorted(caps.host_model_disabled))))
    assert not [r for r in fits["reasons"] if r["check"] == "cpu"], fits
    blocked = verdict(BaselineCpu(caps.host_model, required))
    (reason,) = [r["message"] for r in blocked["reasons"] if r["check"] == "cpu"]
    assert f"CPU model {caps.host_model} is not usable" in reason and sorted(caps.host_model_disabled)[0] in reason
