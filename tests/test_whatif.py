"""What-if combinations against brute force: the minimal infeasible profile sets, their upward closure
and the counts are exactly what solving every subset with Engine.solve gives, and every reported
conflict is real and minimal."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from support import cli

from virtpolicy import Engine
from virtpolicy.core.problem import Source
from virtpolicy.core.solve import Solver
from virtpolicy.inputs.host import EMBEDDED_BUNDLE
from virtpolicy.whatif.combinations import DEFAULT_DOMAIN, _count, analyse_cell, count_upward_closure

SHIPPED_EIGHT = (
    "legacy-pc",
    "modern-q35",
    "secure-boot",
    "desktop-spice",
    "headless-server",
    "windows",  # declares driver packs: the one non-monotone kind of profile
    "virtio-everywhere",  # declares drivers too
    "windows-11",
)
OSES = ("fedora37", "win10", "rhel6.10")
HOSTS = {"full": EMBEDDED_BUNDLE, "pc-only": EMBEDDED_BUNDLE / "domcaps-x86_64-pc-kvm.xml"}

# three profiles that clash only all together: every pair leaves one graphics type
TRIANGLE = {
    "tri-a": ["spice", "vnc"],
    "tri-b": ["vnc", "none"],
    "tri-c": ["spice", "none"],
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(HOSTS)


def _brute_force(engine: Engine, names: tuple[str, ...], os: str, host: str) -> set[frozenset[str]]:
    infeasible = set()
    for k in range(len(names) + 1):
        for subset in itertools.combinations(names, k):
            if not engine.solve(DEFAULT_DOMAIN, profiles=subset, os=os, host=host).feasible:
                infeasible.add(frozenset(subset))
    return infeasible


@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("os", OSES)
def test_minimal_infeasible_sets_are_what_brute_force_finds(engine: Engine, os: str, host: str) -> None:
    cell = analyse_cell(engine, DEFAULT_DOMAIN, SHIPPED_EIGHT, os, host)
    brute = _brute_force(engine, SHIPPED_EIGHT, os, host)
    minimal = {s for s in brute if not any(o < s for o in brute)}
    assert {frozenset(m.profiles) for m in cell.minimal_infeasible} == minimal
    assert cell.infeasible_count == len(brute)
    assert cell.total == 2 ** len(SHIPPED_EIGHT)
    for m in cell.minimal_infeasible:
        supersets = [s for s in brute if frozenset(m.profiles) <= s]
        assert m.supersets == len(supersets)
        assert m.conflict, f"{m.profiles}: no rule-level conflict"
    assert set(cell.dead) == {next(iter(s)) for s in minimal if len(s) == 1}


def test_reported_conflicts_are_real_and_minimal(engine: Engine) -> None:
    cell = analyse_cell(engine, DEFAULT_DOMAIN, SHIPPED_EIGHT, "fedora37", "full")
    assert cell.minimal_infeasible
    for m in cell.minimal_infeasible:
        build = engine.build(DEFAULT_DOMAIN, profiles=m.profiles, os="fedora37", host="full")
        by_id = {c.id: c for c in build.problem.constraints}
        members = [by_id[r.id] for r in m.conflict]
        structural = [c for c in build.problem.constraints if c.provenance.source is Source.STRUCTURAL]
        solver = Solver(build.problem)
        assert not solver.consistent(members + structural), m.profiles
        for member in members:
            rest = [c for c in members if c is not member]
            assert solver.consistent(rest + structural), f"{m.profiles}: not minimal without {member.id}"
        kinds = {r.kind for r in m.conflict}
        assert "profile" in kinds, m.conflict


def _triangle_library(tmp_path: Path) -> Path:
    for name, allowed in TRIANGLE.items():
        values = ", ".join(f'"{v}"' for v in allowed)
        (tmp_path / f"{name}.toml").write_text(
            f'name = "{name}"\nversion = "1.0"\ndescription = "one of three graphics types"\n\n'
            f'[[rule]]\nid = "graphics"\nrequire = {{ "graphics.type" = [{values}] }}\nstrength = "hard"\n'
        )
    return tmp_path


def test_a_three_way_clash_is_one_minimal_set_of_three(tmp_path: Path) -> None:
    engine = Engine(profile_path=[_triangle_library(tmp_path)])
    names = (*TRIANGLE, "legacy-pc", "modern-q35")
    cell = analyse_cell(engine, DEFAULT_DOMAIN, names, "fedora37")
    assert sorted(m.profiles for m in cell.minimal_infeasible) == [("legacy-pc", "modern-q35"), tuple(TRIANGLE)]
    brute = _brute_force(engine, names, "fedora37", next(iter(engine.hosts)))
    assert cell.infeasible_count == len(brute) == 8 + 4 - 1  # supersets of each (8, 4) less the one of both
    triangle = next(m for m in cell.minimal_infeasible if len(m.profiles) == 3)
    assert {r.provenance["profile"] for r in triangle.conflict} == set(TRIANGLE)


def test_counting_is_exact_without_enumeration() -> None:
    n = 40
    family = [0b11, 0b1100, 0b110000 | 1 << 39, 1 << 20]
    expected = 0
    # inclusion-exclusion over the 4 sets, as an independent check of the Shannon expansion
    for k in range(1, len(family) + 1):
        for chosen in itertools.combinations(family, k):
            union = 0
            for m in chosen:
                union |= m
            expected += (-1) ** (k + 1) * 2 ** (n - bin(union).count("1"))
    assert count_upward_closure(family, n) == expected
    assert _count(frozenset({0}), 0b111) == 8
    assert count_upward_closure([], 5) == 0


def test_influence_interactions_and_rules(engine: Engine) -> None:
    cell = analyse_cell(engine, DEFAULT_DOMAIN, ("legacy-pc", "headless-server", "migration-safe"), "fedora37")
    assert cell.influence["legacy-pc"]["machine"] == ("q35", "pc")
    assert cell.influence["migration-safe"]["cpu.mode"][1] == "host-model"
    assert cell.influence["headless-server"]["graphics.type"][1] == "none"
    assert cell.rule_fired["headless-server:no-graphics"]


def test_cli_json_across_cells_and_hosts(tmp_path: Path) -> None:
    proc = cli(
        "whatif", "combinations", "--profile", "legacy-pc", "--profile", "modern-q35", "--profile", "secure-boot",
        "--os", "fedora37", "--os", "win10", "--host", str(EMBEDDED_BUNDLE),
        "--host", str(HOSTS["pc-only"]), "--format", "json", "--workers", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["schema"] == "virtpolicy-whatif/1"
    assert [(c["host"], c["os"]) for c in report["cells"]] == [
        ("x86_64-kvm-qemu7.2", "fedora37"),
        ("x86_64-kvm-qemu7.2", "win10"),
        ("domcaps-x86_64-pc-kvm.xml", "fedora37"),
        ("domcaps-x86_64-pc-kvm.xml", "win10"),
    ]
    pc_only = report["cells"][2]
    assert ["modern-q35"] in [m["profiles"] for m in pc_only["minimal_infeasible"]]  # no q35 on that host
    assert "modern-q35" in pc_only["dead"]
    again = cli(
        "whatif", "combinations", "--profile", "legacy-pc", "--profile", "modern-q35", "--profile", "secure-boot",
        "--os", "fedora37", "--os", "win10", "--host", str(EMBEDDED_BUNDLE),
        "--host", str(HOSTS["pc-only"]), "--format", "json", "--workers", "1",
    )  # fmt: skip
    assert again.stdout == proc.stdout, "worker processes and in-process runs must give the same bytes"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--profile", "no-such-profile"), "unknown profile 'no-such-profile'"),
        (("--os", "nosuchos"), "unknown guest OS 'nosuchos'"),
        (("--workers", "-1"), "--workers -1"),
        (("/nonexistent.xml",), "/nonexistent.xml"),
    ],
)
def test_cli_bad_input_is_one_line(args: tuple[str, ...], needle: str) -> None:
    proc = cli("whatif", "combinations", "--profile", "legacy-pc", *args)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.decode().strip()
    assert needle in line and "\n" not in line and "internal error" not in line, line


def test_golden_report_of_the_shipped_library() -> None:
    """The default run: every shipped profile, a modern Linux, an old Linux and a Windows guest, the
    embedded host (regenerate after an intended change with VIRTPOLICY_REGEN_GOLDEN=1)."""
    import os

    from support import REPO

    proc = cli("whatif", "combinations", "--format", "json", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode().replace(str(REPO), "REPO")
    golden = REPO / "tests" / "golden" / "whatif" / "combinations-shipped-library.json"
    if os.environ.get("VIRTPOLICY_REGEN_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    report = json.loads(text)
    assert [c["os"] for c in report["cells"]] == ["fedora37", "rhel6.10", "win10"]
    pairs = {tuple(p["profiles"]) for p in report["summary"]["infeasible_pairs"]}
    assert ("legacy-pc", "modern-q35") in pairs and ("desktop-spice", "headless-server") in pairs
