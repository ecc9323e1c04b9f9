"""Solving: hard constraints with python-constraint2, soft ones lexicographically, conflicts minimally.

Soft constraints are taken in order (priority, then declaration): each is kept iff it is consistent with
the hard ones and the soft ones already kept. Most checks need no search: a kept witness solution that
already satisfies the next soft constraint proves it consistent, and one-variable constraints are
decided on the current domains. Infeasible hard sets are reduced to a minimal conflict with QuickXplain
(Junker 2004), structural facts as background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from constraint import BacktrackingSolver, FunctionConstraint
from constraint import Problem as CSP

from virtpolicy.solver.problem import Constraint, Problem, Source

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

    # --- consistency -------------------------------------------------------------------------------
    def _domains(self, constraints: Sequence[Constraint]) -> tuple[dict[str, list[str]], list[Constraint]]:
        domains = {name: list(var.values) for name, var in self.problem.variables.items()}
        rest: list[Constraint] = []
        for c in constraints:
            if len(c.variables) == 1:
                name = c.variables[0]
                domains[name] = [v for v in domains[name] if c.holds(v)]
            else:
                rest.append(c)
        return domains, rest

    def find(self, constraints: Sequence[Constraint], domains: dict[str, list[str]] | None = None) -> Assignment | None:
        """One solution of `constraints`, preferring earlier domain values; None when infeasible."""
        if domains is None:
            domains, rest = self._domains(constraints)
        else:
            rest = [c for c in constraints if len(c.variables) > 1]
        if any(not vals for vals in domains.values()):
            return None
        self.solves += 1
        csp = CSP(BacktrackingSolver())
        for name, vals in domains.items():
            csp.addVariable(name, list(reversed(vals)))  # the solver pops from the end: preferred first
        for c in rest:
            csp.addConstraint(FunctionConstraint(c.holds), list(c.variables))
        result = csp.getSolution()
        return dict(result) if result else None

    def consistent(self, constraints: Sequence[Constraint]) -> bool:
        return self.find(constraints) is not None

    # --- solving -----------------------------------------------------------------------------------
    def solve(self) -> Solution | Conflict:
        hard = [c for c in self.problem.constraints if c.is_hard]
        soft = sorted(
            (c for c in self.problem.constraints if not c.is_hard),
            key=lambda c: -c.priority,
        )  # sorted() is stable: declaration order within a priority
        domains, _ = self._domains(hard)
        witness = self.find(hard, {k: list(v) for k, v in domains.items()})
        if witness is None:
            return self.explain_conflict(hard)
        kept_multi: list[Constraint] = [c for c in hard if len(c.variables) > 1]
        kept: list[Constraint] = []
        dropped: list[Dropped] = []
        for c in soft:
            values = tuple(witness[v] for v in c.variables)
            if c.holds(*values):
                self._keep(c, domains, kept_multi, kept)
                continue
            trial = self._narrowed(c, domains)
            if trial is None:
                dropped.append(Dropped(c, len(kept)))
                continue
            candidate = self.find(kept_multi + ([c] if len(c.variables) > 1 else []), trial)
            if candidate is None:
                dropped.append(Dropped(c, len(kept)))
                continue
            witness = candidate
            self._keep(c, domains, kept_multi, kept)
        decisions = self._decisions(witness, hard, kept, dropped)
        return Solution(witness, decisions, kept, dropped, self, self.solves)

    @staticmethod
    def _narrowed(c: Constraint, domains: dict[str, list[str]]) -> dict[str, list[str]] | None:
        trial = {k: list(v) for k, v in domains.items()}
        if len(c.variables) == 1:
            name = c.variables[0]
            trial[name] = [v for v in trial[name] if c.holds(v)]
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
            domains[name] = [v for v in domains[name] if c.holds(v)]
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
                trial = dict(witness)
                trial[name] = value
                if c.holds(*(trial[v] for v in c.variables)):
                    return {name: value}
        return None

    def _decisions(
        self, witness: Assignment, hard: list[Constraint], kept: list[Constraint], dropped: list[Dropped]
    ) -> dict[str, Decision]:
        """Why each variable has its value, and which more preferred values were passed over."""
        order = {id(c): i for i, c in enumerate(self.problem.constraints)}
        decisions: dict[str, Decision] = {}
        for name in self.problem.variables:
            value = witness[name]
            app = [c for c in hard if c.variables == (name,) and c.provenance.source is Source.APP]
            deciding_hard = (
                c
                for c in hard
                if c.provenance.source is not Source.STRUCTURAL
                and name in c.variables
                and self._decides(c, name, witness)
            )
            reason = app[0] if app else next(deciding_hard, None)
            if reason is None:
                reason = next((c for c in kept if name in c.variables and self._decides(c, name, witness)), None)
            if reason is None:
                reason = next((c for c in hard if name in c.variables and self._decides(c, name, witness)), None)
            passed: list[tuple[str, Constraint]] = []
            if reason is not None and reason.group:
                for d in dropped:
                    c = d.constraint
                    if c.group == reason.group and order[id(c)] < order[id(reason)]:
                        wish = self._wish(c, witness) or {}
                        if wish.get(name, value) != value:
                            passed.append((wish[name], c))
            decisions[name] = Decision(name, value, reason, passed)
        return decisions

    def _decides(self, c: Constraint, name: str, assignment: Assignment) -> bool:
        """Does c, given the other variables, rule out every other value of `name`?"""
        others = [v for v in self.problem.variables[name].values if v != assignment[name]]
        if not others:
            return False  # a one-value variable is decided by its domain, not by any constraint
        if not c.holds(*(assignment[v] for v in c.variables)):
            return False
        for other in others:
            trial = dict(assignment)
            trial[name] = other
            if c.holds(*(trial[v] for v in c.variables)):
                return False
        return True

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
        self, background: list[Constraint], delta: list[Constraint], constraints: list[Constraint]
    ) -> list[Constraint]:
        if delta and not self.consistent(background):
            return []
        if len(constraints) == 1:
            return list(constraints)
        half = len(constraints) // 2
        first, second = constraints[:half], constraints[half:]
        d2 = self._quickxplain(background + first, first, second)
        d1 = self._quickxplain(background + d2, d2, first)
        return d1 + d2


def solve(problem: Problem) -> Solution | Conflict:
    return Solver(problem).solve()
