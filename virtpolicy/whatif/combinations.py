"""Which profile combinations can never be selected together, and what each profile changes.

For one cell (a domain template, a guest OS, a host) and n optional profiles, the 2^n selections are
never solved one by one. Hard profile rules only add constraints, so infeasibility is upward closed:
the infeasible selections are exactly the supersets of the *minimal infeasible combinations*. Those are
enumerated MARCO-style at profile level (seed, then shrink an infeasible seed to a minimal infeasible
set or grow a feasible one to a maximal feasible set, until every selection is covered by one of them),
each feasibility question being a consistency check over the problem built once with every profile;
the number of infeasible selections is then counted exactly from the minimal sets (Shannon expansion,
not enumeration).

One exception to "only add": a profile that declares driver packs (virtio-win) extends what the guest
drives, which removes guest constraints. Such profiles split the space into slices, one per subset of
them, each built with its own guest; within a slice the argument above holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from virtpolicy.core.problem import Constraint, Problem, Source
from virtpolicy.core.solve import Conflict, Solution, Solver
from virtpolicy.profiles.expr import ExprError
from virtpolicy.results import Requirement

if TYPE_CHECKING:
    from virtpolicy.engine import Engine, XmlInput
    from virtpolicy.profiles.model import Profile
    from virtpolicy.sources.context import Build

DEFAULT_DOMAIN = b"""<domain type='kvm'><name>whatif</name><memory unit='MiB'>2048</memory><vcpu>2</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><source file='/var/lib/libvirt/images/whatif.qcow2'/></disk>
<interface type='network'><source network='default'/></interface></devices></domain>"""
MAX_PROFILES = 30  # 2^30 selections are still counted exactly; more would make the report unreadable


@dataclass(frozen=True)
class MinimalInfeasible:
    """A smallest set of profiles that cannot be selected together, and why, at rule level."""

    profiles: tuple[str, ...]
    conflict: tuple[Requirement, ...]  # a minimal conflicting set of requirements
    supersets: int  # selections that contain this set (each of them infeasible)
    background: tuple[Requirement, ...] = ()  # the libvirt/QEMU facts the conflict relies on

    def to_dict(self) -> dict[str, Any]:
        return {
            "profiles": list(self.profiles),
            "conflict": [r.to_dict() for r in self.conflict],
            "background": [r.to_dict() for r in self.background],
            "infeasible_selections": self.supersets,
        }


@dataclass
class CellAnalysis:
    """The answer for one (domain, OS, host) cell."""

    os: str
    host: str
    profiles: tuple[str, ...]
    total: int
    infeasible_count: int
    minimal_infeasible: list[MinimalInfeasible]
    dead: list[str]  # infeasible alone
    base_feasible: bool
    influence: dict[str, dict[str, tuple[str, str]]]  # profile -> variable -> (base value, value with it)
    interactions: list[dict[str, Any]]  # pairs whose joint result is not what each does alone
    redundant: list[dict[str, Any]]  # pairs where one adds nothing to the other
    overridden: list[str]  # profiles every one of whose preferences lost, deciding nothing
    rule_fired: dict[str, bool] = field(default_factory=dict)  # "profile:rule" -> fired in some solve here
    checks: int = 0  # consistency checks made

    def to_dict(self) -> dict[str, Any]:
        return {
            "os": self.os,
            "host": self.host,
            "profiles": list(self.profiles),
            "total": self.total,
            "infeasible_count": self.infeasible_count,
            "base_feasible": self.base_feasible,
            "minimal_infeasible": [m.to_dict() for m in self.minimal_infeasible],
            "dead": self.dead,
            "always_overridden": self.overridden,
            "influence": {
                p: [{"variable": v, "base": b, "with": w} for v, (b, w) in sorted(changes.items())]
                for p, changes in self.influence.items()
            },
            "interactions": self.interactions,
            "redundant": self.redundant,
            "rules_fired": dict(sorted(self.rule_fired.items())),
            "consistency_checks": self.checks,
        }


def count_upward_closure(minimal: Iterable[int], n: int) -> int:
    """How many of the 2^n subsets contain at least one of the given sets (bitmasks over n elements)."""
    family = frozenset(minimal)
    return _count(family, (1 << n) - 1)


@cache
def _count(family: frozenset[int], free: int) -> int:
    if not family:
        return 0
    size = bin(free).count("1")
    if 0 in family:
        return 1 << size
    union = 0
    for m in family:
        union |= m
    untouched = bin(free & ~union).count("1")  # elements no set mentions: a factor of 2 each
    free &= union
    x = union & -union  # branch on the lowest element some set mentions
    without_x = frozenset(m for m in family if not m & x)
    with_x = frozenset(m & ~x for m in family)
    rest = free & ~x
    return (_count(without_x, rest) + _count(_minimal(with_x), rest)) << untouched


def _minimal(family: frozenset[int]) -> frozenset[int]:
    return frozenset(m for m in family if not any(o != m and o & m == o for o in family))


class _Slice:
    """The selections that share one subset of the driver-declaring profiles, over the other profiles."""

    def __init__(self, build: Build, names: Sequence[str], fixed: int) -> None:
        self.build = build
        self.names = names  # every optional profile, bit i = names[i]
        self.fixed = fixed  # the driver-declaring profiles selected in this slice (bitmask)
        self.solver = Solver(build.problem)
        by_profile: dict[str, list[Constraint]] = {n: [] for n in names}
        self.common: list[Constraint] = []
        for c in build.problem.constraints:
            owner = _owner(c)
            if owner in by_profile:
                by_profile[owner].append(c)
            else:
                self.common.append(c)
        self.of_profile = [by_profile[n] for n in names]
        self.hard_common = [c for c in self.common if c.is_hard]
        self._feasible: dict[int, bool] = {}

    def constraints(self, mask: int, hard_only: bool = True) -> list[Constraint]:
        chosen = [c for c in (self.hard_common if hard_only else self.common)]
        for i, cs in enumerate(self.of_profile):
            if mask >> i & 1:
                chosen += [c for c in cs if c.is_hard or not hard_only]
        return chosen

    def feasible(self, mask: int) -> bool:
        mask |= self.fixed
        if mask not in self._feasible:
            self._feasible[mask] = self.solver.consistent(self.constraints(mask))
        return self._feasible[mask]

    def solve(self, mask: int) -> Solution | Conflict:
        mask |= self.fixed
        keep = set(map(id, self.constraints(mask, hard_only=False)))
        problem = Problem(self.build.problem.variables, [c for c in self.build.problem.constraints if id(c) in keep])
        return _ValuesOnly(problem).solve()


class _ValuesOnly(Solver):
    """What-if compares values; why each value was chosen (the per-decision explanation) is not needed."""

    def _decisions(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}


def _owner(c: Constraint) -> str | None:
    if c.provenance.source is not Source.PROFILE:
        return None
    return dict(c.provenance.data).get("profile")  # type: ignore[return-value]


def enumerate_minimal_infeasible(feasible: Any, free: int, n: int) -> tuple[list[int], int]:
    """MARCO over the `free` bits: every minimal infeasible mask, and how many checks it took.

    `feasible(mask)` must be monotone: a superset of an infeasible mask is infeasible.
    """
    mus: list[int] = []
    mss: list[int] = []
    checks = 0
    while True:
        seed = _seed(mus, mss, free, n)
        if seed is None:
            return sorted(mus, key=lambda m: (bin(m).count("1"), m)), checks
        checks += 1
        if feasible(seed):
            grown = seed
            for i in range(n):  # grow to a maximal feasible set
                bit = 1 << i
                if free & bit and not grown & bit and not any(m & (grown | bit) == m for m in mus):
                    checks += 1
                    if feasible(grown | bit):
                        grown |= bit
            mss.append(grown)
        else:
            core = seed
            for i in range(n):  # shrink to a minimal infeasible set (deletion)
                bit = 1 << i
                if core & bit:
                    checks += 1
                    if not feasible(core & ~bit):
                        core &= ~bit
            mus.append(core)


def _seed(mus: list[int], mss: list[int], free: int, n: int) -> int | None:
    """A mask containing no known minimal infeasible set and within no known maximal feasible one,
    the largest-first one a depth-first search meets (large seeds grow quickly); None when all are
    covered."""
    bits = [1 << i for i in range(n) if free >> i & 1]
    suffix = [sum(bits[i:]) for i in range(len(bits) + 1)]

    def search(i: int, mask: int) -> int | None:
        if any(m & mask == m for m in mus):
            return None
        if any((mask | suffix[i]) & ~s == 0 for s in mss):
            return None  # whatever is added below stays inside a known feasible set
        if i == len(bits):
            return mask
        found = search(i + 1, mask | bits[i])
        return found if found is not None else search(i + 1, mask)

    return search(0, 0)


def analyse_cell(
    engine: Engine,
    domain: XmlInput,
    profiles: Sequence[str | Profile],
    os: str,
    host: str | None = None,
    guest_support: str = "strict",
) -> CellAnalysis:
    """Every answer `whatif combinations` gives for one (domain, OS, host) cell."""
    loaded = [p if not isinstance(p, str) else engine.profile(p) for p in profiles]
    names = [p.name for p in loaded]
    if len(set(names)) != len(names):
        raise ValueError("whatif: a profile is named twice")
    n = len(names)
    drivers = [i for i, p in enumerate(loaded) if any(r.drivers for r in p.rules)]
    others = [i for i in range(n) if i not in drivers]
    free = sum(1 << i for i in others)
    slices: dict[int, _Slice] = {}
    for k in range(len(drivers) + 1):
        for chosen in itertools.combinations(drivers, k):
            fixed = sum(1 << i for i in chosen)
            selection = [loaded[i] for i in others] + [loaded[i] for i in chosen]
            build = engine.build(domain, profiles=selection, os=os, guest_support=guest_support, host=host)
            slices[fixed] = _Slice(build, names, fixed)

    driver_bits = sum(1 << i for i in drivers)
    found_in: dict[int, list[int]] = {}
    checks = 0
    for fixed, sl in slices.items():
        found_in[fixed], used = enumerate_minimal_infeasible(sl.feasible, free, n)
        checks += used
    infeasible_count = sum(_count(frozenset(found), free) for found in found_in.values())
    candidates = {m | fixed for fixed, found in found_in.items() for m in found}
    minimal = sorted(
        (m for m in candidates if not any(o != m and o & m == o for o in candidates)),
        key=lambda m: (bin(m).count("1"), [names[i] for i in range(n) if m >> i & 1]),
    )
    base = slices[0]
    results: list[MinimalInfeasible] = []
    for m in minimal:
        outcome = slices[m & driver_bits].solve(m & free)
        members = tuple(Requirement.of(c) for c in outcome.members) if isinstance(outcome, Conflict) else ()
        background = tuple(Requirement.of(c) for c in outcome.background) if isinstance(outcome, Conflict) else ()
        chosen = tuple(names[i] for i in range(n) if m >> i & 1)
        inside = m & free
        supersets = sum(  # infeasible selections containing m, slice by slice (a driver pack may rescue some)
            _count(_minimal(frozenset(x & ~inside for x in found)), free & ~inside)
            for fixed, found in found_in.items()
            if fixed & m == m & driver_bits
        )
        results.append(MinimalInfeasible(chosen, members, supersets, background))

    alone: dict[str, Solution | Conflict] = {}
    base_outcome = base.solve(0)
    for i, name in enumerate(names):
        alone[name] = slices[(1 << i) if i in drivers else 0].solve(0 if i in drivers else 1 << i)
    dead = [name for name in names if not isinstance(alone[name], Solution)]
    influence: dict[str, dict[str, tuple[str, str]]] = {}
    base_values = base_outcome.assignment if isinstance(base_outcome, Solution) else {}
    for name in names:
        sol = alone[name]
        if isinstance(sol, Solution) and base_values:
            influence[name] = {
                v: (base_values.get(v, ""), val) for v, val in sol.assignment.items() if base_values.get(v) != val
            }
    interactions, redundant = _pairs(names, drivers, slices, base_values, influence, minimal)
    overridden = [
        name
        for name in names
        if name in influence
        and not influence[name]
        and isinstance(alone[name], Solution)
        and _all_preferences_lost(alone[name], name)
    ]
    fired = _rules_fired(loaded, slices, alone)
    return CellAnalysis(
        os=os,
        host=host or base.build.host.name,
        profiles=tuple(names),
        total=1 << n,
        infeasible_count=infeasible_count,
        minimal_infeasible=results,
        dead=dead,
        base_feasible=isinstance(base_outcome, Solution),
        influence=influence,
        interactions=interactions,
        redundant=redundant,
        overridden=overridden,
        rule_fired=fired,
        checks=checks,
    )


def _pair_outcome(i: int, j: int, drivers: Sequence[int], slices: dict[int, _Slice]) -> Solution | Conflict:
    fixed = sum(1 << k for k in (i, j) if k in drivers)
    rest = sum(1 << k for k in (i, j) if k not in drivers)
    return slices[fixed].solve(rest)


def _pairs(
    names: Sequence[str],
    drivers: Sequence[int],
    slices: dict[int, _Slice],
    base: dict[str, str],
    influence: dict[str, dict[str, tuple[str, str]]],
    infeasible: Sequence[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pairs whose joint decisions differ from the merge of what each decides alone, and pairs where one
    profile adds nothing to the other."""
    interactions: list[dict[str, Any]] = []
    redundant: list[dict[str, Any]] = []
    if not base:
        return interactions, redundant
    for i, j in itertools.combinations(range(len(names)), 2):
        a, b = names[i], names[j]
        if a not in influence or b not in influence:
            continue
        pair = 1 << i | 1 << j
        packs = sum(1 << k for k in drivers) & pair
        if any(m & pair == m and m & sum(1 << k for k in drivers) == packs for m in infeasible):
            continue  # known infeasible (same driver packs): a minimal infeasible combination, no solve needed
        joint = _pair_outcome(i, j, drivers, slices)
        if not isinstance(joint, Solution):
            continue  # an infeasible pair is reported as a minimal infeasible combination
        together = {v: val for v, val in joint.assignment.items() if base.get(v) != val}
        expected = {v: w for v, (_, w) in influence[a].items()}
        clash = {v for v, (_, w) in influence[b].items() if v in expected and expected[v] != w}
        expected.update({v: w for v, (_, w) in influence[b].items()})
        if together != expected or clash:
            differs = sorted(set(together) ^ set(expected) | {v for v in together if expected.get(v) != together[v]})
            interactions.append(
                {
                    "profiles": [a, b],
                    "variables": differs,
                    "joint": {v: together.get(v, base.get(v, "")) for v in differs},
                }
            )
        a_changes = {v: w for v, (_, w) in influence[a].items()}
        b_changes = {v: w for v, (_, w) in influence[b].items()}
        if a_changes and together == a_changes:
            redundant.append({"profiles": [a, b], "adds_nothing": b})
        elif b_changes and together == b_changes:
            redundant.append({"profiles": [a, b], "adds_nothing": a})
    return interactions, redundant


def _all_preferences_lost(solution: Solution, name: str) -> bool:
    mine = [d.constraint for d in solution.dropped if _owner(d.constraint) == name]
    kept = [c for c in solution.kept if _owner(c) == name]
    return bool(mine) and not kept


def _rules_fired(
    loaded: Sequence[Profile], slices: dict[int, _Slice], alone: dict[str, Solution | Conflict]
) -> dict[str, bool]:
    """A rule fires in a solve when its condition holds for that solve's facts and values."""
    fired: dict[str, bool] = {}
    facts = slices[0].build.facts
    for profile in loaded:
        outcome = alone[profile.name]
        values = outcome.assignment if isinstance(outcome, Solution) else {}
        for rule in profile.rules:
            key = f"{profile.name}:{rule.id}"
            if rule.when is None:
                fired[key] = True
                continue
            if facts is None:
                fired[key] = False
                continue
            try:
                holds = bool(
                    rule.when.evaluate(
                        lambda n, v=values: v[n] if n in v else facts.resolve(n),  # type: ignore[misc]
                        facts.functions(),
                    )
                )
            except (ExprError, KeyError):
                holds = False
            fired[key] = holds
    return fired


def cells(oses: Sequence[str], hosts: Sequence[str | None]) -> Iterator[tuple[str, str | None]]:
    for host in hosts:
        for os in oses:
            yield os, host
