"""Helpers shared by the engine tests: writing partial domains and running the pipeline in-process."""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from virtpolicy.models.domain import Domain
from virtpolicy.models.guestos import GuestOS, OsinfoDB
from virtpolicy.models.host import Host
from virtpolicy.solver.build import Build, build
from virtpolicy.solver.problem import Source
from virtpolicy.solver.render import render, to_bytes
from virtpolicy.solver.solve import Conflict, Solution, Solver

LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"


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
