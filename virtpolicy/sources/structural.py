"""libvirt/QEMU structural facts (knowledge/data/structural.toml), expanded over the domain's devices.

Hard: a structural rule is why libvirt or QEMU would refuse the domain; each row names its file:line
and its citation in libvirt's or QEMU's source.
"""

from __future__ import annotations

from virtpolicy.core.problem import AtMost, Provenance, Strength
from virtpolicy.knowledge.tables import StructuralRule, structural
from virtpolicy.sources.context import PLAN_ENTRIES_KEPT, BuildContext, Kept, structural_provenance

_Settled = tuple[str, tuple[tuple[str, ...], tuple[frozenset[str], ...]] | None]
# (row id, names, their domains) -> (the row, what it made): StructuralSource._kept; bounded
_KEPT: Kept[_Settled] = Kept(8192)


# (id, variables, sets, message, provenance, (value, limit) of an AtMost or None for a Forbid), in order
_Planned = tuple[str, tuple[str, ...], tuple[frozenset[str], ...], str, Provenance, tuple[str, int] | None]
# StructuralSource.constrain's plans by what the rows read, each with the table it was made from; bounded
_PLANS: Kept[tuple[_Planned, ...]] = Kept(32)
_LACKING: list[tuple[dict[str, StructuralRule], tuple[str, ...]]] = []  # _lacking_paths' answer, with its table


def _lacking_paths(rules: dict[str, StructuralRule]) -> tuple[str, ...]:
    """The children whose presence leaves an instance out of some row (`only_where_missing`)."""
    if _LACKING and _LACKING[0][0] is rules:
        return _LACKING[0][1]
    paths = tuple(sorted({r.only_where_missing for r in rules.values() if r.only_where_missing}))
    _LACKING[:] = [(rules, paths)]
    return paths


class StructuralSource:
    name = "structural"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self._plan: list[_Planned] = []  # what _rows adds, in order (see constrain)

    def constrain(self) -> None:
        """The rows, as the plan kept for everything they read (worked out on the first request with that key),
        then the app's `written` elements: a repeated request only adds the plan's constraints."""
        _, rules = structural()
        ctx = self.ctx
        key = (
            ctx.arch,
            tuple(i.prefix for i in ctx.instances),
            tuple((n, v.values) for n, v in ctx.problem.variables.items()),
            # the instances each `only_where_missing` row leaves out (their element has that child)
            tuple(
                tuple(i.prefix for i in ctx.instances if i.element is not None and i.element.find(path) is not None)
                for path in _lacking_paths(rules)
            ),
        )
        kept = _PLANS.get(key, rules)
        if kept is not None:
            for cid, names, sets, message, prov, at_most in kept:
                if at_most is None:
                    ctx.forbid_sets(cid, names, sets, message, prov, Strength.HARD, 0, (), "")
                else:
                    ctx.problem.add(
                        AtMost(
                            id=cid,
                            variables=names,
                            message=message,
                            provenance=prov,
                            value=at_most[0],
                            limit=at_most[1],
                        )
                    )
        else:
            self._plan = []
            self._rows(rules)
            if len(self._plan) <= PLAN_ENTRIES_KEPT:
                _PLANS.put(key, rules, tuple(self._plan))
        self._written()

    def _forbid(
        self, cid: str, settled: tuple[tuple[str, ...], tuple[frozenset[str], ...]], message: str, prov: Provenance
    ) -> None:
        self._plan.append((cid, *settled, message, prov, None))
        self.ctx.forbid_sets(cid, *settled, message, prov, Strength.HARD, 0, (), "")

    def _rows(self, rules: dict[str, StructuralRule]) -> None:
        """Every row (but the `written` ones) expanded over the instances, each constraint noted in the plan."""
        ctx = self.ctx
        variables = ctx.problem.variables
        for rule in rules.values():
            if rule.arches and ctx.arch not in rule.arches:
                continue  # a fact of other architectures
            if rule.written:
                continue  # expanded over the app's elements below
            prov = structural_provenance(rule.id)
            if rule.at_most:
                by_class = ctx.instances_by_class()
                refs = list(rule.at_most["variables"])  # type: ignore[arg-type]
                names = [i.var(r.split(".")[1]) for r in refs for i in by_class.get(r.split(".")[0], ())]
                if names:
                    value, limit = str(rule.at_most["value"]), int(rule.at_most["limit"])  # type: ignore[call-overload]
                    cid = f"structural:{rule.id}"
                    self._plan.append((cid, tuple(names), (), rule.text, prov, (value, limit)))
                    ctx.problem.add(
                        AtMost(
                            id=cid, variables=tuple(names), message=rule.text, provenance=prov, value=value, limit=limit
                        )
                    )
                continue
            if rule.forbid_values:
                for ref in rule.variables:
                    for mapping in ctx.expand([ref, *rule.when]):
                        found = self._kept(rule, mapping)
                        if found is None:
                            conds = [(mapping[w], ctx.values(mapping[w], vals)) for w, vals in rule.when.items()]
                            conds.append((mapping[ref], frozenset(rule.forbid_values)))
                            found = self._keep(rule, mapping, f"structural:{rule.id}:{mapping[ref]}", conds)
                        if found[1] is not None:
                            self._forbid(found[0], found[1], rule.text, prov)
                continue
            refs = list(rule.forbid) + list(rule.when) + list(rule.require)
            for mapping in ctx.expand(refs, rule.only_where_missing):
                found = self._kept(rule, mapping)
                if found is None:
                    conds = [(mapping[r], ctx.values(mapping[r], vals)) for r, vals in rule.forbid.items()]
                    conds += [(mapping[r], ctx.values(mapping[r], vals)) for r, vals in rule.when.items()]
                    for r, vals in rule.require.items():
                        name = mapping[r]
                        domain = variables[name].values if name in variables else ()
                        conds.append((name, frozenset(v for v in domain if v not in vals)))
                    suffix = ",".join(sorted({n for n, _ in conds} - {r for r in refs}))
                    cid = f"structural:{rule.id}" + (f":{suffix}" if suffix else "")
                    found = self._keep(rule, mapping, cid, conds)
                if found[1] is not None:
                    self._forbid(found[0], found[1], rule.text, prov)

    def _key(self, rule: StructuralRule, mapping: dict[str, str]) -> tuple[object, ...]:
        variables = self.ctx.problem.variables
        names = tuple(mapping.values())
        return (rule.id, names, *(variables[n].values if n in variables else None for n in names))

    def _kept(self, rule: StructuralRule, mapping: dict[str, str]) -> _Settled | None:
        """What a row made of these names over these domains on an earlier build: the Forbid's id and its
        (variables, sets), or None as the second item when it makes none.

        A row's conditions depend only on its names and their domains (its specs are the table's), so
        every request for a typical VM asks the same ~100 of them again."""
        return _KEPT.get(self._key(rule, mapping), rule)

    def _keep(
        self, rule: StructuralRule, mapping: dict[str, str], cid: str, conds: list[tuple[str, frozenset[str]]]
    ) -> _Settled:
        return _KEPT.put(self._key(rule, mapping), rule, (cid, self.ctx.settle(conds) if conds else None))

    def _written(self) -> None:
        """The app's element exists only on the machines (and architectures) its row allows."""
        machines = self.ctx.problem.variables["machine"].values
        for fact in self.ctx.written:
            rule = fact.rule
            conds = [(fact.variable, frozenset([fact.value]))]
            if not rule.needs_arch or self.ctx.arch in rule.needs_arch:
                if "machine" not in rule.require:
                    continue
                conds.append(("machine", frozenset(m for m in machines if m not in rule.require["machine"])))
            self.ctx.forbid(f"structural:{rule.id}:{fact.xpath}", conds, rule.text, structural_provenance(rule.id))
