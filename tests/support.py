"""Helpers shared by the engine tests: writing partial domains and running the pipeline in-process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from lxml import etree

from virtpolicy.models.domain import Domain
from virtpolicy.models.guestos import GuestOS, OsinfoDB
from virtpolicy.models.host import EMBEDDED_BUNDLE, Host, load_host_bundle
from virtpolicy.solver.build import Build, build
from virtpolicy.solver.problem import Source
from virtpolicy.solver.render import render, to_bytes
from virtpolicy.solver.solve import Conflict, Solution, Solver

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


def run(xml: str | bytes, host: Host, osdb: OsinfoDB, os_key: str | None = None, **kwargs: object) -> Outcome:
    data = xml.encode() if isinstance(xml, str) else xml
    domain = Domain.from_bytes(data, "<test>")
    key = os_key or (domain.os_id.value if domain.os_id else "generic")
    guest: GuestOS = osdb.lookup(key)
    built = build(domain, host, guest, **kwargs)
    result = Solver(built.problem).solve()
    out = to_bytes(render(built, result)) if isinstance(result, Solution) else None
    return Outcome(built, result, out)


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
