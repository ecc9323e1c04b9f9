"""`whatif compare` on real upgrades: libvirt's own QEMU 7.2 and 8.0 test hosts, and a profile version
bump, as golden reports (regenerate after an intended change with VIRTPOLICY_REGEN_GOLDEN=1)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from corpus import corpus_host_bundle, require_corpus
from support import REPO, cli, partial_domain

from virtpolicy.whatif.compare import abi_facts

GOLDEN = REPO / "tests" / "golden" / "whatif"
FEDORA = "http://fedoraproject.org/fedora/37"
TEMPLATES = ("benchmarks/typical.xml", "examples/rhel6-on-q35.xml", "examples/windows10.xml",
             "examples/rhel5-on-q35-conflict.xml")  # fmt: skip
PROFILE = """name = "acme-base"
version = "{version}"
description = "the base every acme domain selects"

[[rule]]
id = "video"
prefer = {{ "video.model" = ["{video}"] }}
{extra}"""


def _golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if os.environ.get("VIRTPOLICY_REGEN_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with VIRTPOLICY_REGEN_GOLDEN=1"
    assert text == golden.read_text()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_corpus()
    base = tmp_path_factory.mktemp("hosts")
    return corpus_host_bundle(base, "7.2.0"), corpus_host_bundle(base, "8.0.0")


def test_qemu_7_2_to_8_0_host_upgrade(hosts: tuple[Path, Path], tmp_path: Path) -> None:
    before, after = hosts
    complete = cli("solve", "-q", "--host", str(before), "examples/windows10.xml")
    assert complete.returncode == 0, complete.stderr
    shutil.copy(REPO / "examples" / "windows10.xml", tmp_path / "template.xml")
    running = tmp_path / "win10-running.xml"
    running.write_bytes(complete.stdout)
    args = ["whatif", "compare", "--before-host", str(before), "--after-host", str(after), "--workers", "1"]
    text = cli(*args, *TEMPLATES, str(running))
    assert text.returncode == 0, text.stderr
    _golden("compare-qemu-7.2-to-8.0.txt", text.stdout.decode().replace(str(tmp_path), "TMP"))
    report = json.loads(cli(*args, "--format", "json", *TEMPLATES, str(running)).stdout)
    by_source = {d["source"]: d for d in report["domains"]}
    machine = {r["xpath"]: r for r in by_source["benchmarks/typical.xml"]["abi_changes"]}
    assert machine["/domain/os/type/@machine"] == {
        "xpath": "/domain/os/type/@machine", "before": "pc-q35-7.2", "after": "pc-q35-8.0",
    }  # fmt: skip
    run = by_source[str(running)]
    assert run["complete"] and run["still_fits"], "a QEMU 8.0 host still runs pc-q35-7.2"
    assert by_source["examples/rhel5-on-q35-conflict.xml"]["after"] == "conflict"


def test_profile_version_bump(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "acme-base.toml").write_text(PROFILE.format(version="1.0", video="virtio", extra=""))
    extra = '\n[[rule]]\nid = "tpm"\nrequire = { "tpm.model" = ["tpm-crb"] }\nstrength = "hard"\n'
    (v2 / "acme-base.toml").write_text(PROFILE.format(version="2.0", video="qxl", extra=extra))
    selection = (
        "<metadata><virtpolicy:profile xmlns:virtpolicy='http://virtpolicy.org/xmlns/domain/1.0' name='acme-base'/>"
    )
    domains = []
    for os_id, name in ((FEDORA, "acme-fedora"), ("http://microsoft.com/win/10", "acme-win10")):
        xml = partial_domain(name, os_id, None, "<disk type='file' device='disk'><source file='/d.qcow2'/></disk>")
        path = tmp_path / f"{name}.xml"
        path.write_text(xml.replace("<metadata>", selection, 1))
        domains.append(str(path))
    args = ["whatif", "compare", "--before-profile-path", str(v1), "--after-profile-path", str(v2), "--workers", "1"]
    proc = cli(*args, *domains)
    assert proc.returncode == 0, proc.stderr
    _golden("compare-profile-bump.txt", proc.stdout.decode().replace(str(tmp_path), "TMP"))
    report = json.loads(cli(*args, "--format", "json", *domains).stdout)
    changed = {d["domain"]: {c["variable"]: c for c in d["decisions"]} for d in report["domains"]}
    assert changed["acme-fedora"]["video.model"]["after"] == "qxl"
    assert "video.model" not in changed["acme-win10"], "win10 has no qxl driver: its video stays"
    for name in ("acme-fedora", "acme-win10"):
        tpm = changed[name]["tpm.model"]
        assert tpm["after"] == "tpm-crb" and tpm["reason"].startswith("profile"), tpm


def test_abi_facts_name_guest_visible_hardware() -> None:
    xml = (REPO / "examples" / "windows10.xml").read_text()
    laid_out = cli("solve", "-q", "examples/windows10.xml").stdout.decode()
    facts = abi_facts(laid_out)
    assert facts["/domain/os/type/@machine"] == "pc-q35-7.2"
    assert any(k.endswith("/address") for k in facts)
    assert any(k.startswith("/domain/devices/disk[1]") for k in facts)
    assert not any(k.endswith("/address") for k in abi_facts(xml)), "the template has no addresses"


def test_compare_needs_a_change_to_compare() -> None:
    proc = cli("whatif", "compare", "benchmarks/typical.xml")
    assert proc.returncode == 1
    assert "name what changes" in proc.stderr.decode()


def test_a_bad_domain_is_reported_and_exits_1(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xml"
    broken.write_text("<domain")
    proc = cli("whatif", "compare", "--before-os", "fedora37", "--after-os", "rhel9.0", "benchmarks/typical.xml",
               str(broken), "--format", "json")  # fmt: skip
    assert proc.returncode == 1
    assert f"{broken}:1: malformed XML" in proc.stderr.decode()
    statuses = {d["source"]: d["after"] for d in json.loads(proc.stdout)["domains"]}
    assert statuses == {"benchmarks/typical.xml": "solved", str(broken): "input error"}, statuses
    combos = cli("whatif", "combinations", str(broken), "--profile", "legacy-pc")
    assert combos.returncode == 1 and str(broken) in combos.stderr.decode()
