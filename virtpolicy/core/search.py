"""The engine's own search and propagation, for domains of thousands of devices.

`Search` is python-constraint's BacktrackingSolver with forward checking, step for step: the same
variable order (most constraints, then fewest values left, then declaration order), the same value order
(the end of the current domain first), the same constraint calls in the same order, and the same
restoring of hidden values (appended to the end of a domain, which later changes the value order). So it
returns the very solution python-constraint returns, and the engine's output does not depend on which of
the two ran. What differs is the bookkeeping: python-constraint sorts every variable and saves every
unassigned domain at each step, and a FunctionConstraint counts its unassigned variables at each call,
all linear in the size of the problem, so a search over a thousand devices was quadratic (7.6 s for the
first solution of 1,000 disks). Here the next variable comes from a heap, hidden values are kept on a
trail per level, each constraint keeps a count of its assigned variables, and a bus budget keeps counts
of its devices per bus kind, updated as values are assigned, hidden and restored.

`Store` serves the soft-preference loop of `Solver.solve`: the domains of the hard and kept requirements
after unit propagation, kept up to date as requirements are kept. A one-variable preference that the
store refutes (a device's `slot = pcie` once the root ports are spoken for, by devices the kept models
already force onto PCIe) cannot be kept; before, each such preference cost a full search that failed.
Propagation and the bus-budget bound only remove values no solution takes, so the store refutes only
preferences that the search would have refuted: the output is the same.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, cast

from virtpolicy.core.budget import OPEN, PCI, PCIE, BusBudget
from virtpolicy.core.problem import BUDGET, FORBID, Constraint, Forbid

State = str | list[str]  # a variable's value, or the values its domain still holds
WIDE = 8  # constraints over more variables than this are not propagated by the store (capacities)


class SearchLimit(Exception):
    """A search stopped at its step limit, with no answer."""


class Tally:
    """Counts of a bus budget's devices per bus kind, updated one variable at a time.

    `state` gives a variable's value, or its open values (`Search`, `Store`: the bound of
    `BusBudget.pair_class`), or Unassigned (`holds`: the bound of `BusBudget.holds_class`, what
    `BusBudget.holds` computes by scanning every device)."""

    def __init__(self, budget: BusBudget, state: Callable[[str], object], holds: bool = False) -> None:
        self.budget = budget
        self.state = state
        self.classify: Callable[[Any, Any], int] = budget.holds_class if holds else budget.pair_class
        self.spare_of: Callable[[Any], int] = budget.spare_given if holds else budget.spare_of
        names = budget.variables
        self.pair_of: dict[str, int] = {}
        for i in range(budget.npairs):
            self.pair_of[names[2 * i]] = i
            self.pair_of[names[2 * i + 1]] = i
        self.kind = [self.classify(state(names[2 * i]), state(names[2 * i + 1])) for i in range(budget.npairs)]
        self.counts = [0, 0, 0, 0]
        for k in self.kind:
            self.counts[k] += 1
        self.spare = self.spare_of(state(budget.limit_var)) if budget.limit_var is not None else 0

    def pair_kind(self, i: int, state: Callable[[str], object]) -> int:
        names = self.budget.variables
        return self.classify(state(names[2 * i]), state(names[2 * i + 1]))

    def update(self, var: str) -> None:
        """`var` changed (assigned, unassigned, a value hidden or restored): recount its device."""
        i = self.pair_of.get(var)
        if i is not None:
            kind = self.pair_kind(i, self.state)
            if kind != self.kind[i]:
                self.counts[self.kind[i]] -= 1
                self.counts[kind] += 1
                self.kind[i] = kind
        if var == self.budget.limit_var:
            self.spare = self.spare_of(self.state(var))

    def fits(self) -> bool:
        return self.budget.fits(self.spare, self.counts[PCIE], self.counts[PCI], self.counts[OPEN])

    def fits_with(self, changed: Collection[str], state: Callable[[str], object]) -> bool:
        """The bound with some variables in another state, without recording it."""
        counts = list(self.counts)
        spare = self.spare
        for i in {self.pair_of[v] for v in changed if v in self.pair_of}:
            kind = self.pair_kind(i, state)
            counts[self.kind[i]] -= 1
            counts[kind] += 1
        limit_var = self.budget.limit_var
        if limit_var is not None and limit_var in changed:
            spare = self.spare_of(state(limit_var))
        return self.budget.fits(spare, counts[PCIE], counts[PCI], counts[OPEN])


class Search:
    """python-constraint's BacktrackingSolver(forwardcheck=True).getSolution(), without its linear steps.

    `names` in declaration order, `domains` as python-constraint holds them (the preferred value last),
    `checks` in the order python-constraint received them: (constraint, its free variables, the function of
    those variables' values). A BusBudget is counted incrementally, as `budget.BudgetCheck` counts it; every
    other constraint behaves as python-constraint's FunctionConstraint.
    """

    def __init__(
        self,
        names: Sequence[str],
        domains: dict[str, list[str]],
        checks: Sequence[tuple[Constraint, tuple[str, ...], Callable[..., bool]]],
        fixed: dict[str, str],
    ) -> None:
        self.names = list(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.domains = [list(domains[name]) for name in self.names]
        self.values: list[str | None] = [None] * len(self.names)  # the assignment (None: unassigned)
        self.order: dict[int, None] = {}  # assigned variables in python-constraint's dict order
        self.fixed = fixed
        self.vars: list[list[int]] = []
        self.funcs: list[Callable[..., bool] | None] = []
        self.tallies: list[Tally | None] = []
        self.nogoods: list[list[frozenset[str]] | None] = []  # a Forbid's sets, in `free` order
        self.assigned = [0] * len(checks)  # per constraint: how many of its variables are assigned
        self.on: list[list[int]] = [[] for _ in self.names]  # per variable: its constraints, in order
        self.tallies_on: list[list[Tally]] = [[] for _ in self.names]
        index, on, tallies, funcs, nogoods = self.index, self.on, self.tallies, self.funcs, self.nogoods
        for k, (c, free, func) in enumerate(checks):
            members = [index[v] for v in free]
            self.vars.append(members)
            for v in members:
                on[v].append(k)
            kind = c.kind
            if kind == FORBID:
                c = cast(Forbid, c)  # by its kind: no ABCMeta instance check in the loop
                tallies.append(None)
                funcs.append(func)
                nogoods.append(_free_sets(c, fixed))
            elif kind == BUDGET:
                c = cast(BusBudget, c)
                tally = Tally(c, self._state)
                tallies.append(tally)
                funcs.append(None)
                nogoods.append(None)
                for v in dict.fromkeys(members):
                    self.tallies_on[v].append(tally)
            else:
                tallies.append(None)
                funcs.append(func)
                nogoods.append(None)
        self.degree = [len(on) for on in self.on]
        self.trail: list[list[tuple[int, str]]] = []
        self.steps = 0  # values tried so far
        self.unassigned = len(self.names)
        self.heap = [(-self.degree[v], len(self.domains[v]), v) for v in range(len(self.names))]
        heapq.heapify(self.heap)

    @staticmethod
    def supports(checks: Sequence[tuple[Constraint, tuple[str, ...], Callable[..., bool]]]) -> bool:
        """Whether every constraint is one this search reproduces exactly: distinct variables each (a repeated
        one changes python-constraint's counts), and a search check of its own only for a bus budget."""
        for c, free, _ in checks:
            if len(set(free)) != len(free) or (c.kind != BUDGET and hasattr(c, "search_check")):
                return False
        return True

    # --- state -----------------------------------------------------------------------------------------
    def _state(self, name: str) -> State:
        """What budget.BudgetCheck reads: a fixed or assigned value, the one value left, or the values left."""
        if name in self.fixed:
            return self.fixed[name]
        v = self.index[name]
        value = self.values[v]
        if value is not None:
            return value
        current = self.domains[v]
        return current[0] if len(current) == 1 else current

    def _changed(self, v: int) -> None:
        for tally in self.tallies_on[v]:
            tally.update(self.names[v])

    def _assign(self, v: int, value: str) -> None:
        if self.values[v] is None:
            self.unassigned -= 1
            self.order[v] = None
            for k in self.on[v]:
                self.assigned[k] += 1
        self.values[v] = value
        self._changed(v)

    def _unassign(self, v: int) -> None:
        self.values[v] = None
        del self.order[v]
        self.unassigned += 1
        for k in self.on[v]:
            self.assigned[k] -= 1
        self._changed(v)
        heapq.heappush(self.heap, (-self.degree[v], len(self.domains[v]), v))

    def _hide(self, v: int, value: str) -> None:
        self.domains[v].remove(value)
        self.trail[-1].append((v, value))
        self._changed(v)
        heapq.heappush(self.heap, (-self.degree[v], len(self.domains[v]), v))

    def _restore(self) -> None:
        """Domain.popState on every domain saved at this level: hidden values come back at the end."""
        for v, value in self.trail.pop():
            self.domains[v].append(value)
            self._changed(v)
            heapq.heappush(self.heap, (-self.degree[v], len(self.domains[v]), v))

    def _select(self) -> int | None:
        """The unassigned variable with the most constraints, then the fewest values, then declared first."""
        heap = self.heap
        while heap:
            _, size, v = heap[0]
            if self.values[v] is None and size == len(self.domains[v]):
                return v
            heapq.heappop(heap)
        return None

    # --- constraints ---------------------------------------------------------------------------------------
    def _call(self, k: int, forwardcheck: bool) -> bool:
        """python-constraint's call of constraint k: check it once all its variables are assigned, and with
        forward checking, once one is left, hide that one's values that fail it (hidden in domain order)."""
        sets = self.nogoods[k]
        if sets is not None:  # the common case, first, with set lookups instead of evaluating the constraint
            members = self.vars[k]
            missing = len(members) - self.assigned[k]
            if missing > 1 or (missing and not forwardcheck):
                return True
            values = self.values
            if not missing:
                for v, forbidden in zip(members, sets, strict=True):
                    if values[v] not in forbidden:
                        break
                else:
                    return False
                return True
            u, open_set = 0, sets[0]
            satisfied = False  # by an assigned value: then every value of the open variable passes
            for v, forbidden in zip(members, sets, strict=True):
                value = values[v]
                if value is None:
                    u, open_set = v, forbidden
                elif value not in forbidden:
                    satisfied = True
            domain = self.domains[u]
            if not satisfied and domain:
                for value in domain[:]:
                    if value in open_set:
                        self._hide(u, value)
            return bool(domain)
        tally = self.tallies[k]
        if tally is not None:
            return tally.fits()
        members = self.vars[k]
        missing = len(members) - self.assigned[k]
        values = self.values
        func = self.funcs[k]
        assert func is not None
        if missing == 0:
            return func(*(values[v] for v in members))
        if not forwardcheck or missing != 1:
            return True
        position = next(i for i, v in enumerate(members) if values[v] is None)
        u = members[position]
        domain = self.domains[u]
        if domain:
            args = [values[v] for v in members]
            for value in domain[:]:
                args[position] = value
                if not func(*args):
                    self._hide(u, value)
        return bool(domain)

    # --- search --------------------------------------------------------------------------------------------
    def solve(self, steps: int | None = None) -> dict[str, str] | None:
        """The first solution python-constraint's getSolutionIter yields, or None. `steps`: at most that many
        values tried, else SearchLimit (a yes/no question that a long search would answer slowly)."""
        queue: list[tuple[int, list[str], bool]] = []
        while True:
            v = self._select()
            if v is None:
                return {self.names[u]: self.values[u] for u in self.order}  # type: ignore[misc]
            values = self.domains[v][:]
            forwardcheck = self.unassigned > 1  # python-constraint saves the other unassigned domains: any?
            while True:
                if not values:
                    self._unassign(v)
                    while queue:
                        v, values, forwardcheck = queue.pop()
                        if forwardcheck:
                            self._restore()
                        if values:
                            break
                        self._unassign(v)
                    else:
                        return None
                self._assign(v, values.pop())
                self.steps += 1
                if steps is not None and self.steps > steps:
                    raise SearchLimit
                if forwardcheck:
                    self.trail.append([])
                call = self._call
                for k in self.on[v]:
                    if not call(k, forwardcheck):
                        break
                else:
                    break
                if forwardcheck:
                    self._restore()
            queue.append((v, values, forwardcheck))


class Store:
    """Domains of the hard and kept requirements after unit propagation, narrowed as requirements are kept.

    Propagation reads whole domains: a nogood whose other variables can only take forbidden values strikes
    the forbidden values from the last one; a narrow constraint with one variable left open filters it; a bus
    budget is the bound of `budget.BusBudget.pair_class` on the current domains. Wider constraints are left to
    the search. Everything here only removes values that no solution takes, so a refutation is a proof.

    Kept requirements wait (`keep`) until the next question (`refutes`): every rule only narrows, and narrows
    more on narrower domains, so propagating them all at once reaches the very fixpoint that propagating
    after each one did (the greatest one below the start, whatever the order), and the soft loop keeps
    several requirements between two questions, most of them about the same few variables.
    """

    def __init__(self, domains: dict[str, list[str]], constraints: Iterable[Constraint]) -> None:
        self.domains = {name: list(values) for name, values in domains.items()}
        self.watching: dict[str, list[Constraint]] = {}
        self.tallies: list[Tally] = []
        self.tallies_on: dict[str, list[Tally]] = {}
        self.consistent = True
        self.pending: list[Constraint] = []  # kept, to propagate at the next question
        self.narrowed: dict[str, list[str]] = {}  # kept one-variable narrowings, likewise
        for c in constraints:
            self._watch(c)
            self.pending.append(c)

    def _watch(self, c: Constraint) -> None:
        if c.kind == BUDGET:
            assert isinstance(c, BusBudget)
            tally = Tally(c, lambda name: self._value(name, {}))
            self.tallies.append(tally)
            for v in dict.fromkeys(c.variables):
                self.tallies_on.setdefault(v, []).append(tally)
        elif len(c.variables) <= WIDE:
            for v in dict.fromkeys(c.variables):
                self.watching.setdefault(v, []).append(c)

    def _value(self, name: str, overlay: dict[str, list[str]]) -> State:
        current = overlay.get(name) or self.domains[name]
        return current[0] if len(current) == 1 else current

    def _flush(self) -> None:
        """Propagate what was kept since the last question, and commit it."""
        if not self.pending and not self.narrowed:
            return
        queue, overlay = self.pending, self.narrowed
        self.pending, self.narrowed = [], {}
        queued = set(queue)
        for name in overlay:
            for c in self.watching.get(name, ()):
                if c not in queued:
                    queue.append(c)
                    queued.add(c)
        entailed: set[Constraint] = set()
        changed = self._propagate(queue, overlay, entailed)
        if changed is None:
            self.consistent = False  # cannot happen for kept requirements; stop answering rather than guess
            return
        self._commit(changed)
        # a nogood with a variable that can no longer take a forbidden value holds whatever happens, now that
        # these domains are the store's (they only narrow): it is not looked at again
        affected: dict[str, None] = {}
        for c in entailed:
            affected.update(dict.fromkeys(c.variables))
        for name in affected:
            self.watching[name] = [c for c in self.watching[name] if c not in entailed]

    def _propagate(
        self, queue: list[Constraint], overlay: dict[str, list[str]], entailed: set[Constraint] | None = None
    ) -> dict[str, list[str]] | None:
        """Narrow `overlay` (changed domains over the store's) to a fixpoint from `queue`; None: refuted.
        `entailed` collects the nogoods found to hold whatever the rest of their variables take.

        A nogood is revised here, inline (most constraints are): when its other variables can only take
        forbidden values, the last one loses its forbidden values; when all can, it cannot hold."""
        queued = set(queue)
        watching, domains = self.watching, self.domains
        while queue:
            c = queue.pop()
            queued.discard(c)
            if c.kind == FORBID and len(c.variables) <= WIDE:
                c = cast(Forbid, c)  # by its kind: no ABCMeta instance check in the loop
                open_name = ""
                open_set: frozenset[str] = frozenset()
                open_values: list[str] = []
                for name, forbidden in zip(c.variables, c.sets, strict=True):
                    current = overlay.get(name) or domains[name]
                    if forbidden.issuperset(current):
                        continue  # must take a forbidden value
                    if forbidden.isdisjoint(current):
                        if entailed is not None:
                            entailed.add(c)
                        break  # satisfied whatever happens
                    if open_values:
                        break  # two variables still free to satisfy it
                    open_name, open_set, open_values = name, forbidden, current
                else:
                    if not open_values:
                        return None
                    name, values = open_name, [v for v in open_values if v not in open_set]
                    overlay[name] = values
                    for other in watching.get(name, ()):
                        if other not in queued and other is not c:
                            queue.append(other)
                            queued.add(other)
                continue
            narrowed = self._revise(c, overlay)
            if narrowed is None:
                return None
            if narrowed:
                name, values = narrowed
                overlay[name] = values
                for other in watching.get(name, ()):
                    if other not in queued and other is not c:
                        queue.append(other)
                        queued.add(other)
        if self.tallies:
            changed = list(overlay)
            for tally in self.tallies:
                if not tally.fits_with(changed, lambda name: self._value(name, overlay)):
                    return None
        return overlay

    def _revise(self, c: Constraint, overlay: dict[str, list[str]]) -> tuple[str, list[str]] | tuple[()] | None:
        """The domain a constraint other than a nogood narrows (empty: none), or None when it cannot hold on
        these domains: one with a single variable left open filters it; wider ones and bus budgets wait."""
        if c.kind == BUDGET or len(c.variables) > WIDE:
            return ()
        domains = self.domains
        doms = [overlay.get(name) or domains[name] for name in c.variables]
        open_at = [i for i, d in enumerate(doms) if len(d) > 1]
        if len(open_at) > 1 or len(set(c.variables)) != len(c.variables):
            return ()
        if not open_at:
            return () if c.holds(*(d[0] for d in doms)) else None
        i = open_at[0]
        kept = []
        for value in doms[i]:
            args = [d[0] for d in doms]
            args[i] = value
            if c.holds(*args):
                kept.append(value)
        if not kept:
            return None
        return (c.variables[i], kept) if len(kept) < len(doms[i]) else ()

    def _commit(self, overlay: dict[str, list[str]]) -> None:
        for name, values in overlay.items():
            self.domains[name] = values
            for tally in self.tallies_on.get(name, ()):
                tally.update(name)

    def refutes(self, c: Constraint) -> bool:
        """Whether keeping `c` leaves no solution (False: unknown, ask the search)."""
        self._flush()
        if not self.consistent or c.kind == BUDGET or len(c.variables) > WIDE:
            return False
        if len(c.variables) > 1:
            return self._propagate([c], {}) is None
        name = c.variables[0]
        narrowed = c.allows(self.domains[name])
        if not narrowed:
            return True
        if len(narrowed) == len(self.domains[name]):
            return False
        return self._propagate(list(self.watching.get(name, ())), {name: narrowed}) is None

    def keep(self, c: Constraint) -> None:
        """`c` is kept: its narrowing (or, for a wider one, the constraint itself) joins the store, to be
        propagated at the next question."""
        if not self.consistent:
            return
        if len(c.variables) == 1:
            name = c.variables[0]
            current = self.narrowed.get(name) or self.domains[name]
            narrowed = c.allows(current)
            if len(narrowed) < len(current):
                self.narrowed[name] = narrowed
        else:
            self._watch(c)
            self.pending.append(c)


def _free_sets(c: Forbid, fixed: dict[str, str]) -> list[frozenset[str]] | None:
    """A Forbid's forbidden sets of its free variables, when every fixed value is forbidden (else None: the
    constraint is evaluated as a function)."""
    sets = []
    for name, forbidden in zip(c.variables, c.sets, strict=True):
        if name in fixed:
            if fixed[name] not in forbidden:
                return None
        else:
            sets.append(forbidden)
    return sets
