"""`virtpolicy explain`: every minimal conflict is minimal and real, every correction restores feasibility,
and the reports for a dozen realistic scenarios match their golden files (tests/golden/explain/*.json).

Regenerate the golden files after an intended change with VIRTPOLICY_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support import four_node_host, needs_chromium, partial_domain, screenshot_colours

from virtpolicy.core.explain import ConflictExplainer
from virtpolicy.core.problem import Source
from virtpolicy.core.solve import Conflict, Solver
from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.host import Host, load_host_bundle
from virtpolicy.outputs.explain_report import build_report, to_html, to_text
from virtpolicy.profiles.library import find_profile
from virtpolicy.sources.build import Build, build
from virtpolicy.sources.context import SelectedProfile

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "explain"
DISK = "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/x.qcow2'/></disk>"
NIC = "<interface type='user'/>"
VP = "http://virtpolicy.org/xmlns/domain/1.0"


def _strip(host: Host, tmp: Path, name: str, old: str, new: str = "") -> Host:
    bundle = tmp / name
    shutil.copytree(host.source, bundle)
    for caps in bundle.glob("domcaps-*.xml"):
        caps.write_text(caps.read_text().replace(old, new))
    return load_host_bundle(bundle)


@dataclass
class Scenario:
    xml: str
    os: str
    profiles: list[str] = field(default_factory=list)
    host: Callable[[Host, Path], Host] | None = None


SCENARIOS = {
    "rhel5-forced-to-q35": Scenario(partial_domain("s", None, "q35", DISK), "rhel5.11"),
    "windows-explicit-virtio-disk": Scenario(
        partial_domain("s", None, None, DISK.replace("</disk>", "<target dev='vda' bus='virtio'/></disk>")), "win10"
    ),
    "secure-boot-without-loaders": Scenario(
        partial_domain("s", None, None, DISK),
        "fedora37",
        ["secure-boot"],
        lambda h, t: _strip(h, t, "no-secboot", "<value>yes</value>\n        <value>no</value>", "<value>no</value>"),
    ),
    "two-hard-profiles-pin-machines": Scenario(
        partial_domain("s", None, None, DISK), "fedora37", ["legacy-pc", "modern-q35"]
    ),
    "hyperv-features-missing-on-host": Scenario(
        partial_domain("s", None, None, DISK, "<features><hyperv><relaxed state='on'/></hyperv></features>"),
        "win10",
    ),
    "spice-missing-on-host": Scenario(
        partial_domain("s", None, None, DISK),
        "fedora37",
        ["desktop-spice"],
        lambda h, t: _strip(h, t, "no-spice", "<value>spice</value>"),
    ),
    "winxp-explicit-sata": Scenario(
        partial_domain("s", None, None, DISK.replace("</disk>", "<target dev='sda' bus='sata'/></disk>")), "winxp"
    ),
    "five-ide-disks-on-pc": Scenario(
        partial_domain(
            "s",
            None,
            "pc",
            "".join(
                f"<disk type='file' device='disk'><source file='/d{i}'/><target bus='ide'/></disk>" for i in range(5)
            ),
        ),
        "fedora37",
    ),
    "vcpus-beyond-pc-maximum": Scenario(
        partial_domain("s", None, "pc", DISK).replace("<vcpu>1</vcpu>", "<vcpu>300</vcpu>"), "fedora37"
    ),
    "unknown-machine-version": Scenario(partial_domain("s", None, "pc-q35-99.0", DISK), "fedora37"),
    "migration-safe-vs-host-passthrough": Scenario(
        partial_domain("s", None, None, DISK, "<cpu mode='host-passthrough'/>"), "fedora37", ["migration-safe"]
    ),
    "tpm-without-emulator": Scenario(
        partial_domain("s", None, None, DISK),
        "fedora37",
        ["windows-11"],
        lambda h, t: _strip(h, t, "no-swtpm", "<value>emulator</value>"),
    ),
    "three-independent-conflicts": Scenario(
        partial_domain(
            "s",
            None,
            "q35",
            "<disk type='file' device='cdrom'><target dev='hda' bus='ide'/></disk>"
            "<interface type='user'><model type='virtio-non-transitional'/></interface>",
        ),
        "rhel5.11",
    ),
    "numa-node-on-a-one-cell-guest": Scenario(
        partial_domain(
            "s", None, None, NIC, "<cpu><numa><cell id='0' cpus='0' memory='512' unit='MiB'/></numa></cpu>"
        ).replace(
            "<vcpu>1</vcpu>",
            f"<vcpu>1</vcpu><metadata><virtpolicy:numa xmlns:virtpolicy='{VP}'><virtpolicy:device "
            "xpath='/domain/devices/interface[1]' node='1' policy='required'/></virtpolicy:numa></metadata>",
        ),
        "fedora37",
    ),
    "hostdev-on-a-host-node-without-guest-cells": Scenario(
        partial_domain(
            "s",
            None,
            "q35",
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/></source></hostdev>",
            "<cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB'/>"
            "<cell id='1' cpus='1' memory='256' unit='MiB'/></numa></cpu>",
        )
        .replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")
        .replace(
            "<os>",
            "<numatune><memnode cellid='0' mode='strict' nodeset='0'/>"
            "<memnode cellid='1' mode='strict' nodeset='1'/></numatune><os>",
        ),
        "fedora37",
        host=lambda h, t: four_node_host(t),
    ),
}


def _built(name: str, host: Host, osdb, tmp: Path) -> Build:  # type: ignore[no-untyped-def]
    sc = SCENARIOS[name]
    chosen_host = sc.host(host, tmp) if sc.host else host
    domain = Domain.from_bytes(sc.xml.encode(), name)
    selected = [SelectedProfile(find_profile(p), 0, "--profile") for p in sc.profiles]
    return build(domain, chosen_host, osdb.lookup(sc.os), profiles=selected, device_names=osdb.device_names())


def _normalise(report: dict) -> dict:
    """What a golden file pins: the conflicts, background and corrections, free of machine-local paths."""
    text = json.dumps(
        {k: report[k] for k in ("status", "complete", "conflicts", "background", "corrections")}, sort_keys=True
    )
    text = text.replace(str(REPO), "<repo>")
    return json.loads(text)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_conflicts_are_minimal_corrections_work_and_report_matches_golden(
    name: str, host, osdb, tmp_path: Path
) -> None:
    built = _built(name, host, osdb, tmp_path)
    result = Solver(built.problem).solve()
    assert isinstance(result, Conflict), f"{name} should be infeasible"
    explainer = ConflictExplainer(built.problem)
    explanation = explainer.explain(10)
    assert explanation.complete
    structural = [c for c in built.problem.constraints if c.is_hard and c.provenance.source is Source.STRUCTURAL]
    hard = [c for c in built.problem.constraints if c.is_hard and c.provenance.source is not Source.STRUCTURAL]
    for mus in explanation.conflicts:
        assert not explainer.solver.consistent(structural + mus), f"{name}: a reported set is not a conflict"
        for member in mus:
            rest = [m for m in mus if m is not member]
            assert explainer.solver.consistent(structural + rest), f"{name}: not minimal without {member.id}"
    assert explanation.corrections
    for correction in explanation.corrections:
        kept = [c for c in hard if c not in correction.members]
        assert explainer.solver.consistent(structural + kept), f"{name}: correction {correction.actions} fails"
        for member in correction.members:  # and no member is superfluous
            fewer = [c for c in hard if c not in correction.members or c is member]
            assert not explainer.solver.consistent(structural + fewer), f"{name}: correction not minimal"
    costs = [k.cost for k in explanation.corrections]
    assert costs == sorted(costs)
    report = _normalise(build_report(built, result, 10))
    golden = GOLDEN / f"{name}.json"
    if os.environ.get("VIRTPOLICY_REGEN_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    assert golden.exists(), f"missing {golden}; run with VIRTPOLICY_REGEN_GOLDEN=1"
    assert report == json.loads(golden.read_text())


def test_every_provenance_kind_appears_in_the_golden_reports() -> None:
    kinds = set()
    for golden in GOLDEN.glob("*.json"):
        data = json.loads(golden.read_text())
        for conflict in data["conflicts"]:
            kinds |= {m["provenance"]["kind"] for m in conflict["members"]}
        kinds |= {b["provenance"]["kind"] for b in data["background"]}
    assert {"app", "profile", "guest", "host", "structural"} <= kinds


def test_three_conflicts_are_all_found(host, osdb, tmp_path: Path) -> None:
    built = _built("three-independent-conflicts", host, osdb, tmp_path)
    explanation = ConflictExplainer(built.problem).explain(10)
    assert len(explanation.conflicts) == 3
    capped = ConflictExplainer(built.problem).explain(2)
    assert len(capped.conflicts) == 2 and not capped.complete


def test_corrections_drop_profiles_before_the_apps_xml(host, osdb, tmp_path: Path) -> None:
    xml = partial_domain("s", None, "pc", DISK)
    domain = Domain.from_bytes(xml.encode(), "s")
    built = build(domain, host, osdb.lookup("fedora37"), profiles=[SelectedProfile(find_profile("modern-q35"), 0, "x")])
    explanation = ConflictExplainer(built.problem).explain()
    first, last = explanation.corrections[0], explanation.corrections[-1]
    assert first.members[0].provenance.source is Source.PROFILE
    assert first.actions[0].startswith("drop profile modern-q35")
    assert last.members[0].provenance.source is Source.APP
    assert "would fit: q35" in last.actions[0]


def test_feasible_explanation_says_why_for_every_value(host, osdb) -> None:
    xml = partial_domain("r6", "http://redhat.com/rhel/6.10", "q35", DISK + NIC)
    built = build(Domain.from_bytes(xml.encode(), "r6"), host, osdb.lookup("rhel6.10"))
    result = Solver(built.problem).solve()
    report = build_report(built, result, 10)
    assert report["status"] == "solved"
    by_var = {d["variable"]: d for d in report["decisions"]}
    assert set(by_var) == set(built.problem.variables)
    model = by_var["disk[0].model"]
    assert model["value"] == "virtio-transitional"
    plain = next(e for e in model["excluded"] if e["value"] == "virtio")
    assert plain["impossible"]
    assert any(
        b["provenance"]["kind"] == "guest" and "http://pcisig.com/pci/1af4/1042" in b["provenance"]["device_ids"]
        for b in plain["by"]
    )
    for d in report["decisions"]:
        for e in d["excluded"]:
            assert e["by"] or not e["impossible"], (d["variable"], e)
    overridden = {o["preference"]["id"] for o in report["overridden_preferences"]}
    assert "engine.disk-model:disk[0].model=virtio" in overridden


def test_text_report_is_coloured_only_for_terminals(host, osdb, tmp_path: Path) -> None:
    built = _built("rhel5-forced-to-q35", host, osdb, tmp_path)
    report = build_report(built, Solver(built.problem).solve(), 10)
    assert "\033[" in to_text(report, colour=True)
    plain = to_text(report, colour=False)
    assert "\033[" not in plain
    assert "domain XML /domain/os/type/@machine = 'q35'" in plain
    assert "would fit: pc" in plain


def test_cli_explain_exit_codes_and_solve_points_at_it(tmp_path: Path) -> None:
    conflict = REPO / "examples" / "rhel5-on-q35-conflict.xml"
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "explain", str(conflict), "--format", "json"],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 2
    assert json.loads(done.stdout)["schema"] == "virtpolicy-explain/1"
    solved = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "solve", str(conflict)],
        capture_output=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert solved.returncode == 2 and b"'virtpolicy explain'" in solved.stderr


@needs_chromium
def test_html_report_renders_the_conflict_graph_in_a_real_browser(host, osdb, tmp_path: Path) -> None:
    built = _built("three-independent-conflicts", host, osdb, tmp_path)
    page = to_html(build_report(built, Solver(built.problem).solve(), 10))
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "").split("<body>")[0]  # no fetches
    assert "<script" not in page and "src=" not in page
    pixels = screenshot_colours(page, tmp_path)

    # the graph's nodes: the app's requirements in red, osinfo's in green, the host's in orange, big circles
    assert pixels("#d62728") > 3000, "no app nodes drawn"
    assert pixels("#2ca02c") > 3000, "no guest nodes drawn"
    assert pixels("#ff7f0e") > 1500, "no host nodes drawn"
