"""Explanations: every minimal conflict, the smallest changes that restore feasibility, and why each value.

Minimal conflict sets (MUSes) are enumerated through hitting-set duality, in the spirit of MARCO and
CAMUS: given the MUSes found so far, remove a minimal hitting set of them; if the rest is still
infeasible, QuickXplain finds a new MUS in it (it cannot contain an old one, each of those lost a member);
when every minimal hitting set leaves a feasible problem, the hitting sets are exactly the minimal
correction sets (MCSes) and the MUS list is complete. Corrections are ranked so that dropping soft or
profile requirements comes before changing the app's own XML.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from virtpolicy.core.budget import BusBudget
from virtpolicy.core.problem import AtMost, Constraint, Forbid, Problem, Source
from virtpolicy.core.search import Tally
from virtpolicy.core.solve import Solver, without_gc

# what changing a requirement of each kind costs the user: profiles are cheap to drop, the app's own XML
# is its intent, and libvirt/QEMU facts cannot be changed at all
COST = {Source.PROFILE: 1, Source.GUEST: 3, Source.HOST: 5, Source.APP: 8, Source.ENGINE: 0}
MAX_HITTING_SETS = 5000
REPAIR_TRIES = 64  # combinations of one device's other variables tried before asking the solver
REPAIR_NODES = 2048  # values a repair search of one device may try
MAX_FOUND = 8  # solutions kept as further bases for repairs
SEARCH_STEPS = 20000  # values `find` may try to show a value possible before the yes/no search takes over


@dataclass
class Correction:
    """Drop (or change) these requirements together and the rest can hold."""

    members: list[Constraint]
    cost: int
    actions: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    conflicts: list[list[Constraint]]
    corrections: list[Correction]
    complete: bool  # False when --max-conflicts stopped the enumeration
    background: list[Constraint]


@dataclass
class Excluded:
    """A value a variable did not get, and what ruled it out."""

    value: str
    by: list[Constraint]
    hard: bool  # True: impossible with the hard requirements; False: a stronger preference won


@dataclass
class DecisionReason:
    variable: str
    value: str
    label: str
    decided_by: Constraint | None
    excluded: list[Excluded]


class ConflictExplainer:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.solver = Solver(problem)
        # each device's constraints prepared for repairs of a base solution, for the on_var index they came from
        self._touched: dict[tuple[int, tuple[str, ...]], _Plan] = {}
        self._touched_on: object = None
        hard = [c for c in problem.constraints if c.is_hard]
        self.background = [c for c in hard if c.provenance.source is Source.STRUCTURAL]
        self.candidates = sorted(
            (c for c in hard if c.provenance.source is not Source.STRUCTURAL), key=lambda c: len(c.variables)
        )

    def _feasible(self, constraints: list[Constraint]) -> bool:
        return self.solver.consistent(self.background + constraints)

    def _mus(self, constraints: list[Constraint]) -> list[Constraint]:
        return self.solver._quickxplain(self.background, [], constraints)  # noqa: SLF001

    def explain(self, max_conflicts: int = 10) -> Explanation:
        """Every minimal conflict (up to `max_conflicts`) and the corrections; see the module docstring."""
        with without_gc():
            return self._explain(max_conflicts)

    def _explain(self, max_conflicts: int = 10) -> Explanation:
        if self._feasible(self.candidates):
            return Explanation([], [], True, [])
        conflicts: list[list[Constraint]] = [self._mus(self.candidates)]
        complete = True
        while True:
            new = None
            for hitting in _minimal_hitting_sets(conflicts):
                rest = [c for c in self.candidates if c not in hitting]
                if not self._feasible(rest):
                    new = self._mus(rest)
                    break
            if new is None:
                break
            if len(conflicts) >= max_conflicts:
                complete = False
                break
            conflicts.append(new)
        corrections = [
            Correction(list(h), sum(_cost(c) for c in h))
            for h in _minimal_hitting_sets(conflicts)
            if complete or self._feasible([c for c in self.candidates if c not in h])
        ]
        corrections.sort(key=lambda k: (k.cost, len(k.members), [c.id for c in k.members]))
        for correction in corrections:
            correction.actions = self.phrase(correction)
        needed = {id(b): b for mus in conflicts for b in self._background_for(mus)}
        return Explanation(conflicts, corrections, complete, list(needed.values()))

    def phrase(self, correction: Correction) -> list[str]:
        """Each member of a correction as something the user can do, with what would be accepted."""
        rest = [c for c in self.candidates if c not in correction.members]
        return [self._action(c, rest) for c in correction.members]

    def _action(self, c: Constraint, rest: list[Constraint]) -> str:
        prov = dict(c.provenance.data)
        if c.provenance.source is Source.APP:
            var = c.variables[0]
            accepted = [
                v
                for v in self.problem.variables[var].values
                if c.holds(v) is False and self._feasible([*rest, _pin(var, v, self.problem)])
            ]
            shown = ", ".join(accepted) if accepted else "no value works while the other requirements stay"
            return f"change {prov.get('xpath', c.provenance.where)} (now '{prov.get('value', '')}'; would fit: {shown})"
        if c.provenance.source is Source.PROFILE:
            return (
                f"drop profile {prov.get('profile')} (or its rule '{prov.get('rule')}' at "
                f"{prov.get('file')}:{prov.get('line')})"
            )
        if c.provenance.source is Source.GUEST:
            ids = ", ".join(prov.get("device_ids", ()) or ())  # type: ignore[arg-type]
            if not _is_driver(c):
                return f"overrule osinfo ({c.message}) with --guest-support lenient, if you know better than osinfo-db"
            return (
                f"declare that {prov.get('short_id')} has drivers for {ids} (for Windows: profile 'windows' "
                "with <virtpolicy:guest drivers='virtio-win'/>), or solve with --guest-support lenient"
            )
        if "action" in prov:
            return str(prov["action"])
        if c.provenance.source is Source.HOST:
            return f"use a host that offers it ({c.message}; {c.provenance.where})"
        return f"relax: {c.message}"

    def decisions(
        self, witness: dict[str, str], decided_by: dict[str, Constraint | None], kept: list[Constraint]
    ) -> list[DecisionReason]:
        """See `_decisions`; without the cyclic garbage collector, as for a solve (`solve.without_gc`)."""
        with without_gc():
            return self._decisions(witness, decided_by, kept)

    def _decisions(
        self, witness: dict[str, str], decided_by: dict[str, Constraint | None], kept: list[Constraint]
    ) -> list[DecisionReason]:
        """For a feasible problem: why each variable has its value, and what excluded each other value.

        Each other value is first tried as a repair of the witness within its own device (`_repairable`):
        when that works the value is possible, exactly as a search would have found, at the cost of the
        device's few constraints instead of a solve of the whole domain per value. A value the repair cannot
        reach is judged on the device's neighbourhood first (`_Local`): what is impossible there is impossible
        in the whole domain, and its preferred minimal conflict is the whole domain's when a repair of the
        witness certifies it (`_certified`); a value a repair of two devices reaches is possible (a device
        takes a root port another one gives up). Only what none of that settles costs a search of the whole
        domain, which for a thousand devices was one search per device: quadratic.
        """
        hard = self.candidates
        on_var: dict[str, list[Constraint]] = {}
        for c in [*self.background, *hard]:
            for v in dict.fromkeys(c.variables):
                on_var.setdefault(v, []).append(c)
        device_of: dict[str, list[str]] = {}
        for name in self.problem.variables:
            device_of.setdefault(name.split(".")[0], []).append(name)
        local = _Local(self, on_var, device_of)
        found: list[dict[str, str]] = []  # solutions the searches below found: bases for later repairs
        _TALLIES.clear()  # counts per solution: nothing from an earlier call, whose dicts may have changed since
        reasons = []
        for name, var in self.problem.variables.items():
            excluded = []
            device = device_of[name.split(".")[0]]
            for value in var.values:
                if value == witness[name]:
                    continue
                wish = _pin(name, value, self.problem)
                blame = None
                if self._repairable(witness, name, value, device, on_var):
                    possible = True
                else:
                    possible, blame = local.judge(witness, name, value, wish)
                if possible is None and any(self._repairable(s, name, value, device, on_var) for s in found):
                    possible = True  # another solution repairs as well as the witness (disk[1] on IDE as disk[0])
                if possible is None:
                    solution = self.solver.search([*self.background, *hard, wish], SEARCH_STEPS)
                    if solution is not None:
                        possible = bool(solution)
                        if solution and len(found) < MAX_FOUND:
                            found.append(solution)
                if possible is None:
                    # the witness with just this value changed often proves the value possible without a search
                    self.solver.hints = [{**witness, name: value}]
                    possible = self._feasible([*hard, wish])
                    self.solver.hints = []
                if possible:
                    by = [decided_by[name]] if decided_by.get(name) is not None else []
                    excluded.append(Excluded(value, by, hard=False))  # type: ignore[list-item]
                else:
                    if blame is None:
                        self.solver.hints = [{**witness, name: value}]
                        blame = self.solver._quickxplain([*self.background, wish], [], hard)  # noqa: SLF001
                        self.solver.hints = []
                    excluded.append(Excluded(value, blame, hard=True))
            reasons.append(DecisionReason(name, witness[name], var.label, decided_by.get(name), excluded))
        self.solver.hints = []
        _TALLIES.clear()
        del kept
        return reasons

    def _repairable(
        self,
        witness: dict[str, str],
        name: str,
        value: str,
        device: list[str],
        on_var: dict[str, list[Constraint]],
        allowed: Callable[[Constraint], bool] | None = None,
    ) -> bool:
        """Is there a solution with `name = value` that differs from the witness only in this device's
        variables? The witness satisfies every hard constraint, so only the constraints on those variables
        need checking: True is a proof, False only means "ask the solver". `allowed`: only these constraints
        count (the others may be broken)."""
        return next(self._repairs(witness, name, value, device, on_var, allowed), None) is not None

    def _repairs(
        self,
        witness: dict[str, str],
        name: str,
        value: str,
        device: list[str],
        on_var: dict[str, list[Constraint]],
        allowed: Callable[[Constraint], bool] | None = None,
    ) -> Iterator[dict[str, str]]:
        """The repairs `_repairable` looks for, in order (the device's changed values), found by a search over
        the device's other variables (the witness's value first) that checks each constraint as soon as its
        device variables have values, narrow ones before capacities, and stops after REPAIR_NODES values."""
        if self._touched_on is not on_var:
            self._touched, self._touched_on = {}, on_var
        plan = self._touched.get((id(witness), tuple(device)))
        if plan is None or plan.base is not witness:
            plan = self._touched[(id(witness), tuple(device))] = _Plan(witness, device, on_var)
        order = [v for v in device if v != name]
        index = {v: i for i, v in enumerate(order)}
        index[name] = -1
        due: list[list[_Check]] = [[] for _ in range(len(order) + 1)]
        for check in plan.checks:
            if allowed is None or allowed(check.c):
                due[max(index[v] for v in check.device_vars) + 1].append(check)
        local = {name: value}
        if not all(check.holds(witness, local) for check in due[0]):
            return
        choices = [[witness[v], *(x for x in self.problem.variables[v].values if x != witness[v])] for v in order]
        budget = [REPAIR_NODES]

        def search(depth: int) -> Iterator[dict[str, str]]:
            if depth == len(order):
                yield dict(local)
                return
            var = order[depth]
            for choice in choices[depth]:
                budget[0] -= 1
                if budget[0] < 0:
                    return
                local[var] = choice
                if all(check.holds(witness, local) for check in due[depth + 1]):
                    yield from search(depth + 1)
            del local[var]

        yield from search(0)

    def _background_for(self, mus: list[Constraint]) -> list[Constraint]:
        if not self.background or not self.solver.consistent(mus):
            return []
        return self.solver._quickxplain(mus, [], self.background)  # noqa: SLF001


def _is_driver(c: Constraint) -> bool:
    """A guest fact about a device driver (which a driver pack can add), not about a chipset or firmware."""
    ids = dict(c.provenance.data).get("device_ids", ())
    return bool(ids) and all(str(i).startswith(("http://pcisig.com/", "http://usb.org/")) for i in ids)  # type: ignore[union-attr]


def _cost(c: Constraint) -> int:
    if c.provenance.source is Source.GUEST and not _is_driver(c):
        return COST[Source.APP] - 1  # overruling osinfo about chipsets or firmware is a last resort
    return COST.get(c.provenance.source, 9)


def _pin(variable: str, value: str, problem: Problem) -> Constraint:
    """A throw-away hard requirement 'variable = value', to ask what it would clash with."""
    from virtpolicy.core.problem import Provenance, require

    return require(
        f"what-if:{variable}={value}",
        variable,
        [value],
        problem.variables[variable].values,
        f"{variable} = {value}",
        Provenance(Source.ENGINE, "what-if"),
    )


def _minimal_hitting_sets(sets: list[list[Constraint]]) -> list[tuple[Constraint, ...]]:
    """All minimal sets sharing a member with every given set (Berge's transversal algorithm), smallest first."""
    by_id = {id(c): c for s in sets for c in s}
    transversals: set[frozenset[int]] = {frozenset()}
    for members in sets:
        ids = {id(c) for c in members}
        grown: set[frozenset[int]] = set()
        for t in transversals:
            if t & ids:
                grown.add(t)
            else:
                grown.update(t | {i} for i in ids)
        transversals = {t for t in grown if not any(u < t for u in grown)}
        if len(transversals) > MAX_HITTING_SETS:
            break
    result = [tuple(sorted((by_id[i] for i in t), key=lambda c: c.id)) for t in transversals]
    result.sort(key=lambda r: (len(r), [c.id for c in r]))
    return result


WIDE = 8  # a constraint over more variables is a capacity over many devices, not part of a neighbourhood
HUB = 400  # a variable in more constraints than this (machine) has the whole domain as its neighbourhood
MAX_PARTNERS = 16  # devices tried as the second device of a two-device repair


class _Local:
    """A device's neighbourhood, for judging one value of one of its variables without the whole domain.

    The neighbourhood is the narrow constraints (hard and structural) on the device's variables, and those
    among the variables they reach (the machine, the NUMA cells): inconsistent there means inconsistent in the
    whole domain, since adding constraints never makes a set consistent again."""

    def __init__(
        self, explainer: ConflictExplainer, on_var: dict[str, list[Constraint]], device_of: dict[str, list[str]]
    ) -> None:
        self.x = explainer
        self.on_var = on_var
        self.device_of = device_of
        self.position = {id(c): i for i, c in enumerate(explainer.candidates)}
        self.structural = {id(c) for c in explainer.background}
        self.hubs: dict[frozenset[str], list[Constraint]] = {}
        self.cache: dict[str, tuple[list[Constraint], list[Constraint]] | None] = {}
        self.partners: dict[int, list[str]] = {}

    def _of(self, device: str) -> tuple[list[Constraint], list[Constraint]] | None:
        """The device's neighbourhood: (structural, candidates in QuickXplain's order); None for a hub."""
        if device not in self.cache:
            self.cache[device] = self._build(self.device_of[device])
        return self.cache[device]

    def _build(self, variables: list[str]) -> tuple[list[Constraint], list[Constraint]] | None:
        near: dict[int, Constraint] = {}
        for v in variables:
            on = self.on_var.get(v, ())
            if len(on) > HUB:
                return None
            for c in on:
                if len(c.variables) <= WIDE:
                    near[id(c)] = c
        reached = frozenset(u for c in near.values() for u in c.variables) - set(variables)
        if reached not in self.hubs:
            among: dict[int, Constraint] = {}
            for u in reached:
                for c in self.on_var.get(u, ()):
                    if len(c.variables) <= WIDE and reached.issuperset(c.variables):
                        among[id(c)] = c
            self.hubs[reached] = list(among.values())
        for c in self.hubs[reached]:
            near[id(c)] = c
        structural = [c for c in near.values() if id(c) in self.structural]
        candidates = sorted((c for c in near.values() if id(c) in self.position), key=lambda c: self.position[id(c)])
        return structural, candidates

    def judge(
        self, witness: dict[str, str], name: str, value: str, wish: Constraint
    ) -> tuple[bool | None, list[Constraint] | None]:
        """(possible, blame) for `name = value`, or (None, None) when only the whole domain can tell.

        Impossible with the structural facts alone: QuickXplain over the whole domain then returns its first
        candidate (its background is already inconsistent), so that is the blame. Impossible with the
        neighbourhood's requirements: the neighbourhood's preferred conflict, when `_certified`."""
        device = name.split(".")[0]
        solver = self.x.solver
        first = self.x.candidates[:1]
        if first and any(
            len(c.variables) == 1 and id(c) in self.structural and not c.holds(value) for c in self.on_var.get(name, ())
        ):
            return False, first  # a structural fact alone rules the value out (numa.cells = 3 for 8 vCPUs)
        near = self._of(device)
        if near is None:
            return None, None
        structural, candidates = near
        if not solver.consistent([*structural, wish], local=True):
            return (False, first) if first else (None, None)
        if not solver.consistent([*structural, *candidates, wish], local=True):
            blame = solver._quickxplain([*structural, wish], [], candidates, local=True)  # noqa: SLF001
            if self._certified(witness, name, value, blame):
                return False, blame
            return False, None
        if self._swap(witness, name, value):
            return True, None
        return None, None

    def _certified(self, witness: dict[str, str], name: str, value: str, blame: list[Constraint]) -> bool:
        """Whether `blame` is what QuickXplain over the whole domain returns: its preferred conflict, built from
        the last member down (Junker 2004): each member is the first candidate at which, with the structural
        facts, the wish and the members above it, the candidates so far become inconsistent. The "so far
        consistent" half of each step is shown by a repair of the witness (which meets every hard constraint)
        within the device; the "then inconsistent" half holds because blame itself is a conflict."""
        device = self.device_of[name.split(".")[0]]
        chosen: set[int] = set()
        for member in sorted(blame, key=lambda c: self.position[id(c)], reverse=True):
            limit = self.position[id(member)]

            def allowed(c: Constraint, limit: int = limit) -> bool:
                return id(c) in self.structural or id(c) in chosen or self.position.get(id(c), limit) < limit

            if not self.x._repairable(witness, name, value, device, self.on_var, allowed):  # noqa: SLF001
                return False
            chosen.add(id(member))
        return True

    def _swap(self, witness: dict[str, str], name: str, value: str) -> bool:
        """A repair of two devices: this one takes the value, and another gives up what a capacity over both
        then lacks (a root port). Only the narrow constraints and the capacities on the two devices can break,
        so checking those proves the value possible."""
        device = self.device_of[name.split(".")[0]]
        for tried, local in enumerate(self.x._repairs(witness, name, value, device, self.on_var, _narrow)):  # noqa: SLF001
            if tried >= REPAIR_TRIES:
                return False
            wide = [c for v in device for c in self.on_var.get(v, ()) if not _narrow(c)]
            broken = [c for c in dict.fromkeys(wide) if not _holds(c, witness, local)]
            if not broken:
                return True  # a repair of this device alone (`_repairable` tries the same ones first)
            for other in self._partners(broken[0], name.split(".")[0]):
                if self._partner(witness, local, self.device_of[other], device):
                    return True
        return False

    def _partners(self, capacity: Constraint, device: str) -> list[str]:
        """The first MAX_PARTNERS devices other than `device` that `capacity` counts, in variable order."""
        if id(capacity) not in self.partners:
            self.partners[id(capacity)] = list(dict.fromkeys(u.split(".")[0] for u in capacity.variables))
        return [d for d in self.partners[id(capacity)] if d != device][:MAX_PARTNERS]

    def _partner(self, witness: dict[str, str], local: dict[str, str], other: list[str], device: list[str]) -> bool:
        """Whether `other` can change (all its variables, up to REPAIR_TRIES combinations) so that the
        constraints on either device hold together with `local`."""
        touched = sorted(
            {id(c): c for v in [*other, *device] for c in self.on_var.get(v, ())}.values(),
            key=lambda c: len(c.variables),
        )
        mine = {id(c) for v in device for c in self.on_var.get(v, ()) if _narrow(c)}
        touched = [c for c in touched if id(c) not in mine or not set(c.variables).isdisjoint(other)]
        choices = [[witness[v], *(x for x in self.x.problem.variables[v].values if x != witness[v])] for v in other]
        for tried, combo in enumerate(itertools.product(*choices)):
            if tried >= REPAIR_TRIES:
                return False
            if tried == 0:
                continue  # the witness's own values: `local` alone already breaks a capacity
            both = {**local, **dict(zip(other, combo, strict=True))}
            if all(_holds(c, witness, both) for c in touched):
                return True
        return False


def _narrow(c: Constraint) -> bool:
    return len(c.variables) <= WIDE


_TALLIES: dict[tuple[int, int], tuple[dict[str, str], Tally | tuple[frozenset[str], int]]] = {}
MAX_TALLIES = 64


def _holds(c: Constraint, witness: dict[str, str], local: dict[str, str]) -> bool:
    """c on the witness with the `local` values changed. A capacity over many devices (a bus budget, an
    AtMost count) from its counts at the witness, kept per witness (`_TALLIES`, keyed by the witness and the
    constraint): a repair costs its few changes, not a scan of every device."""
    if len(c.variables) > WIDE and isinstance(c, BusBudget | AtMost):
        key = (id(witness), id(c))
        entry = _TALLIES.get(key)
        if entry is None or entry[0] is not witness:
            if len(_TALLIES) >= MAX_TALLIES:
                _TALLIES.clear()
            if isinstance(c, BusBudget):
                counts: Tally | tuple[frozenset[str], int] = Tally(c, witness.__getitem__, holds=True)
            else:
                counts = (frozenset(c.variables), sum(1 for v in c.variables if witness[v] == c.value))
            entry = _TALLIES[key] = (witness, counts)
        counts = entry[1]
        if isinstance(counts, Tally):
            if not local:
                return counts.fits()
            return counts.fits_with(list(local), lambda v: local[v] if v in local else witness[v])
        members, hits = counts
        assert isinstance(c, AtMost)
        if len(members) != len(c.variables):
            return c.holds(*(local[v] if v in local else witness[v] for v in c.variables))  # a repeated variable
        for v, value in local.items():
            if v in members:
                hits += (value == c.value) - (witness[v] == c.value)
        return hits <= c.limit
    return c.holds(*(local[v] if v in local else witness[v] for v in c.variables))


@dataclass
class _Check:
    """One constraint of a device's repair, prepared against a base solution: a nogood as the forbidden sets
    of the device's variables (the rest of its values are the base's), anything else as the base's values
    with the device's filled in."""

    c: Constraint
    device_vars: tuple[str, ...]
    sets: list[tuple[str, frozenset[str]]] | None  # a Forbid: (device variable, its forbidden values)
    template: list[str] | None  # anything narrow else: the base's values, device positions to fill
    positions: list[tuple[int, str]]

    def holds(self, base: dict[str, str], local: dict[str, str]) -> bool:
        if self.sets is not None:
            return any(local[v] not in forbidden for v, forbidden in self.sets)
        if self.template is None:
            return _holds(self.c, base, local)
        args = list(self.template)
        for i, v in self.positions:
            args[i] = local[v]
        return self.c.holds(*args)


class _Plan:
    """A device's constraints prepared against one base solution (`_Check`), narrow first; a nogood that the
    base's values outside the device already satisfy is left out (it holds whatever the device takes)."""

    def __init__(self, base: dict[str, str], device: list[str], on_var: dict[str, list[Constraint]]) -> None:
        self.base = base
        members = set(device)
        touched = sorted({id(c): c for v in device for c in on_var.get(v, ())}.values(), key=lambda c: len(c.variables))
        self.checks: list[_Check] = []
        for c in touched:
            device_vars = tuple(dict.fromkeys(v for v in c.variables if v in members))
            if isinstance(c, Forbid) and _narrow(c):
                pairs = list(zip(c.variables, c.sets, strict=True))
                if any(v not in members and base[v] not in forbidden for v, forbidden in pairs):
                    continue
                sets = [(v, forbidden) for v, forbidden in pairs if v in members]
                self.checks.append(_Check(c, device_vars, sets, None, []))
            elif _narrow(c):
                template = [base[v] for v in c.variables]
                positions = [(i, v) for i, v in enumerate(c.variables) if v in members]
                self.checks.append(_Check(c, device_vars, None, template, positions))
            else:
                self.checks.append(_Check(c, device_vars, None, None, []))
