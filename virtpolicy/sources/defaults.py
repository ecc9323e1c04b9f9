"""The engine's own defaults (knowledge/data/engine-defaults.toml): the weakest source, soft preferences only.

They decide what nothing else decides, in libvirt's and virt-install's spirit (virtio where the guest
drives it, q35, UEFI where the OS supports it), and the Hyper-V enlightenments for Windows guests.
"""

from __future__ import annotations

from functools import lru_cache

from virtpolicy.core.problem import Forbid, Provenance, Source, Strength
from virtpolicy.knowledge.tables import Preference, engine_defaults
from virtpolicy.sources.app import hyperv_written
from virtpolicy.sources.context import PLAN_ENTRIES_KEPT, BuildContext, Kept

# id(preference) -> (that preference, its provenance, its recipes by (name, domains)): kept across builds, as
# the tables and the shapes of typical domains repeat; a reloaded table's rows make their own entries
# (id, variables, sets, message, group, what _order_domains reads of it) per soft Forbid
_Recipe = tuple[
    tuple[str, tuple[str, ...], tuple[frozenset[str], ...], str, str, tuple[tuple[str, str | None], ...]], ...
]
# (id, variables, sets, message, provenance, group, what _order_domains reads of it or None) per soft Forbid
_Planned = tuple[
    str, tuple[str, ...], tuple[frozenset[str], ...], str, Provenance, str, tuple[tuple[str, str | None], ...] | None
]
_Plan = tuple[_Planned, ...]
# DefaultsSource.prefer's plans by what they read, each with the table it was made from; bounded
_PLANS: Kept[_Plan] = Kept(32)
_PREFERRED: dict[int, tuple[Preference, Provenance, dict[tuple[object, ...], _Recipe]]] = {}
_RECIPES_PER_PREFERENCE = 1024  # a bound on what a stream of unusual domains can leave behind


@lru_cache(maxsize=8192)
def _rest(domain: tuple[str, ...], value: str) -> frozenset[str]:
    """The rest of a domain: one set per (domain, value), shared by every preference over that domain."""
    return frozenset(v for v in domain if v != value)


def _one_left(values: tuple[str, ...], forbidden: frozenset[str]) -> str | None:
    """The one value of a domain a set leaves allowed, or None when it leaves none or several."""
    allowed = [v for v in values if v not in forbidden]
    return allowed[0] if len(allowed) == 1 else None


class DefaultsSource:
    name = "defaults"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        # position in the constraints -> what _order_domains reads of the recipe's Forbid there, worked
        # out with its recipe (the domains are the recipe's key, and nothing changes them before it runs)
        self._ones_at: dict[int, tuple[tuple[str, str | None], ...]] = {}

    def declare(self) -> None:
        _, features = engine_defaults()
        app_hyperv = self.ctx.domain.root.find("features/hyperv")
        if not self.ctx.guest.is_windows and app_hyperv is None:
            return
        for feature in features:
            if not self.ctx.guest.is_windows and hyperv_written(self.ctx.domain, feature) is None:
                continue
            self.ctx.hyperv.append(feature)
            self.ctx.problem.add_variable(f"hyperv.{feature.feature}", ("on", "off"), f"Hyper-V {feature.feature}")

    def prefer(self) -> None:
        prefs, _ = engine_defaults()
        ctx = self.ctx
        # everything the preferences read: the guest facts their rows test, the instances they expand over,
        # the variables and their domains, the Hyper-V features this build decides
        key = (
            tuple(getattr(ctx.guest, k) for pref in prefs for k in pref.when_guest),
            tuple(i.prefix for i in ctx.instances),
            tuple((n, v.values) for n, v in ctx.problem.variables.items()),
            tuple(f.feature for f in ctx.hyperv),
        )
        plan = _PLANS.get(key, prefs)
        if plan is None:
            plan = self._plan(prefs)
            if len(plan) <= PLAN_ENTRIES_KEPT:
                _PLANS.put(key, prefs, plan)
        constraints = ctx.problem.constraints
        for cid, names, sets, message, prov, group, ones in plan:
            if ones is not None:
                self._ones_at[len(constraints)] = ones  # forbid_sets appends this one Forbid there
            ctx.forbid_sets(cid, names, sets, message, prov, Strength.SOFT, 0, (), group)
        self._order_domains()

    def _plan(self, prefs: tuple[Preference, ...]) -> _Plan:
        """The soft Forbids of every preference, in order, as forbid_sets' arguments (the id before a
        clash with an earlier one is settled): the same for every build with the same key (`prefer`)."""
        ctx = self.ctx
        variables = ctx.problem.variables
        plan: list[_Planned] = []
        for pref in prefs:
            if any(getattr(ctx.guest, k) not in v for k, v in pref.when_guest.items()):
                continue
            kept = _PREFERRED.get(id(pref))
            if kept is None or kept[0] is not pref:
                # one provenance per preference (frozen, so shared): a 40-device domain makes ~600 of these
                prov = Provenance(Source.ENGINE, pref.id, pref.where, data=(("preference", pref.id),))
                kept = _PREFERRED[id(pref)] = (pref, prov, {})
            _, prov, recipes = kept
            for mapping in ctx.expand([pref.variable, *pref.when]):
                name = mapping[pref.variable]
                if name not in variables:
                    continue
                names = [mapping[w] for w in pref.when]
                plain = name not in names and len(set(names)) == len(names) and all(w in variables for w in names)
                if not plain:  # a shape the recipes do not cover (a missing or repeated variable): as it comes
                    plan += self._prefer_through_forbid(pref, prov, mapping, name)
                    continue
                key = (name, *names, variables[name].values, *(variables[w].values for w in names))
                recipe = recipes.get(key)
                if recipe is None:
                    if len(recipes) >= _RECIPES_PER_PREFERENCE:
                        recipes.clear()
                    recipe = recipes[key] = self._recipe(pref, mapping, name)
                for cid, kept_names, sets, message, group, ones in recipe:
                    plan.append((cid, kept_names, sets, message, prov, group, ones))
        hyperv = Provenance(Source.ENGINE, "engine.hyperv", "engine-defaults.toml [[hyperv]]")
        for feature in ctx.hyperv:
            name = f"hyperv.{feature.feature}"
            settled = ctx.settle([(name, frozenset(["off"]))])
            if settled is not None:
                message = f"prefer Hyper-V {feature.feature} on for Windows guests, where the host offers it"
                plan.append((f"engine.hyperv:{name}=on", *settled, message, hyperv, "", None))
        return tuple(plan)

    def _recipe(self, pref: Preference, mapping: dict[str, str], name: str) -> _Recipe:
        """The soft Forbids of one preference over one instance, as forbid_sets' arguments in order.

        What _add_forbid would make of the `when` part is worked out once for all values (it is the same for
        each). It depends only on the names and the domains of the variables involved, which is the key
        `prefer` keeps it under: twenty disks, and every request for the same typical VM, share it."""
        variables = self.ctx.problem.variables
        domain = variables[name].values
        when = [(mapping[w], self.ctx.values(mapping[w], vals)) for w, vals in pref.when.items()]
        if any(not vals for _, vals in when):
            return ()  # can never be violated, whatever the value
        kept = [(w, vals) for w, vals in when if not vals.issuperset(variables[w].values)]
        kept_names = (*(w for w, _ in kept), name)
        kept_sets = tuple(vals for _, vals in kept)
        group = f"{pref.id}:{name}"
        found = []
        for value in pref.order:
            if value not in domain:
                continue
            rest = _rest(domain, value)
            if rest:  # else the domain is this value alone: never violated
                # `rest` never covers the domain (it lacks `value`), so it always stays
                cid, message = f"{group}={value}", f"prefer {name} = {value}: {pref.why}"
                sets = (*kept_sets, rest)
                ones = tuple(
                    (n, _one_left(variables[n].values, f))
                    for n, f in zip(kept_names, sets, strict=True)
                    if len(variables[n].values) - len(f) <= 1
                )
                found.append((cid, kept_names, sets, message, group, ones))
        return tuple(found)

    def _prefer_through_forbid(
        self, pref: Preference, prov: Provenance, mapping: dict[str, str], name: str
    ) -> list[_Planned]:
        """A preference whose `when` repeats a variable, names a missing one or the preferred one itself."""
        domain = self.ctx.problem.variables[name].values
        when = [(mapping[w], self.ctx.values(mapping[w], vals)) for w, vals in pref.when.items()]
        group = f"{pref.id}:{name}"
        found: list[_Planned] = []
        for value in pref.order:
            if value not in domain:
                continue
            settled = self.ctx.settle([*when, (name, _rest(domain, value))])
            if settled is not None:
                message = f"prefer {name} = {value}: {pref.why}"
                found.append((f"{group}={value}", *settled, message, prov, group, None))
        return found

    def _order_domains(self) -> None:
        """Put each variable's preferred values first, so the first search already finds good witnesses."""
        preferred: dict[str, list[str]] = {}
        variables = self.ctx.problem.variables
        # (domain, forbidden set) -> the one value left, or None: preferences share their sets (one per
        # domain and value), so twenty disks' preferences are worked out once
        only: dict[tuple[tuple[str, ...], frozenset[str]], str | None] = {}
        ones_at = self._ones_at
        for index, c in enumerate(self.ctx.problem.constraints):
            if c.strength is Strength.HARD or not isinstance(c, Forbid):
                continue
            ones = ones_at.get(index)
            if ones is not None:  # a preference's Forbid: its pairs were read with its recipe
                for name, one in ones:
                    order = preferred.setdefault(name, [])
                    if one is not None and one not in order:
                        order.append(one)
                continue
            for name, forbidden in zip(c.variables, c.sets, strict=True):
                values = variables[name].values
                if len(values) - len(forbidden) > 1:
                    continue  # at least two values stay allowed: not a preference for one value
                key = (values, forbidden) if isinstance(forbidden, frozenset) else None  # a set: not kept
                if key is not None and key in only:
                    one = only[key]
                else:
                    one = _one_left(values, forbidden)
                    if key is not None:
                        only[key] = one
                order = preferred.setdefault(name, [])
                if one is not None and one not in order:
                    order.append(one)
        for name, order in preferred.items():
            var = self.ctx.problem.variables[name]
            order += [v for v in var.values if v not in order]
            self.ctx.problem.variables[name] = type(var)(var.name, tuple(order), var.label)
