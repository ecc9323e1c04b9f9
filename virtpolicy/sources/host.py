"""The host's capabilities and domcapabilities: what this host offers for each machine and domain type.

The only source that differs between the hosts of a fleet. A fact missing for one domain type is a
constraint on that type; missing for every type the host offers, one constraint says so for all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from virtpolicy.core.problem import Constraint, Provenance, Source, Strength
from virtpolicy.inputs.host import DomainCaps, Host
from virtpolicy.knowledge.machines import family_of
from virtpolicy.knowledge.tables import HostEnum, host_enums
from virtpolicy.sources.context import PLAN_ENTRIES_KEPT, BuildContext, Kept

_Lacking = dict[tuple[str, str], list[tuple[str, str, DomainCaps, tuple[str, ...]]]]
# id(host) -> (that host, its answers of _caps_lacking by (arch, machine values, domain-type values)): the
# host is held, so its id is not reused while it is here; a few hosts only (an engine's fleet is small, and
# a host loaded per request must not pile up)
_HOST_LACKING: Kept[Kept[_Lacking]] = Kept(16)
_ANSWERS_KEPT = 64  # per host: the machine and domain-type values a request can make are few
_PLANS_KEPT = 32  # per host: each plan's key holds every variable's domain


# id(host) -> (that host, HostSource.constrain's plans by what they read); held and bounded as _HOST_LACKING
_Plan = tuple[tuple[str, tuple[str, ...], tuple[frozenset[str], ...], str, Provenance, bool], ...]
_HOST_PLANS: Kept[Kept[_Plan]] = Kept(16)


def _plans_on(host: Host) -> Kept[_Plan]:
    return _HOST_PLANS.get_or_make(id(host), host, lambda: Kept(_PLANS_KEPT))


def _lacking_on(host: Host, over: tuple[str, tuple[str, ...], tuple[str, ...]]) -> _Lacking:
    answers = _HOST_LACKING.get_or_make(id(host), host, lambda: Kept(_ANSWERS_KEPT))
    return answers.get_or_make(over, host, dict)


class HostSource:
    name = "host"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self._host_lacks: dict[str, dict[str, str]] = {}  # fact -> virt type -> file lacking it
        # fact -> its per-virt-type constraints so far, each with its plan entry
        self._host_per_type: dict[str, list[tuple[Constraint, list[object]]]] = {}
        self._plan: list[list[object]] = []  # every Forbid constrain makes, in order (see _forbid)
        self._superseded: set[int] = set()  # ids of per-virt-type constraints a merged one replaced
        self._lacking: dict[tuple[str, str], list[tuple[str, str, DomainCaps, tuple[str, ...]]]] = {}
        self._lacking_over: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None  # what _lacking is for

    def _caps(self) -> Iterator[tuple[str, str, DomainCaps | None]]:
        for fam in self.ctx.problem.variables["machine"].values:
            for vt in self.ctx.problem.variables["domain.type"].values:
                yield fam, vt, self.ctx.host.domcaps_for(self.ctx.arch, vt, fam)

    def _host_where(self) -> str:
        return self.ctx.host.source.rsplit("/", 1)[-1]

    def constrain(self) -> None:
        """The host's facts, as the plan kept for this host and everything the facts read (worked out on the
        first request with that key): a repeated request, the usual case, only appends the plan's Forbids."""
        ctx = self.ctx
        key = (
            ctx.arch,
            ctx.app_machine.value if ctx.app_machine is not None else None,
            ctx.domain.vcpus,
            tuple(i.prefix for i in ctx.instances),
            tuple((n, v.values) for n, v in ctx.problem.variables.items()),
            tuple((f.feature, f.domcaps) for f in ctx.hyperv),
        )
        plans = _plans_on(ctx.host)
        rows = host_enums()
        kept = plans.get(key, rows)
        if kept is not None:
            constraints = ctx.problem.constraints
            dropped = set()
            for cid, names, sets, message, prov, superseded in kept:
                ctx.forbid_sets(cid, names, sets, message, prov, Strength.HARD, 0, (), "")
                if superseded:
                    dropped.add(id(constraints[-1]))
            if dropped:  # one pass, as the plan's first build did
                ctx.problem.constraints = [c for c in constraints if id(c) not in dropped]
            return
        self._plan = []
        self._constrain(rows)
        if len(self._plan) > PLAN_ENTRIES_KEPT:
            return
        plans.put(key, rows, tuple((cid, n, s, m, p, bool(sup)) for cid, n, s, m, p, sup in self._plan))

    def _forbid(
        self, cid: str, conds: list[tuple[str, frozenset[str]]], message: str, prov: Provenance
    ) -> list[object] | None:
        """ctx.forbid, noting the Forbid it makes in the plan (the entry, whose last item says whether a
        merged fact superseded it), or None when it makes none."""
        settled = self.ctx.settle(conds)
        if settled is None:
            return None
        entry: list[object] = [cid, settled[0], settled[1], message, prov, False]
        self._plan.append(entry)
        self.ctx.forbid_sets(cid, settled[0], settled[1], message, prov, Strength.HARD, 0, (), "")
        return entry

    def _constrain(self, rows: tuple[HostEnum, ...]) -> None:
        offered = self.ctx.host.virt_types(self.ctx.arch)
        for vt in self.ctx.problem.variables["domain.type"].values:
            if vt not in offered:
                self._forbid(
                    f"host:domain-type:{vt}",
                    [("domain.type", frozenset([vt]))],
                    f"the host offers no '{vt}' domains for {self.ctx.arch} (it offers {', '.join(offered) or 'none'})",
                    Provenance(Source.HOST, f"{self._host_where()}/capabilities.xml", f"guest arch {self.ctx.arch}"),
                )
        for fam, vt, caps in self._caps():
            if vt not in offered:
                continue
            if caps is None:
                self._forbid(
                    f"host:machine:{fam}:{vt}",
                    [("machine", frozenset([fam])), ("domain.type", frozenset([vt]))],
                    f"the host describes no {fam} machine for {self.ctx.arch} {vt} domains",
                    Provenance(Source.HOST, self._host_where(), f"no domcapabilities for {fam}/{vt}"),
                )
                continue
            if self.ctx.domain.vcpus > caps.vcpu_max:
                self._forbid_on_host(
                    f"vcpu-max:{fam}",
                    [("machine", frozenset([fam]))],
                    vt,
                    f"{self.ctx.domain.vcpus} vCPUs exceed the {caps.vcpu_max} that {caps.machine} allows",
                    Provenance(Source.HOST, caps.source, f"vcpu max='{caps.vcpu_max}'"),
                )
            self._host_lists_app_machine(fam, vt)
        for row in rows:
            for mapping in self.ctx.expand([row.variable]):
                name = mapping[row.variable]
                if name not in self.ctx.problem.variables:
                    continue
                for value in self.ctx.problem.variables[name].values:
                    if value in row.not_a_device or (row.value_map and value not in row.value_map):
                        continue
                    wanted = row.value_map.get(value, value)
                    self._host_offers(name, value, row.key, wanted)
        for feature in self.ctx.hyperv:
            self._host_offers(f"hyperv.{feature.feature}", "on", "features/hyperv/features", feature.domcaps)
        if self._superseded:  # one pass, not one per merged fact
            self.ctx.problem.constraints = [c for c in self.ctx.problem.constraints if id(c) not in self._superseded]
            self._superseded.clear()

    def _host_lists_app_machine(self, fam: str, vt: str) -> None:
        """The app's versioned machine name must exist on the host (its ABI is that exact version)."""
        app_family = family_of(self.ctx.app_machine.value) if self.ctx.app_machine else None
        if self.ctx.app_machine is None or app_family is None or app_family.name != fam:
            return
        if self.ctx.app_machine.value in (m.name for m in self.ctx.host.machines.get((self.ctx.arch, vt), [])):
            return
        self._forbid_on_host(
            "machine-name",
            [("machine", frozenset([fam]))],
            vt,
            f"the host lists no machine '{self.ctx.app_machine.value}' for {self.ctx.arch}",
            Provenance(Source.HOST, f"{self._host_where()}/capabilities.xml", "guest/arch/machine"),
        )

    def _caps_lacking(self, key: str, wanted: str) -> list[tuple[str, str, DomainCaps, tuple[str, ...]]]:
        """(machine, virt type, domcaps, enum) of every domcaps whose `key` enum lacks `wanted`.

        Every device of a class asks the same question (20 disks: 20 times per value), and every request
        to the same host again, so the answer is kept per host (its domcaps do not change once loaded) for
        the architecture and the machine and domain-type values it was computed over.
        """
        variables = self.ctx.problem.variables
        over = (self.ctx.arch, variables["machine"].values, variables["domain.type"].values)
        if over != self._lacking_over:
            self._lacking, self._lacking_over = _lacking_on(self.ctx.host, over), over
        found = self._lacking.get((key, wanted))
        if found is None:
            found = []
            for fam, vt, caps in self._caps():
                enum = caps.enum(key) if caps is not None else None
                if caps is not None and enum is not None and wanted not in enum:
                    found.append((fam, vt, caps, enum))
            self._lacking[(key, wanted)] = found
        return found

    def _host_offers(self, name: str, value: str, key: str, wanted: str) -> None:
        """Forbid `name == value` on every (machine, virt type) whose domcaps enum lacks `wanted`."""
        for fam, vt, caps, enum in self._caps_lacking(key, wanted):
            listed = ", ".join(enum) or "nothing"
            self._forbid_on_host(
                f"{name}={value}:{fam}",
                [(name, frozenset([value])), ("machine", frozenset([fam]))],
                vt,
                f"the host's {fam} domcapabilities do not offer {key} '{wanted}' (they list {listed})",
                Provenance(Source.HOST, caps.source, f"enum {key}", data=(("enum", key), ("value", wanted))),
            )

    def _forbid_on_host(
        self, key: str, conds: list[tuple[str, frozenset[str]]], vt: str, message: str, prov: Provenance
    ) -> None:
        """A host fact for one virt type; when every virt type lacks it, one constraint says so for all."""
        lacking = self._host_lacks.setdefault(key, {})
        lacking[vt] = prov.where
        offered = set(self.ctx.host.virt_types(self.ctx.arch)) & set(self.ctx.problem.variables["domain.type"].values)
        if set(lacking) >= offered:
            for c, entry in self._host_per_type.pop(key, []):
                self._superseded.add(id(c))
                entry[5] = True
            order = self.ctx.problem.variables["domain.type"].values
            files = tuple(dict.fromkeys(lacking[v] for v in order if v in lacking))
            merged = replace(prov, where=", ".join(files), data=(*prov.data, ("files", files)))
            self._forbid(f"host:{key}", conds, message, merged)
        else:
            one = replace(prov, data=(*prov.data, ("files", (prov.where,))))
            entry = self._forbid(
                f"host:{key}:{vt}", [*conds, ("domain.type", frozenset([vt]))], f"{message} ({vt} domains)", one
            )
            if entry is not None:
                self._host_per_type.setdefault(key, []).append((self.ctx.problem.constraints[-1], entry))
