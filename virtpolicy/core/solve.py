"""Solving: hard constraints with python-constraint2, soft ones lexicographically, conflicts minimally.

Soft constraints are taken in order (priority, then declaration): each is kept iff it is consistent with
the hard ones and the soft ones already kept. Most checks need no search: a kept witness solution that
already satisfies the next soft constraint proves it consistent, and one-variable constraints are
decided on the current domains. Infeasible hard sets are reduced to a minimal conflict with QuickXplain
(Junker 2004), structural facts as background.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

from constraint import BacktrackingSolver, FunctionConstraint, Unassigned
from constraint import Problem as CSP

from virtpolicy.core.budget import BusBudget
from virtpolicy.core.problem import ATMOST, BUDGET, FORBID, AtMost, Constraint, Forbid, Problem, Source
from virtpolicy.core.search import Search, SearchLimit, Store, Tally

Assignment = dict[str, str]


@dataclass
class Decision:
    variable: str
    value: str
    reason: Constraint | None  # the constraint that fixed it (None: the only value left / search order)
    passed_over: list[tuple[str, Constraint]] = field(default_factory=list)  # more preferred values, and the wish


@dataclass
class Dropped:
    """A soft constraint that was not kept, with the kept ones it was judged against."""

    constraint: Constraint
    kept_before: int  # how many soft constraints had been kept when this one was tried


@dataclass
class Solution:
    assignment: Assignment
    decisions: dict[str, Decision]
    kept: list[Constraint]
    dropped: list[Dropped]
    solver: Solver
    solves: int = 0
    _why: dict[str, list[Constraint]] = field(default_factory=dict)

    def why_dropped(self, dropped: Dropped) -> list[Constraint]:
        """A minimal set of hard and earlier kept constraints that rule the soft one out (QuickXplain)."""
        key = dropped.constraint.id
        if key not in self._why:
            self._why[key] = self.solver.why_not(dropped.constraint, self.kept[: dropped.kept_before])
        return self._why[key]


@dataclass
class Conflict:
    """A minimal set of hard constraints that cannot hold together (background: structural facts)."""

    members: list[Constraint]
    background: list[Constraint]


class Solver:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.solves = 0
        # assignments worth trying before a search in `consistent`: a set of constraints one of them satisfies
        # is consistent. Explanations set the witness with the one value they ask about (`decisions`).
        self.hints: list[Assignment] = []
        # the soft loop's searches of independent groups, by everything a search depends on (`_search_from`)
        self._searched: dict[tuple[object, ...], Assignment | None] = {}
        self._searched_size = 0

    # --- consistency -------------------------------------------------------------------------------
    def _domains(
        self, constraints: Sequence[Constraint], local: bool = False
    ) -> tuple[dict[str, list[str]], list[Constraint]]:
        """Domains narrowed by the one-variable constraints, and the others. `local`: only the constraints'
        own variables (the rest are unconstrained, so they cannot make the constraints unsatisfiable)."""
        variables = self.problem.variables
        names = dict.fromkeys(v for c in constraints for v in c.variables) if local else variables
        domains = {name: list(variables[name].values) for name in names}
        rest: list[Constraint] = []
        for c in constraints:
            if len(c.variables) == 1:
                name = c.variables[0]
                domains[name] = c.allows(domains[name])
            else:
                rest.append(c)
        return domains, rest

    def find(
        self,
        constraints: Sequence[Constraint],
        domains: dict[str, list[str]] | None = None,
        steps: int | None = None,
    ) -> Assignment | None:
        """One solution of `constraints`, preferring earlier domain values; None when infeasible.

        Before searching, values fixed to one choice are propagated into the constraints (unit
        propagation) and the rest splits into independent groups of variables, each searched on its own:
        chronological backtracking would otherwise retry every unrelated variable to prove a small,
        local conflict. `steps`: each group's search tries at most that many values, else SearchLimit.
        """
        if domains is None:
            domains, rest = self._domains(constraints)
        else:
            domains = {k: list(v) for k, v in domains.items()}
            rest = [c for c in constraints if len(c.variables) > 1]
        if any(not vals for vals in domains.values()):
            return None
        self.solves += 1
        rest = _propagate(domains, rest)
        if rest is None:
            return None
        solution = {name: vals[0] for name, vals in domains.items() if len(vals) == 1}
        fixed = dict(solution)
        for group, group_constraints in _components(domains, rest):
            result = _first_solution(group, domains, group_constraints, fixed, steps)
            if not result:
                return None
            solution.update(result)
        return solution

    def search(self, constraints: Sequence[Constraint], steps: int) -> Assignment | None:
        """A solution of `constraints` by `find`'s search of at most `steps` values per group, {} when there is
        none, or None when that was not enough to tell. For a satisfiable problem held together by one capacity
        over every device, `find` walks straight to a solution, where `consistent` propagates the whole problem
        again after every decision (quadratic in the devices); for an unsatisfiable one it may take long."""
        try:
            return self.find(constraints, steps=steps) or {}
        except SearchLimit:
            return None

    def consistent(self, constraints: Sequence[Constraint], local: bool = False) -> bool:
        """Whether `constraints` have a solution, without building one (what QuickXplain asks).

        `find` must return the preferred solution, so it keeps python-constraint's chronological search;
        a yes/no answer can use any complete method, and `_satisfiable` splits the problem into
        independent parts after every decision, so a small conflict is not re-proved for every
        combination of unrelated variables (the 70 s `explain examples/windows10.xml` of issue 9).

        `local` sets up only the constraints' own variables: the same answer, at the cost of a few constraints
        instead of every variable of the domain (explain asks about one device's few constraints).
        """
        for hint in self.hints:
            if all(c.holds(*(hint[v] for v in c.variables)) for c in constraints):
                return True
        domains, rest = self._domains(constraints, local)
        if any(not vals for vals in domains.values()):
            return False
        self.solves += 1
        if len(constraints) > LARGE:
            answer = _search_settled({k: list(v) for k, v in domains.items()}, rest, CONSISTENCY_STEPS)
            if answer is not None:
                return answer
        return _satisfiable(domains, rest)

    # --- solving -----------------------------------------------------------------------------------
    def solve(self) -> Solution | Conflict:
        with without_gc():
            return self._solve()

    def _solve(self) -> Solution | Conflict:
        hard = [c for c in self.problem.constraints if c.is_hard]
        soft = sorted(
            (c for c in self.problem.constraints if not c.is_hard),
            key=lambda c: -c.priority,
        )  # sorted() is stable: declaration order within a priority
        domains, _ = self._domains(hard)
        if any(not vals for vals in domains.values()):
            return self.explain_conflict(hard)
        kept_multi: list[Constraint] = [c for c in hard if len(c.variables) > 1]
        # the kept requirements as `find` propagates them: the first find searches from there, and each find
        # for a preference starts from there instead of propagating everything again
        fixpoint = _Fixpoint({k: list(v) for k, v in domains.items()}, kept_multi)
        self.solves += 1
        bound = fixpoint.bound() if fixpoint.ok else None
        found = None if bound is None else self._search_from(fixpoint.domains, bound)
        if found is None:
            return self.explain_conflict(hard)
        witness = found
        kept: list[Constraint] = []
        dropped: list[Dropped] = []
        partial = _Partial(hard, domains)  # capacities that can refute a partial assignment
        # the kept requirements after propagation: refutes, without a search, a preference no solution meets
        store = Store(domains, kept_multi)
        for c in soft:
            values = tuple(witness[v] for v in c.variables)
            if c.holds(*values):
                self._keep(c, domains, kept_multi, kept)
                partial.kept(c)
                store.keep(c)
                fixpoint.keep(c)
                continue
            if self._empties(c, domains) or partial.refutes(c, domains) or store.refutes(c):
                dropped.append(Dropped(c, len(kept)))
                continue
            if fixpoint.settle():
                candidate = self._find_from(fixpoint, c)
            else:  # cannot happen (the kept requirements have a solution); the plain find is the same search
                trial = self._narrowed(c, domains)
                assert trial is not None
                candidate = self.find(kept_multi + ([c] if len(c.variables) > 1 else []), trial)
            if candidate is None:
                fixpoint.rollback()
                dropped.append(Dropped(c, len(kept)))
                continue
            fixpoint.commit()
            witness = candidate
            self._keep(c, domains, kept_multi, kept)
            partial.kept(c)
            store.keep(c)
        decisions = self._decisions(witness, hard, kept, dropped)
        return Solution(witness, decisions, kept, dropped, self, self.solves)

    def _find_from(self, fixpoint: _Fixpoint, c: Constraint) -> Assignment | None:
        """`find` of the kept requirements with c added, from their kept fixpoint (the same search on the same
        domains; see `_Fixpoint`). The fixpoint is left in trial: the caller commits or rolls back."""
        self.solves += 1
        bound = fixpoint.trial(c)
        if bound is None:
            return None
        return self._search_from(fixpoint.domains, bound)

    def _search_from(self, domains: dict[str, list[str]], bound: list[Bound]) -> Assignment | None:
        """`find`'s search on propagated domains: each independent group on its own, a group that an earlier
        search of this soft loop met with the same variables, domains, constraints and fixed values answered
        as it was then (a search is deterministic in these). Most preferences change one group, or none."""
        solution = {name: vals[0] for name, vals in domains.items() if len(vals) == 1}
        fixed = dict(solution)
        searched = self._searched
        for group, group_constraints in _components(domains, bound):
            if not group_constraints:  # one variable and nothing on it: the search takes its preferred value
                solution[group[0]] = domains[group[0]][0]
                continue
            key = _search_key(group, domains, group_constraints, fixed)
            if key in searched:
                result = searched[key]
            else:
                result = _first_solution(group, domains, group_constraints, fixed)
                self._remember(key, result)
            if not result:
                return None
            solution.update(result)
        return solution

    def _remember(self, key: tuple[object, ...], result: Assignment | None) -> None:
        """Cache a group's search, within a bound (the size of what the keys hold) that a soft loop over
        thousands of devices, with a search per preference, would otherwise outgrow."""
        size = len(key[0]) + len(key[2])  # type: ignore[arg-type]
        if self._searched_size + size > SEARCH_CACHE:
            self._searched.clear()
            self._searched_size = 0
        self._searched[key] = result
        self._searched_size += size

    @staticmethod
    def _empties(c: Constraint, domains: dict[str, list[str]]) -> bool:
        """A one-variable constraint that no value left in its variable's domain meets."""
        return len(c.variables) == 1 and not c.allows(domains[c.variables[0]])

    @staticmethod
    def _narrowed(c: Constraint, domains: dict[str, list[str]]) -> dict[str, list[str]] | None:
        trial = dict(domains)  # find() copies the lists it narrows
        if len(c.variables) == 1:
            name = c.variables[0]
            trial[name] = c.allows(trial[name])
            if not trial[name]:
                return None
        return trial

    @staticmethod
    def _keep(
        c: Constraint, domains: dict[str, list[str]], kept_multi: list[Constraint], kept: list[Constraint]
    ) -> None:
        kept.append(c)
        if len(c.variables) == 1:
            name = c.variables[0]
            domains[name] = c.allows(domains[name])
        else:
            kept_multi.append(c)

    def why_not(self, wish: Constraint, kept: list[Constraint]) -> list[Constraint]:
        """The smallest set of hard and kept constraints that, with `wish`, is infeasible."""
        hard = [c for c in self.problem.constraints if c.is_hard]
        structural = [c for c in hard if c.provenance.source is Source.STRUCTURAL]
        candidates = [c for c in hard if c.provenance.source is not Source.STRUCTURAL] + list(kept)
        background = [*structural, wish]
        if self.consistent(background + candidates):
            return []
        if not self.consistent(background):
            return []
        return self._quickxplain(background, [], candidates)

    def _wish(self, c: Constraint, witness: Assignment) -> dict[str, str] | None:
        """The smallest change of the witness that satisfies c (one variable), if any."""
        for name in reversed(c.variables):
            for value in self.problem.variables[name].values:
                if c.holds(*(value if v == name else witness[v] for v in c.variables)):
                    return {name: value}
        return None

    def _decisions(
        self, witness: Assignment, hard: list[Constraint], kept: list[Constraint], dropped: list[Dropped]
    ) -> dict[str, Decision]:
        """Why each variable has its value, and which more preferred values were passed over."""
        order: dict[int, int] = {}  # declaration order, built when a passed-over value needs it
        # per variable, the hard constraints on it: the non-structural ones, and the structural facts
        stated_on: dict[str, list[Constraint]] = {}
        structural_on: dict[str, list[Constraint]] = {}
        app_on: dict[str, Constraint] = {}  # the first of the app's own one-variable requirements
        for c in hard:
            source = c.provenance.source
            on = structural_on if source is Source.STRUCTURAL else stated_on
            for v in c.variables:
                if v in on:
                    on[v].append(c)
                else:
                    on[v] = [c]
            if len(c.variables) == 1 and source is Source.APP:
                app_on.setdefault(c.variables[0], c)
        kept_on: dict[str, list[Constraint]] = {}
        for c in kept:
            for v in c.variables:
                kept_on.setdefault(v, []).append(c)
        dropped_in: dict[str, list[Dropped]] = {}  # by group, in the order they were dropped
        for d in dropped:
            dropped_in.setdefault(d.constraint.group, []).append(d)
        wide: dict[int, Tally] = {}  # bus budgets counted once at the witness, not rescanned per value
        decisions: dict[str, Decision] = {}
        for name, variable in self.problem.variables.items():
            value = witness[name]
            others = [v for v in variable.values if v != value]
            reason = app_on.get(name)
            if reason is None and others:  # a one-value variable is decided by its domain, not by any constraint
                # a stated requirement first, then a kept preference, then a libvirt/QEMU fact
                for candidates in (stated_on, kept_on, structural_on):
                    reason = _deciding(candidates.get(name, ()), name, witness, others, wide)
                    if reason is not None:
                        break
            passed: list[tuple[str, Constraint]] = []
            if reason is not None and reason.group and reason.group in dropped_in:
                if not order:
                    order = {id(c): i for i, c in enumerate(self.problem.constraints)}
                for d in dropped_in[reason.group]:
                    c = d.constraint
                    if order[id(c)] < order[id(reason)]:
                        wish = self._wish(c, witness) or {}
                        if wish.get(name, value) != value:
                            passed.append((wish[name], c))
            decisions[name] = Decision(name, value, reason, passed)
        return decisions

    # --- conflicts ---------------------------------------------------------------------------------
    def explain_conflict(self, hard: list[Constraint]) -> Conflict:
        background = [c for c in hard if c.provenance.source is Source.STRUCTURAL]
        # one-variable requirements first: QuickXplain favours early constraints, and a conflict stated
        # in direct requirements ("machine is q35" vs "rhel5 lacks q35") is the one a user can act on
        candidates = sorted(
            (c for c in hard if c.provenance.source is not Source.STRUCTURAL), key=lambda c: len(c.variables)
        )
        if not self.consistent(background):
            return Conflict(members=[], background=background)
        members = self._quickxplain(background, [], candidates)
        needed = self._quickxplain(members, [], background) if background and self.consistent(members) else []
        return Conflict(members=members, background=needed)

    def _quickxplain(
        self,
        background: list[Constraint],
        delta: list[Constraint],
        constraints: list[Constraint],
        local: bool = False,
    ) -> list[Constraint]:
        """Junker's QuickXplain: the preferred minimal subset of `constraints` inconsistent with `background`
        (`local`: consistency checked over the constraints' own variables only, see `consistent`)."""
        if delta and not self.consistent(background, local):
            return []
        if len(constraints) == 1:
            return list(constraints)
        half = len(constraints) // 2
        first, second = constraints[:half], constraints[half:]
        d2 = self._quickxplain(background + first, first, second, local)
        d1 = self._quickxplain(background + d2, d2, first, local)
        return d1 + d2


@contextmanager
def without_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block: a solve allocates many short-lived lists and tuples
    but no cycles, and each collection scans every live object (the problem's tens of thousands of constraints
    for a thousand devices): 15-20% of a large solve. Nested blocks leave it to the outermost one."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


Bound = tuple[Constraint, tuple[str, ...], Callable[..., bool]]
LARGE = 2000  # constraints: a consistency question this big first tries `_search_settled`
CONSISTENCY_STEPS = 500  # values that search may try in all before `_satisfiable` takes over
SEARCH_CACHE = 200_000  # variables and constraints the soft loop's cached searches may hold in their keys
PYTHON_CONSTRAINT = False  # tests set it to compare the engine's own search with python-constraint's


def _search_key(
    group: list[str], domains: dict[str, list[str]], members: list[Bound], fixed: dict[str, str]
) -> tuple[object, ...]:
    """What `_first_solution` of a group depends on: its variables and their ordered domains, its constraints
    in order with their free variables, and the fixed values they read (their binders' and `Search`'s)."""
    return (
        tuple(group),
        tuple([tuple(domains[name]) for name in group]),
        tuple([(c, free, tuple([fixed.get(v) for v in c.variables])) for c, free, _ in members]),
    )


def _first_solution(
    group: list[str],
    domains: dict[str, list[str]],
    members: list[Bound],
    fixed: dict[str, str],
    steps: int | None = None,
) -> Assignment | None:
    """The preferred solution of one independent group: python-constraint's first, from `search.Search`.

    Both search with forward checking in python-constraint's order; `Search` gives the same solution without
    python-constraint's per-step scans of every variable, which made a thousand devices quadratic. Capacity
    counts read the search's current domains and fail early; everything else waits for all of its values."""
    ordered = {name: list(reversed(domains[name])) for name in group}  # the solver pops from the end: preferred first
    if not PYTHON_CONSTRAINT and Search.supports(members):
        return Search(group, ordered, members, fixed).solve(steps)
    if steps is not None:
        raise SearchLimit  # python-constraint cannot be stopped
    csp = CSP(BacktrackingSolver())
    for name in group:
        csp.addVariable(name, ordered[name])
    for c, free, bind in members:
        check = c.search_check(fixed) if hasattr(c, "search_check") else FunctionConstraint(bind)
        csp.addConstraint(check, list(free))
    return csp.getSolution()


def _binder(c: Constraint, fixed: dict[str, str], free: tuple[str, ...]) -> Callable[..., bool]:
    """c as a function of its free variables only, the fixed ones filled in."""
    if not fixed:
        return c.holds  # every variable free: its values come in its own order
    order = c.variables
    position = {name: i for i, name in enumerate(free)}

    def bound(*values: object) -> bool:
        return c.holds(*(values[position[v]] if v in position else fixed[v] for v in order))

    return bound


def _propagate(domains: dict[str, list[str]], constraints: list[Constraint]) -> list[Bound] | None:
    """Unit propagation to a fixpoint; returns the constraints left with two or more free variables.

    Nogoods (Forbid) are handled with set operations; other constraints by evaluation. A constraint only
    reads the fixed values, so only constraints on a variable that just became fixed are looked at again,
    and a wide one (a capacity over every device) only once at most one of its variables is left free: a
    count of its free variables is kept, instead of scanning them all each time one more is fixed, which
    was quadratic in the number of devices. `domains` is narrowed in place.
    """
    fixpoint = _Fixpoint(domains, constraints)
    return fixpoint.bound() if fixpoint.ok else None


class _Fixpoint:
    """`_propagate`'s state, kept: the soft loop's domains at the fixpoint of the kept requirements, narrowed
    as requirements are kept, and tried with one more (`trial`) and then kept (`commit`) or not (`rollback`).

    A find for a soft requirement used to propagate every constraint of the domain again from the start; the
    fixpoint of the kept ones plus one more is the fixpoint of their fixpoint plus that one (propagation
    only removes values no solution of the constraints takes: it reaches the greatest fixpoint below its
    start, whatever the order), so starting from the kept fixpoint gives the same domains and the same
    constraints left, at the cost of what the one requirement changes."""

    def __init__(self, domains: dict[str, list[str]], constraints: Sequence[Constraint]) -> None:
        self.domains = domains
        self.constraints: list[Constraint] = []
        self.watching: dict[str, list[int]] = {}
        self.fixed = {name: vals[0] for name, vals in domains.items() if len(vals) == 1}
        self.free_count: list[int] = []
        self.done: set[int] = set()  # satisfied for good, or already applied to its one free variable
        self.trail: list[tuple[str, object, object]] | None = None  # what a trial changed, to undo it
        # `bound`'s item per constraint, valid while its variables' fixed values stay (dropped when one changes)
        self.items: dict[int, Bound] = {}
        self.waiting: list[Constraint] = []  # kept, not yet added (`keep`, `settle`)
        for c in constraints:
            self._append(c)
        self.ok = self._drain(list(range(len(self.constraints))))

    def _append(self, c: Constraint) -> int:
        i = len(self.constraints)
        self.constraints.append(c)
        open_vars = 0
        for v in c.variables:
            self.watching.setdefault(v, []).append(i)
            if v not in self.fixed:
                open_vars += 1
        self.free_count.append(open_vars)
        return i

    def _drain(self, queue: list[int]) -> bool:
        """Propagate from the queued constraints to the fixpoint; False when a domain runs empty."""
        domains, fixed, free_count, done = self.domains, self.fixed, self.free_count, self.done
        constraints, trail = self.constraints, self.trail
        queued = set(queue)
        while queue:
            i = queue.pop()
            queued.discard(i)
            if i in done:
                continue
            c = constraints[i]
            if c.kind == FORBID:
                c = cast(Forbid, c)  # by its kind: no ABCMeta instance check in the loop
                # its free part: satisfied for good by a fixed value outside its set, or the free variables left
                free = 0
                var, forbidden = "", frozenset()
                for name, values in zip(c.variables, c.sets, strict=True):
                    if name in fixed:
                        if fixed[name] not in values:
                            free = -1
                            break
                    else:
                        free += 1
                        if free == 1:
                            var, forbidden = name, values
                if free < 0:
                    done.add(i)
                    if trail is not None:
                        trail.append(("done", i, None))
                    continue
                if not free:
                    return False
                if free > 1:
                    continue
                kept = [value for value in domains[var] if value not in forbidden]
            else:
                if free_count[i] > 1:
                    continue
                free_vars = tuple(v for v in c.variables if v not in fixed)
                if not free_vars:
                    if not c.holds(*(fixed[v] for v in c.variables)):
                        return False
                    done.add(i)
                    if trail is not None:
                        trail.append(("done", i, None))
                    continue
                if len(free_vars) > 1:
                    continue
                var = free_vars[0]
                bind = _binder(c, fixed, free_vars)
                kept = [value for value in domains[var] if bind(value)]
            done.add(i)
            if trail is not None:
                trail.append(("done", i, None))
            if not kept:
                return False
            if len(kept) < len(domains[var]) and not self._narrow(var, kept, queue, queued):
                return False
        return True

    def _narrow(self, var: str, kept: list[str], queue: list[int], queued: set[int]) -> bool:
        """Narrow var's domain to `kept` (a non-empty subset); once it is fixed, its constraints are due."""
        if self.trail is not None:
            self.trail.append(("domain", var, self.domains[var]))
        self.domains[var] = kept
        if len(kept) == 1:
            self.fixed[var] = kept[0]
            if self.trail is not None:
                self.trail.append(("fixed", var, None))
            items = self.items
            for j in self.watching.get(var, ()):
                items.pop(j, None)
                self.free_count[j] -= 1
                if self.trail is not None:
                    self.trail.append(("count", j, None))
                if j not in queued and j not in self.done:
                    queue.append(j)
                    queued.add(j)
        return True

    def bound(self) -> list[Bound] | None:
        """The constraints left with two or more free variables, in order; None when one left with none fails."""
        fixed, done, items = self.fixed, self.done, self.items
        result: list[Bound] = []
        for i, c in enumerate(self.constraints):
            if i in done:
                continue
            item = items.get(i)
            if item is not None:
                result.append(item)
                continue
            free = tuple([v for v in c.variables if v not in fixed])
            if len(free) >= 2:
                own = {v: fixed[v] for v in c.variables if v in fixed}  # fixed's values now: a trial may undo them
                item = items[i] = (c, free, _binder(c, own, free))
                result.append(item)
            elif not free and not c.holds(*(fixed[v] for v in c.variables)):
                return None
        return result

    def _add(self, c: Constraint) -> bool:
        """c joins the constraints (a one-variable one narrows its variable instead)."""
        if len(c.variables) == 1:
            name = c.variables[0]
            kept = c.allows(self.domains[name])
            if not kept:
                return False
            if len(kept) == len(self.domains[name]):
                return True
            queue: list[int] = []
            return self._narrow(name, kept, queue, set()) and self._drain(queue)
        i = self._append(c)
        if self.trail is not None:
            self.trail.append(("append", c, None))
        return self._drain([i])

    def trial(self, c: Constraint) -> list[Bound] | None:
        """The fixpoint with c added, for a search (then `commit` or `rollback`); None when it fails."""
        assert not self.waiting, "settle() first"
        self.trail = []
        if not self._add(c):
            return None
        return self.bound()

    def commit(self) -> None:
        self.trail = None

    def rollback(self) -> None:
        """Undo the trial: back to the fixpoint of the kept requirements."""
        trail, self.trail = self.trail or [], None
        for kind, key, old in reversed(trail):
            if kind == "done":
                self.done.discard(key)  # type: ignore[arg-type]
            elif kind == "domain":
                self.domains[key] = old  # type: ignore[index,assignment]
            elif kind == "fixed":
                del self.fixed[key]  # type: ignore[arg-type]
                for j in self.watching.get(key, ()):  # type: ignore[call-overload]
                    self.items.pop(j, None)
            elif kind == "count":
                self.free_count[key] += 1  # type: ignore[index]
            elif kind == "append":
                self.items.pop(len(self.constraints) - 1, None)
                c = self.constraints.pop()
                self.free_count.pop()
                for v in reversed(c.variables):
                    self.watching[v].pop()

    def keep(self, c: Constraint) -> None:
        """c is kept without a search (the witness meets it): the fixpoint narrows for good, at the next
        `settle` (the soft loop keeps many between two searches, and most after its last one)."""
        self.waiting.append(c)

    def settle(self) -> bool:
        """The kept requirements waiting join the fixpoint (in the order kept); whether it still holds."""
        waiting, self.waiting = self.waiting, []
        self.trail = None
        for c in waiting:
            self.ok = self.ok and self._add(c)
        return self.ok


def _deciding(
    candidates: Iterable[Constraint], name: str, assignment: Assignment, others: list[str], wide: dict[int, Tally]
) -> Constraint | None:
    """The first of `candidates` that decides `name` (see `_decides`)."""
    for c in candidates:
        if _decides(c, name, assignment, others, wide):
            return c
    return None


def _decides(c: Constraint, name: str, assignment: Assignment, others: list[str], wide: dict[int, Tally]) -> bool:
    """Does c, given the other variables, rule out every other value of `name` (`others`, not empty)?"""
    if c.kind == FORBID:
        c = cast(Forbid, c)  # by its kind: no ABCMeta instance check in the loop
        return _forbid_decides(c, name, assignment, others)
    if not _holds_with(c, assignment, name, assignment[name], wide):
        return False
    return not any(_holds_with(c, assignment, name, other, wide) for other in others)


def _forbid_decides(c: Forbid, name: str, assignment: Assignment, others: list[str]) -> bool:
    """`_decides` for a nogood, from its sets: a variable other than `name` outside its forbidden set satisfies
    it whatever `name` takes (so it decides nothing); else it holds for a value of `name` outside one of the
    sets at `name`'s positions, and decides when the value is and every other value is in all of them."""
    at: list[frozenset[str]] = []
    for v, forbidden in zip(c.variables, c.sets, strict=True):
        if v == name:
            at.append(forbidden)
        elif assignment[v] not in forbidden:
            return False
    value = assignment[name]
    if all(value in forbidden for forbidden in at):
        return False
    return all(other in forbidden for other in others for forbidden in at)


def _holds_with(c: Constraint, assignment: Assignment, name: str, value: str, wide: dict[int, Tally]) -> bool:
    """c on the assignment with `name` set to `value`; a bus budget from counts kept at the assignment, so that
    asking about each value of each device's slot is not a scan of every device each time."""
    if c.kind == BUDGET:
        c = cast(BusBudget, c)
        tally = wide.get(id(c))
        if tally is None:
            tally = wide[id(c)] = Tally(c, assignment.__getitem__, holds=True)
        if value == assignment[name]:
            return tally.fits()
        return tally.fits_with([name], lambda v: value if v == name else assignment[v])
    return c.holds(*(value if v == name else assignment[v] for v in c.variables))


class _Partial:
    """The capacities that judge a partial assignment (BusBudget: `partial = True`) on the soft loop's domains.

    A capacity already exceeded by the values the kept requirements fixed, with a soft requirement added:
    then `find` could only fail, after a search over every device. With a thousand devices competing for 216
    root ports, most per-device `slot = pcie` preferences end here or in the `Store` instead of in a full
    solve each. A bus budget keeps counts (`search.Tally`), updated as a kept requirement narrows a domain,
    instead of rescanning every device for every preference: the same verdicts as `BusBudget.holds` on the
    same values, a device fixed when its domain is down to one value and Unassigned otherwise."""

    def __init__(self, hard: Sequence[Constraint], domains: dict[str, list[str]]) -> None:
        self.domains = domains  # the soft loop's: narrowed in place as requirements are kept
        self.on: dict[str, list[Constraint]] = {}
        self.tallies: dict[int, Tally] = {}
        for c in hard:
            if getattr(c, "partial", False):
                if isinstance(c, BusBudget):
                    self.tallies[id(c)] = Tally(c, self._value, holds=True)
                for v in c.variables:
                    self.on.setdefault(v, []).append(c)

    def _value(self, name: str) -> object:
        current = self.domains[name]
        return current[0] if len(current) == 1 else Unassigned

    def kept(self, c: Constraint) -> None:
        """`c` was kept (and may have narrowed its variable's domain)."""
        if len(c.variables) == 1:
            for p in self.on.get(c.variables[0], ()):
                tally = self.tallies.get(id(p))
                if tally is not None:
                    tally.update(c.variables[0])

    def refutes(self, c: Constraint, domains: dict[str, list[str]]) -> bool:
        """Whether a capacity on c's variables fails with c's narrowing (one-variable c) added."""
        narrowed: dict[str, list[str]] = {}
        if len(c.variables) == 1:
            name = c.variables[0]
            narrowed[name] = c.allows(domains[name])
        seen: set[int] = set()
        for name in c.variables:
            for p in self.on.get(name, ()):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                tally = self.tallies.get(id(p))
                if tally is not None:
                    changed = list(narrowed)
                    if not tally.fits_with(
                        changed, lambda v: _one_or_open(narrowed[v]) if v in narrowed else self._value(v)
                    ):
                        return True
                    continue
                values = [_one_or_open(narrowed[v] if v in narrowed else domains[v]) for v in p.variables]
                if not p.holds(*values):
                    return True
        return False


def _one_or_open(values: list[str]) -> object:
    return values[0] if len(values) == 1 else Unassigned


def _simplify_counts(domains: dict[str, list[str]], bound: list[Bound]) -> list[Bound] | None:
    """Capacity counts (AtMost) on the current domains: refuted when too many variables are already fixed to
    the value, dropped when too few can still take it, and the value struck from the rest once the limit
    is reached. Dropping them matters as much as pruning: a count over every disk's bus otherwise keeps
    all disks in one part that cannot be split."""
    changed = True
    while changed:
        changed = False
        kept: list[Bound] = []
        for item in bound:
            c, free, _ = item
            if c.kind != ATMOST:
                kept.append(item)
                continue
            c = cast(AtMost, c)
            fixed_hits = sum(1 for v in c.variables if domains[v] == [c.value])
            if fixed_hits > c.limit:
                return None
            open_vars = [v for v in c.variables if len(domains[v]) > 1 and c.value in domains[v]]
            if fixed_hits + len(open_vars) <= c.limit:
                continue  # can no longer be violated
            if fixed_hits == c.limit:
                for v in open_vars:
                    domains[v] = [x for x in domains[v] if x != c.value]
                changed = True
                continue
            kept.append(item)
        bound = kept
        if changed:
            again = _propagate(domains, [c for c, _, _ in bound])
            if again is None:
                return None
            bound = again
    return bound


def _partial_ok(domains: dict[str, list[str]], bound: list[Bound]) -> bool:
    """Constraints that can judge a partial assignment (BusBudget: `partial = True`) refute it early."""
    for c, _, _ in bound:
        if getattr(c, "partial", False):
            values = [domains[v][0] if len(domains[v]) == 1 else Unassigned for v in c.variables]
            if not c.holds(*values):
                return False
    return True


def _settle(domains: dict[str, list[str]], constraints: list[Constraint]) -> list[Bound] | None:
    """Propagate, simplify counts and check partial bounds; None when that alone refutes the domains."""
    bound = _propagate(domains, constraints)
    if bound is None:
        return None
    bound = _simplify_counts(domains, bound)
    if bound is None or not _partial_ok(domains, bound):
        return None
    return bound


def _search_settled(domains: dict[str, list[str]], constraints: list[Constraint], steps: int) -> bool | None:
    """Satisfiability by propagation and then `search.Search` over what is left, trying at most `steps` values
    in all; None when that was not enough. `_satisfiable` propagates the whole of its largest part again
    after each decision: over a thousand devices held together by one capacity, that is quadratic, while the
    search keeps its state incrementally. Both are complete, so an answer here is the answer; what this
    does not settle cheaply is left to `_satisfiable`, whose decomposition suits small hard conflicts."""
    bound = _settle(domains, constraints)
    if bound is None:
        return False
    fixed = {name: vals[0] for name, vals in domains.items() if len(vals) == 1}
    for group, members in _components(domains, bound):
        if not members:
            continue
        if not Search.supports(members):
            return None
        search = Search(group, {name: list(reversed(domains[name])) for name in group}, members, fixed)
        try:
            if search.solve(steps) is None:
                return False
        except SearchLimit:
            return None
        steps -= search.steps
        if steps <= 0:
            return None
    return True


def _satisfiable(domains: dict[str, list[str]], constraints: list[Constraint]) -> bool:
    """Complete yes/no search with decomposition: after each decision and propagation the free variables
    split into independent parts; the smaller parts are decided on their own (recursion depth stays
    logarithmic: each is at most half of its parent), the largest one is searched on in this loop, with
    an explicit stack, so thousands of devices never exhaust Python's recursion limit."""
    stack: list[tuple[dict[str, list[str]], list[Constraint], str, list[str]]] = []
    current: tuple[dict[str, list[str]], list[Constraint]] | None = (domains, constraints)
    while True:
        ok = False
        if current is not None:
            doms, cons = current
            bound = _settle(doms, cons)
            if bound is not None:
                parts = sorted(_components(doms, bound), key=lambda part: -len(part[0]))
                parts = [part for part in parts if part[1]]  # a free variable with no constraint is satisfied
                if not parts:
                    return True
                ok = all(_part_satisfiable(doms, group, members) for group, members in parts[1:])
                if ok:
                    group, members = parts[0]
                    sub_cons = [c for c, _, _ in members]
                    sub = _part_domains(doms, sub_cons)
                    var = _branch_variable(sub, group, members)
                    stack.append((sub, sub_cons, var, list(sub[var])))
        current = None
        while stack and stack[-1][3] == []:
            stack.pop()
        if not stack:
            return False
        sub, sub_cons, var, values = stack[-1]
        value = values.pop(0)
        trial = dict(sub)
        trial[var] = [value]
        current = (trial, sub_cons)


def _part_domains(domains: dict[str, list[str]], constraints: list[Constraint]) -> dict[str, list[str]]:
    return {v: domains[v] for c in constraints for v in c.variables}


def _part_satisfiable(domains: dict[str, list[str]], group: list[str], members: list[Bound]) -> bool:
    cons = [c for c, _, _ in members]
    return _satisfiable(_part_domains(domains, cons), cons)


def _branch_variable(domains: dict[str, list[str]], group: list[str], members: list[Bound]) -> str:
    """The free variable in most constraints (machine, before the devices that hang off it), then the
    smallest domain: deciding a hub first is what lets the rest fall apart into independent parts."""
    degree: dict[str, int] = {}
    for _, free, _ in members:
        for v in free:
            degree[v] = degree.get(v, 0) + 1
    return min(group, key=lambda v: (-degree.get(v, 0), len(domains[v]), v))


def _components(domains: dict[str, list[str]], bound: list[Bound]) -> list[tuple[list[str], list[Bound]]]:
    """Independent groups of free variables (joined by shared constraints), in a stable order."""
    parent = {name: name for name, vals in domains.items() if len(vals) > 1}
    for _, free, _ in bound:  # union-find, inline: this runs for every constraint of every search
        first = free[0]
        while parent[first] != first:
            parent[first] = parent[parent[first]]
            first = parent[first]
        for other in free[1:]:
            while parent[other] != other:
                parent[other] = parent[parent[other]]
                other = parent[other]
            parent[other] = first
    rep: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name in parent:  # dict order: the problem's variable order
        x = name
        while parent[x] != x:
            x = parent[x]
        rep[name] = x
        groups.setdefault(x, []).append(name)
    members: dict[str, list[Bound]] = {key: [] for key in groups}
    for item in bound:
        members[rep[item[1][0]]].append(item)
    return [(groups[key], members[key]) for key in groups]


def solve(problem: Problem) -> Solution | Conflict:
    return Solver(problem).solve()
