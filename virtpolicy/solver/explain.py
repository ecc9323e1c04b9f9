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
from dataclasses import dataclass, field

from virtpolicy.solver.problem import Constraint, Problem, Source
from virtpolicy.solver.solve import Solver

# what changing a requirement of each kind costs the user: profiles are cheap to drop, the app's own XML
# is its intent, and libvirt/QEMU facts cannot be changed at all
COST = {Source.PROFILE: 1, Source.GUEST: 3, Source.HOST: 5, Source.APP: 8, Source.ENGINE: 0}
MAX_HITTING_SETS = 5000
REPAIR_TRIES = 64  # combinations of one device's other variables tried before asking the solver


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
        """For a feasible problem: why each variable has its value, and what excluded each other value.

        Each other value is first tried as a repair of the witness within its own device (`_repairable`):
        when that works the value is possible, exactly as a search would have found, at the cost of the
        device's few constraints instead of a solve of the whole domain per value.
        """
        hard = self.candidates
        on_var: dict[str, list[Constraint]] = {}
        for c in [*self.background, *hard]:
            for v in dict.fromkeys(c.variables):
                on_var.setdefault(v, []).append(c)
        device_of: dict[str, list[str]] = {}
        for name in self.problem.variables:
            device_of.setdefault(name.split(".")[0], []).append(name)
        reasons = []
        for name, var in self.problem.variables.items():
            excluded = []
            for value in var.values:
                if value == witness[name]:
                    continue
                wish = _pin(name, value, self.problem)
                # the witness with just this value changed often proves the value possible without a search
                self.solver.hints = [{**witness, name: value}]
                if self._repairable(witness, name, value, device_of[name.split(".")[0]], on_var) or self._feasible(
                    [*hard, wish]
                ):
                    by = [decided_by[name]] if decided_by.get(name) is not None else []
                    excluded.append(Excluded(value, by, hard=False))  # type: ignore[list-item]
                else:
                    blame = self.solver._quickxplain([*self.background, wish], [], hard)  # noqa: SLF001
                    excluded.append(Excluded(value, blame, hard=True))
            reasons.append(DecisionReason(name, witness[name], var.label, decided_by.get(name), excluded))
        self.solver.hints = []
        del kept
        return reasons

    def _repairable(
        self,
        witness: dict[str, str],
        name: str,
        value: str,
        device: list[str],
        on_var: dict[str, list[Constraint]],
    ) -> bool:
        """Is there a solution with `name = value` that differs from the witness only in this device's
        variables? The witness satisfies every hard constraint, so only the constraints on those variables
        need checking: True is a proof, False only means "ask the solver". Narrow constraints are checked
        first, so a capacity over every device is evaluated only for a candidate that passes the rest."""
        others = [v for v in device if v != name]
        touched = sorted({id(c): c for v in device for c in on_var.get(v, ())}.values(), key=lambda c: len(c.variables))
        choices = [[witness[v], *(x for x in self.problem.variables[v].values if x != witness[v])] for v in others]
        for tried, combo in enumerate(itertools.product(*choices)):
            if tried >= REPAIR_TRIES:
                return False
            local = dict(zip(others, combo, strict=True))
            local[name] = value
            if all(c.holds(*(local[v] if v in local else witness[v] for v in c.variables)) for c in touched):
                return True
        return False

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
    from virtpolicy.solver.problem import Provenance, require

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
