"""libvirt/QEMU structural facts (knowledge/data/structural.toml), expanded over the domain's devices.

Hard: a structural rule is why libvirt or QEMU would refuse the domain; each row names its file:line
and its citation in libvirt's or QEMU's source.
"""

from __future__ import annotations

from virtpolicy.core.problem import AtMost
from virtpolicy.knowledge.tables import structural
from virtpolicy.sources.context import BuildContext, structural_provenance


class StructuralSource:
    name = "structural"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx

    def constrain(self) -> None:
        _, rules = structural()
        for rule in rules.values():
            if rule.arches and self.ctx.arch not in rule.arches:
                continue  # a fact of other architectures
            prov = structural_provenance(rule.id)
            if rule.written:
                continue  # expanded over the app's elements below
            if rule.at_most:
                refs = list(rule.at_most["variables"])  # type: ignore[arg-type]
                names = [
                    i.var(r.split(".")[1]) for r in refs for i in self.ctx.instances if i.cls.name == r.split(".")[0]
                ]
                if names:
                    self.ctx.problem.add(
                        AtMost(
                            id=f"structural:{rule.id}",
                            variables=tuple(names),
                            message=rule.text,
                            provenance=prov,
                            value=str(rule.at_most["value"]),
                            limit=int(rule.at_most["limit"]),  # type: ignore[call-overload]
                        )
                    )
                continue
            if rule.forbid_values:
                for ref in rule.variables:
                    for mapping in self.ctx.expand([ref, *rule.when]):
                        conds = [(mapping[w], self.ctx.values(mapping[w], vals)) for w, vals in rule.when.items()]
                        conds.append((mapping[ref], frozenset(rule.forbid_values)))
                        self.ctx.forbid(f"structural:{rule.id}:{mapping[ref]}", conds, rule.text, prov)
                continue
            refs = list(rule.forbid) + list(rule.when) + list(rule.require)
            for mapping in self.ctx.expand(refs, rule.only_where_missing):
                conds = [(mapping[r], self.ctx.values(mapping[r], vals)) for r, vals in rule.forbid.items()]
                conds += [(mapping[r], self.ctx.values(mapping[r], vals)) for r, vals in rule.when.items()]
                for r, vals in rule.require.items():
                    name = mapping[r]
                    domain = self.ctx.problem.variables[name].values if name in self.ctx.problem.variables else ()
                    conds.append((name, frozenset(v for v in domain if v not in vals)))
                suffix = ",".join(sorted({n for n, _ in conds} - {r for r in refs}))
                self.ctx.forbid(f"structural:{rule.id}" + (f":{suffix}" if suffix else ""), conds, rule.text, prov)
        self._written()

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
