"""`plan hosts` over fleets of real capability data: the embedded QEMU 7.2 host, variants of it with the
secure-boot loader or the TPM taken out (what old-firmware and TPM-less hosts report), and libvirt's own
QEMU 4.2-8.0 test hosts. Host classes, the inventory format, the verdicts and the funnel."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hostvariants import small_fleet
from support import cli

from virtpolicy.errors import InputError
from virtpolicy.inputs.host import EMBEDDED_BUNDLE
from virtpolicy.plan.fleet import fingerprint, load_fleet


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fleet(tmp_path_factory.mktemp("fleet"), EMBEDDED_BUNDLE)  # h01, h02 twins; old-firmware; no-tpm


def test_identical_hosts_are_one_class(fleet_dir: Path) -> None:
    fleet = load_fleet(fleet_dir)
    assert [h.name for h in fleet.hosts] == ["h01", "h02", "no-tpm", "old-firmware"]
    assert len(fleet.classes) == 3
    assert fingerprint(fleet_dir / "h01") == fingerprint(fleet_dir / "h02") != fingerprint(fleet_dir / "no-tpm")


def test_secure_boot_is_refused_where_the_loader_is_missing(fleet_dir: Path) -> None:
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(fleet_dir), "--profile", "secure-boot",
               "--format", "json", "--workers", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    runs = {h["name"]: h["runs"] for h in plan["hosts"]}
    assert runs == {"h01": True, "h02": True, "no-tpm": True, "old-firmware": False}
    refused = next(h for h in plan["hosts"] if h["name"] == "old-firmware")
    kinds = {m["provenance"]["kind"] for m in refused["conflict"]}
    assert "host" in kinds and "profile" in kinds, refused["conflict"]
    host_fact = next(m for m in refused["conflict"] if m["provenance"]["kind"] == "host")
    assert "old-firmware" in host_fact["provenance"]["where"], host_fact
    assert plan["funnel"] == [{"cause": plan["funnel"][0]["cause"], "hosts": 1, "classes": [refused["class"]]}]


def test_a_tpm_requirement_names_the_hosts_without_one(fleet_dir: Path, tmp_path: Path) -> None:
    needs_tpm = tmp_path / "needs-tpm.toml"
    needs_tpm.write_text(
        'name = "needs-tpm"\nversion = "1.0"\ndescription = "a TPM 2.0 device"\n\n[[rule]]\n'
        'id = "tpm"\nrequire = { "tpm.model" = ["tpm-crb", "tpm-tis"] }\nstrength = "hard"\n'
    )
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(fleet_dir), "--profile", str(needs_tpm),
               "--workers", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert "runs on 3 of 4 host(s), 3 class(es)" in text, text
    assert "e.g. no-tpm): does not run" in text and "tpm" in text.split("e.g. no-tpm): does not run")[1], text


def test_exit_2_when_no_host_runs_it(fleet_dir: Path, tmp_path: Path) -> None:
    only_bad = tmp_path / "fleet"
    only_bad.mkdir()
    shutil.copytree(fleet_dir / "old-firmware", only_bad / "old-firmware")
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(only_bad), "--profile", "secure-boot")
    assert proc.returncode == 2, proc.stderr
    assert "runs on 0 of 1 host(s)" in proc.stdout.decode()


def test_inventory_with_labels_and_counts(fleet_dir: Path, tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        f'[[host]]\nname = "rack1"\nbundle = "{fleet_dir / "h01"}"\ncount = 3\nlabels = {{ rack = "r1" }}\n\n'
        f'[[host]]\nname = "legacy"\nbundle = "{fleet_dir / "old-firmware"}"\n'
    )
    fleet = load_fleet(inventory)
    assert [h.name for h in fleet.hosts] == ["rack1-1", "rack1-2", "rack1-3", "legacy"]
    assert dict(fleet.hosts[0].labels) == {"rack": "r1"}
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(inventory), "--profile", "secure-boot",
               "--format", "json", "--workers", "1")  # fmt: skip
    plan = json.loads(proc.stdout)
    assert plan["runs_on"] == 3 and plan["hosts_total"] == 4
    assert plan["funnel"][0]["hosts"] == 1


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[host]]\nname = 'a'\n", "exactly one of 'bundle'"),
        ("[[host]]\nname = 'a'\nbundle = 'x'\ncount = 0\n", "'count' must be"),
        ("[[host]]\nname = 'a'\nbundle = 'x'\ncolour = 'red'\n", "unknown key(s) colour"),
        ("host = 3\n", "[[host]] tables"),
        ("[[host]\n", "not a TOML inventory"),
        ("[[host]]\nname = 'a'\nbundle = 'missing'\n", "no such host bundle"),
    ],
)
def test_bad_inventories_are_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(text)
    with pytest.raises(InputError, match=None) as info:
        load_fleet(inventory)
    assert needle in str(info.value), str(info.value)
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(inventory))
    assert proc.returncode == 1 and needle in proc.stderr.decode() and b"internal error" not in proc.stderr


def test_libvirt_qemu_versions_as_a_fleet(tmp_path: Path) -> None:
    from corpus import corpus_host_bundle, require_corpus

    require_corpus()
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    for version in ("4.2.0", "6.2.0", "8.0.0"):
        shutil.move(str(corpus_host_bundle(tmp_path, version)), fleet / f"qemu-{version}")
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(fleet), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    classes = json.loads(proc.stdout)["classes"]
    assert sorted(c["example"] for c in classes) == ["qemu-4.2.0", "qemu-6.2.0", "qemu-8.0.0"]
    assert all(c["runs"] for c in classes), classes
