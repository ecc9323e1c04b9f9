"""Helpers shared by the engine tests: writing partial domains and running the pipeline in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest
from lxml import etree

from virtpolicy.core.problem import Constraint, Source
from virtpolicy.core.solve import Conflict, Solution, Solver
from virtpolicy.engine import Engine
from virtpolicy.inputs.domain import Domain, Explicit
from virtpolicy.inputs.guestos import OsinfoDB
from virtpolicy.inputs.host import EMBEDDED_BUNDLE, Host, load_host_bundle
from virtpolicy.sources.build import DECLARE, Builder
from virtpolicy.sources.context import Build, BuildContext, SelectedProfile

LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
REPO = Path(__file__).resolve().parents[1]


def cli(
    *args: str, stdin: bytes | None = None, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """The real command line, as an operator runs it (PYTHONPATH keeps this checkout when cwd moves)."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", *args],
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        input=stdin,
        env=environ,
        check=False,
    )


def partial_domain(name: str, os_id: str | None, machine: str | None, devices: str, extra: str = "") -> str:
    """A partial domain as a management app would write it: only what it cares about."""
    machine_attr = f" machine={quoteattr(machine)}" if machine else ""
    metadata = (
        f'<metadata><libosinfo:libosinfo xmlns:libosinfo="{LIBOSINFO}">'
        f"<libosinfo:os id={quoteattr(os_id)}/></libosinfo:libosinfo></metadata>"
        if os_id
        else ""
    )
    return (
        f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>{metadata}"
        f"<os><type arch='x86_64'{machine_attr}>hvm</type></os>{extra}<devices>{devices}</devices></domain>"
    )


@dataclass
class Outcome:
    built: Build
    result: Solution | Conflict
    xml: bytes | None

    @property
    def solved(self) -> bool:
        return isinstance(self.result, Solution)

    def value(self, variable: str) -> str:
        assert isinstance(self.result, Solution), self.describe()
        return self.result.assignment[variable]

    def describe(self) -> str:
        if isinstance(self.result, Conflict):
            return "conflict: " + "; ".join(f"{m.id}: {m.message}" for m in self.result.members)
        return "solved"


_ENGINES: dict[tuple[int, int], Engine] = {}


def engine_for(host: Host, osdb: OsinfoDB) -> Engine:
    """One Engine per (host, osinfo-db) pair, as a service would hold it."""
    key = (id(host), id(osdb))
    if key not in _ENGINES:
        _ENGINES[key] = Engine(host, osinfo_db=osdb)
    return _ENGINES[key]


def run(xml: str | bytes, host: Host, osdb: OsinfoDB, os_key: str | None = None, **kwargs: object) -> Outcome:
    """A solve through the public Engine (the CLI's pipeline); the OS defaults to the metadata or generic."""
    data = xml.encode() if isinstance(xml, str) else xml
    key = os_key or (Domain.from_bytes(data, "<test>").os_id or Explicit("generic", "")).value
    result = engine_for(host, osdb).solve(data, source="<test>", os=key, **kwargs)  # type: ignore[arg-type]
    return Outcome(result.build, result.outcome, result.xml_bytes)


def assert_minimal(outcome: Outcome, only_conflict: bool = False) -> None:
    """The reported set is a real conflict and a minimal one: without any one member, the rest can hold.

    With `only_conflict`, also: the whole problem without that member is feasible (the case has one conflict).
    """
    assert isinstance(outcome.result, Conflict)
    members = outcome.result.members
    assert members, "a conflict must name at least one requirement"
    problem = outcome.built.problem
    solver = Solver(problem)
    structural = [c for c in problem.constraints if c.provenance.source is Source.STRUCTURAL]
    assert not solver.consistent(members + structural), "the reported set alone is not a conflict"
    hard_only = problem.without(c.id for c in problem.constraints if not c.is_hard)
    for member in members:
        rest = [m for m in members if m is not member]
        assert solver.consistent(rest + structural), f"set not minimal: without {member.id} it still conflicts"
        if only_conflict:
            relaxed = hard_only.without([member.id])
            assert isinstance(Solver(relaxed).solve(), Solution), f"dropping {member.id} leaves the problem infeasible"


def four_node_host(tmp: Path) -> Host:
    """A two-socket, four-cell host: the embedded bundle with tests/data/hosts/x86_64-4node's NUMA topology
    spliced into its capabilities and that server's PCI devices as its nodedev data."""
    fixture = Path(__file__).parent / "data" / "hosts" / "x86_64-4node"
    bundle = tmp / "x86_64-4node"
    bundle.mkdir(exist_ok=True)
    for domcaps in EMBEDDED_BUNDLE.glob("domcaps-*.xml"):
        shutil.copy(domcaps, bundle / domcaps.name)
    shutil.copy(fixture / "nodedev-pci.xml", bundle / "nodedev-pci.xml")
    caps = etree.parse(str(EMBEDDED_BUNDLE / "capabilities.xml"))
    old = caps.find("host/topology")
    old.getparent().replace(old, etree.parse(str(fixture / "topology.xml")).getroot())
    caps.write(str(bundle / "capabilities.xml"))
    return load_host_bundle(bundle)


CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian chromium not installed (scripts/setup.sh test installs it)",
)


def screenshot_colours(page: str, workdir: Path, size: str = "1100,900") -> Callable[[str], int]:
    """Render a self-contained page in headless Chromium; returns pixels('#rrggbb') -> how many there are.

    CI must have Chromium (the test set-up installs it): there a missing browser fails instead of skipping.
    """
    from PIL import Image

    assert CHROMIUM, "CI must have chromium (scripts/setup.sh test)"
    html_file = workdir / "report.html"
    html_file.write_text(page)
    shot = workdir / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={workdir / 'profile'}",
            f"--window-size={size}",
            f"--screenshot={shot}",
            html_file.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    counts = {rgb: n for n, rgb in (Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20) or [])}

    def pixels(hex_colour: str) -> int:
        return counts.get(tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)), 0)

    return pixels


def assert_self_contained(page: str) -> None:
    """A report page that runs nothing and fetches nothing: no script or embedded resources, no URL in any
    attribute but the SVG namespace."""
    import lxml.html

    doc = lxml.html.document_fromstring(page)
    assert not doc.xpath("//script | //iframe | //link | //img | //object | //embed")
    assert "<script" not in page and "src=" not in page and "url(" not in page and "@import" not in page
    for element in doc.iter():
        for name, value in element.attrib.items():
            if name != "xmlns":
                assert "http://" not in value and "https://" not in value, (element.tag, name, value)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "").split("<body>")[0]


def one_source(
    xml: str,
    source: str,
    host: Host,
    osdb: OsinfoDB,
    os_key: str = "generic",
    profiles: tuple[str, ...] = (),
    phase: str = "constrain",
    guest_support: str = "strict",
) -> tuple[BuildContext, list[Constraint]]:
    """Every source declares its variables, then only `source` runs `phase`: what that source adds alone.

    The per-source tests (tests/sources/) read a source's output in isolation this way; the end-to-end
    suites read the whole pipeline through the Engine."""
    engine = engine_for(host, osdb)
    domain = Domain.from_bytes(xml.encode(), "<test>")
    selected = [SelectedProfile(engine.profile(p), 0, "--profile") for p in profiles]
    builder = Builder(BuildContext(domain, host, osdb.lookup(os_key), guest_support, selected, osdb.device_names()))
    for name in DECLARE:
        builder.sources[name].declare()
    before = len(builder.ctx.problem.constraints)
    getattr(builder.sources[source], phase)()
    return builder.ctx, builder.ctx.problem.constraints[before:]


def plan_migrate_json(domain: bytes, *args: str) -> dict:  # type: ignore[type-arg]
    """`virtpolicy plan migrate - --format json ARGS` on a domain; exit 0 (can migrate) or 2 (cannot)."""
    proc = cli("plan", "migrate", "-", "--format", "json", *args, stdin=domain)
    assert proc.returncode in (0, 2), proc.stderr
    return json.loads(proc.stdout)
