"""The build context: what every constraint source reads and writes, and nothing else.

A source (sources.app, .structural, .placement, .host, .guest, .profiles, .defaults) gets the inputs
(domain, host, guest, arch, facts, catalog), the instances the app's XML holds, and the problem it adds
to: variables through `declare`, constraints through `add` / `forbid` / `pin`, each with its provenance.
No source holds another source or reaches into its state; sources.build runs them in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from typing import TYPE_CHECKING, Generic, TypeVar

from lxml import etree

from virtpolicy.core.problem import Constraint, Forbid, Problem, Provenance, Source, Strength, require
from virtpolicy.errors import HostError
from virtpolicy.inputs.domain import Domain, Explicit, xpath_of
from virtpolicy.inputs.guestos import GuestOS
from virtpolicy.inputs.host import Host
from virtpolicy.inputs.schema import SCHEMA_DIR, schema_arches
from virtpolicy.knowledge.catalog import Catalog, ClassVariable, DeviceClass, catalog
from virtpolicy.knowledge.completeness import Completeness, completeness
from virtpolicy.knowledge.tables import HypervFeature, StructuralRule, structural
from virtpolicy.profiles.expr import Expression
from virtpolicy.profiles.facts import Facts
from virtpolicy.profiles.model import Profile, Rule, Snippet

if TYPE_CHECKING:
    from virtpolicy.core.solve import Solution

VIRTIO_MODELS = ("virtio", "virtio-transitional", "virtio-non-transitional")
# A source's plan of more constraints than this is not kept across builds: a domain that large rarely comes
# again, and its plan would hold megabytes (a typical VM's plans are a few hundred entries in all)
PLAN_ENTRIES_KEPT = 2048
V = TypeVar("V")


class Kept(Generic[V]):
    """What a source keeps across builds: answers that depend only on their key and on the table (or host)
    they were worked out from. Each entry is held with that owner and answers only for it (by identity), so
    a reloaded table or another host object works its own out; and each memo is bounded (emptied when full),
    so a stream of unusual requests cannot make a long-running service grow."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[Hashable, tuple[object, V]] = {}

    def get(self, key: Hashable, owner: object) -> V | None:
        found = self._entries.get(key)
        return found[1] if found is not None and found[0] is owner else None

    def put(self, key: Hashable, owner: object, value: V) -> V:
        if len(self._entries) >= self.limit:
            self._entries.clear()
        self._entries[key] = (owner, value)
        return value

    def get_or_make(self, key: Hashable, owner: object, make: Callable[[], V]) -> V:
        found = self.get(key, owner)
        return found if found is not None else self.put(key, owner, make())


@dataclass(frozen=True)
class SelectedProfile:
    profile: Profile
    priority: int
    where: str  # the metadata XPath or "--profile" that selected it


@dataclass
class XmlAction:
    """Unmodelled XML a rule applies to the output once the solution is known."""

    rule: Rule
    profile: SelectedProfile
    condition: Callable[[dict[str, str]], bool]
    snippet: Snippet | None = None
    fragment: etree._Element | None = None
    derive: dict[str, Expression] = field(default_factory=dict)


@dataclass
class Instance:
    """One device the engine decides about: present in the XML, or a singleton it may add."""

    cls: DeviceClass
    index: int
    element: etree._Element | None
    # what a build reads of the instance again and again, kept here (functools.cached_property takes a lock
    # on every first read in Python 3.11, and a build makes ~150 such reads)
    prefix: str = field(init=False, repr=False, compare=False)
    _xpath: str | None = field(default=None, init=False, repr=False, compare=False)
    _has_address: bool | None = field(default=None, init=False, repr=False, compare=False)
    _explicit: dict[str, Explicit | None] = field(default_factory=dict, init=False, repr=False, compare=False)
    _vars: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.prefix = self.cls.name if self.cls.singleton else f"{self.cls.name}[{self.index}]"

    def var(self, name: str) -> str:
        """Kept per name: every source asks for the same few names of each instance (~400 asks a build)."""
        found = self._vars.get(name)
        if found is None:
            found = self._vars[name] = f"{self.prefix}.{name}"
        return found

    @property
    def xpath(self) -> str:
        if self._xpath is None:
            el = self.element
            self._xpath = xpath_of(el) if el is not None else f"/domain/devices ({self.cls.label} absent)"
        return self._xpath

    @property
    def has_address(self) -> bool:
        """Read once: a build never edits the app's XML (the renderer writes into its own copy's result)."""
        if self._has_address is None:
            self._has_address = self.element is not None and self.element.find("address") is not None
        return self._has_address

    def explicit(self, variable: ClassVariable) -> Explicit | None:
        """`read_explicit` of this instance's element, once per variable: a build asks for each value two or
        three times (its domain, the app's pin, the disk's mode), and each answer costs an XPath. A value on
        the element itself is named by the element's own (kept) XPath."""
        if variable.name not in self._explicit:
            found = None
            if self.element is not None and variable.xml:
                target, attr = bind(self.element, variable.xml)
                if target is not None and target.get(attr) is not None:
                    where = self.xpath if target is self.element else xpath_of(target)
                    found = Explicit(target.get(attr, ""), f"{where}/@{attr}")
            self._explicit[variable.name] = found
        return self._explicit[variable.name]


@dataclass
class Build:
    """A problem plus everything the renderer needs to write the answer back into the XML."""

    problem: Problem
    domain: Domain
    host: Host
    guest: GuestOS
    arch: str
    instances: list[Instance]
    hyperv: list[HypervFeature] = field(default_factory=list)
    app_machine: Explicit | None = None
    profiles: list[SelectedProfile] = field(default_factory=list)
    actions: list[XmlAction] = field(default_factory=list)
    facts: Facts | None = None
    pci_devices: list[tuple[Instance, str]] = field(default_factory=list)  # (instance, its slot-deciding variable)
    hotplug: bool = False  # one new device into the free slots of a laid-out domain
    completeness: Completeness = field(default_factory=lambda: Completeness(False, ""))
    warnings: list[str] = field(default_factory=list)  # said once, whatever the solution
    advisories: list[Forbid] = field(default_factory=list)  # guest facts that only make an app's device inert

    @property
    def complete(self) -> bool:
        """The domain is checked, not completed: the output is the input plus the engine's record."""
        return self.completeness.complete and not self.hotplug

    def warnings_for(self, solution: Solution) -> list[str]:
        """The fixed warnings, then each advisory the solution runs into (an inert device the app wrote)."""
        found = list(self.warnings)
        for c in self.advisories:
            if all(solution.assignment.get(v) in s for v, s in zip(c.variables, c.sets, strict=True)):
                found.append(f"{c.message}; the device stays as written but the guest cannot use it")
        return found


def bind(element: etree._Element, xml: str) -> tuple[etree._Element | None, str]:
    """Resolve a catalog binding ('@a', 'child/@a', '../x/@a') to (element, attribute)."""
    path, _, attr = xml.rpartition("@")
    path = path.rstrip("/")
    target = element.find(path) if path else element
    if path.startswith(".."):
        parent = element.getparent()
        target = parent.find(path[3:]) if parent is not None else None
    return target, attr


def read_explicit(element: etree._Element | None, variable: ClassVariable) -> Explicit | None:
    if element is None or not variable.xml:
        return None
    target, attr = bind(element, variable.xml)
    if target is None or target.get(attr) is None:
        return None
    return Explicit(target.get(attr, ""), f"{xpath_of(target)}/@{attr}")


def structural_provenance(rule_id: str) -> Provenance:
    """The provenance of a structural.toml row: its id, file:line and citation.

    Made once per row (a Provenance is frozen, so builds share it): every build asks for ~45 of them. Kept
    with the row it was made from, so a reloaded table makes its own."""
    rule = structural()[1][rule_id]
    kept = _STRUCTURAL_PROVENANCE.get(rule_id)
    if kept is not None and kept[0] is rule:
        return kept[1]
    file, _, line = rule.where.rpartition(":")
    data = (("rule", rule.id), ("file", file), ("line", int(line or 0)))
    prov = Provenance(Source.STRUCTURAL, rule.id, rule.where, rule.citation, data=data)
    _STRUCTURAL_PROVENANCE[rule_id] = (rule, prov)
    return prov


_STRUCTURAL_PROVENANCE: dict[str, tuple[StructuralRule, Provenance]] = {}


@dataclass(frozen=True)
class WrittenFact:
    """Something the app wrote that exists only on some machines (structural.toml rows with `written`): a
    variable of its own, so that the app's value and the libvirt/QEMU fact are two requirements, and a
    conflict names both."""

    rule: StructuralRule
    variable: str
    value: str  # what the app wrote, as the row `shows` it
    xpath: str  # of that attribute (or of the element, for a row that shows none)
    what: str  # the requirement in words: "the console's target type is 'sclp'"

    ABSENT = "absent"  # the variable's other value: without the app's element the fact has nothing to refuse


def written_facts(root: etree._Element) -> list[WrittenFact]:
    """Every element of the domain that a `written` row selects, in row then document order."""
    facts = []
    for rule in structural()[1].values():
        if not rule.written:
            continue
        for el in _compiled(rule.written)(root):
            shown = _compiled(rule.shows)(el) if rule.shows else []
            variable = f"{el.tag}@{xpath_of(el)}:{rule.id}"
            if shown:
                attr = shown[0]
                owner = attr.getparent()
                name = attr.attrname if owner is el else f"{owner.tag} {attr.attrname}"
                where = f"{xpath_of(owner)}/@{attr.attrname}"
                facts.append(WrittenFact(rule, variable, str(attr), where, f"the {el.tag}'s {name} is '{attr}'"))
            else:
                facts.append(WrittenFact(rule, variable, el.tag, xpath_of(el), f"the domain has a {el.tag}"))
    return facts


@cache
def _compiled(xpath: str) -> etree.XPath:
    return etree.XPath(xpath)


_EXPAND_PLANS: dict[tuple[str, ...], tuple[Catalog, list[str], list[tuple[str, str, str]]]] = {}


def _expand_plan(cat: Catalog, refs: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The multi-instance classes `refs` name (sorted) and each ref split into (ref, class, variable).

    The same few hundred rule references are expanded on every build; their parse depends only on the
    catalog, so it is kept per catalog (a reloaded catalog makes its own)."""
    kept = _EXPAND_PLANS.get(refs)
    if kept is not None and kept[0] is cat:
        return kept[1], kept[2]
    multi = sorted({r.split(".")[0] for r in refs if _is_multi(cat, r.split(".")[0])})
    split = []
    for r in refs:
        cls, _, var = r.partition(".")
        split.append((r, cls, var))
    _EXPAND_PLANS[refs] = (cat, multi, split)
    return multi, split


def _is_multi(cat: Catalog, cls: str) -> bool:
    c = cat.classes.get(cls)
    return c is not None and not c.singleton


def supplemented(guest: GuestOS, cat: Catalog) -> GuestOS:
    """The guest with the drivers osinfo-db does not list but the OS ships (osinfo-supplement.toml)."""
    rows = [p for p in cat.provides if p.matches(guest.short_id)] if guest.described else []
    ids = frozenset(d for p in rows for d in p.device_ids) - guest.device_ids
    if not ids:
        return guest
    names = ", ".join(p.name for p in rows if set(p.device_ids) & ids)
    return replace(
        guest, device_ids=guest.device_ids | ids, source=f"{guest.source} + osinfo-supplement.toml ({names})"
    )


class BuildContext:
    def __init__(
        self,
        domain: Domain,
        host: Host,
        guest: GuestOS,
        guest_support: str = "strict",
        profiles: list[SelectedProfile] | None = None,
        device_names: dict[str, str] | None = None,
        focus: etree._Element | None = None,
        complete: bool | None = None,
    ) -> None:
        self.domain = domain
        self.focus = focus  # hot-plug: only this device is decided; the laid-out rest is context
        self.host = host
        self.profiles = list(profiles or [])
        self.catalog: Catalog = catalog()
        self.problem = Problem()
        self.instances: list[Instance] = []
        self.guest_strength = Strength.HARD if guest_support == "strict" else Strength.SOFT
        arch = domain.attr("os/type", "arch")
        self.arch = arch.value if arch else host.arch
        known = schema_arches()
        if arch is None and known and self.arch not in known:
            raise HostError(
                f"{host.source}: capabilities.xml: the host's architecture '{self.arch}' is not one libvirt's domain "
                f"schema knows ({SCHEMA_DIR / 'basictypes.rng'} archnames), so no domain for it can be defined; "
                "write <os><type arch='...'> for an architecture it knows",
                input=host.source,
                location="/capabilities/host/cpu/arch",
            )
        self.app_machine = domain.attr("os/type", "machine")
        self.completeness = completeness(domain.root, domain.source, complete)
        self.realized = self.completeness.complete or domain.is_realized
        self.warnings: list[str] = []
        self.advisories: list[Forbid] = []
        if not guest.described:
            self.warnings.append(
                f"{domain.source}: no guest OS (no <libosinfo:os> metadata, no --os): guest-driver checks "
                "were skipped; the domain was checked against the host and libvirt/QEMU facts only"
            )
        self.hyperv: list[HypervFeature] = []  # the Hyper-V features this build decides (sources.defaults)
        self.actions: list[XmlAction] = []  # the profiles' XML snippets and derived values (sources.profiles)
        self.pci_devices: list[tuple[Instance, str]] = []  # (instance, its slot variable) (sources.placement)
        self._ids: set[str] = set()
        self._by_class: dict[str, list[Instance]] = {}  # instances_by_class, rebuilt if instances change
        self._by_class_of: list[Instance] | None = None
        self._by_class_count = -1
        self._spec_sets: dict[tuple[tuple[str, ...], tuple[str, ...]], frozenset[str]] = {}  # values
        self._written: list[WrittenFact] | None = None
        self.guest = supplemented(guest, self.catalog)
        self.facts = Facts(domain, self.guest, host, self.arch, device_names or {})

    @property
    def written(self) -> list[WrittenFact]:
        """The app's elements that structural `written` rows are about (read once per build)."""
        if self._written is None:
            self._written = written_facts(self.domain.root)
        return self._written

    def has(self, cid: str) -> bool:
        """Is there a constraint with this id already (a source reaching the same fact twice adds it once)?"""
        return cid in self._ids

    def declare(self, name: str, values: Iterable[str], label: str = "") -> None:
        """A variable and its values (values of a variable declared before are appended)."""
        self.problem.add_variable(name, values, label)

    def amend_guest(self, guest: GuestOS) -> None:
        """The guest as a source has learnt more of it (drivers a profile declares)."""
        self.guest = guest
        self.facts.guest = guest

    def result(self) -> Build:
        """What the output stages read: data only, no builder."""
        return Build(
            self.problem,
            self.domain,
            self.host,
            self.guest,
            self.arch,
            self.instances,
            self.hyperv,
            self.app_machine,
            self.profiles,
            self.actions,
            self.facts,
            self.pci_devices,
            self.focus is not None,
            self.completeness,
            self.warnings,
            self.advisories,
        )

    def app_wrote(self, variable: str) -> bool:
        """Did the app's XML give this variable a value (so a profile 'default' leaves it alone)?"""
        return any(c.variables == (variable,) and c.provenance.source is Source.APP for c in self.problem.constraints)

    def add(self, constraint: Constraint) -> None:
        if constraint.id in self._ids:
            constraint.id = f"{constraint.id}#{len(self.problem.constraints)}"
        self._ids.add(constraint.id)
        self.problem.add(constraint)

    def pin(self, variable: str, allowed: Iterable[str], explicit: Explicit, message: str) -> None:
        allowed = list(allowed)
        var = self.problem.variables[variable]
        self.problem.add(
            require(
                f"app:{explicit.xpath}",
                variable,
                allowed,
                var.values,
                message,
                Provenance(
                    Source.APP,
                    explicit.xpath,
                    f"'{explicit.value}'",
                    data=(("xpath", explicit.xpath), ("value", explicit.value)),
                ),
            )
        )

    def expand(self, refs: Iterable[str], lacking: str = "") -> Iterator[dict[str, str]]:
        """Concrete variable names for class references, one mapping per device instance.

        With `lacking`, only instances whose element has no such child count (e.g. cdroms without media).
        """
        refs = tuple(refs)
        multi, split = _expand_plan(self.catalog, refs)
        if not multi:
            yield {r: r for r in refs}  # singletons and globals only: one mapping, the names themselves
            return
        by_class = self.instances_by_class()
        per_class = [
            [
                i
                for i in by_class.get(c, ())
                if not (lacking and i.element is not None and i.element.find(lacking) is not None)
            ]
            for c in multi
        ]
        if len(multi) == 1:  # the common case: one class, one mapping per instance
            for inst in per_class[0]:
                name = inst.cls.name
                yield {r: inst.var(var) if cls == name else r for r, cls, var in split}
            return
        for combo in itertools.product(*per_class):
            chosen = {i.cls.name: i for i in combo}
            mapping = {}
            for r, cls, var in split:
                mapping[r] = chosen[cls].var(var) if cls in chosen else r
            yield mapping

    def instances_by_class(self) -> dict[str, list[Instance]]:
        """The instances of each class, in order: every rule and preference expands over them."""
        if self._by_class_of is not self.instances or self._by_class_count != len(self.instances):
            by_class: dict[str, list[Instance]] = {}
            for i in self.instances:
                by_class.setdefault(i.cls.name, []).append(i)
            self._by_class, self._by_class_of, self._by_class_count = by_class, self.instances, len(self.instances)
        return self._by_class

    def is_multi(self, cls: str) -> bool:
        return _is_multi(self.catalog, cls)

    def values(self, variable: str, spec: Iterable[str]) -> frozenset[str]:
        """The values a rule's spec names (`["!none"]`: all but none), as one shared set per (domain, spec):
        every device of a class asks with the same spec over an equal domain."""
        domain = self.problem.variables[variable].values if variable in self.problem.variables else ()
        key = (domain, tuple(spec))
        found = self._spec_sets.get(key)
        if found is None:
            negated = [s[1:] for s in key[1] if s.startswith("!")]
            found = frozenset(v for v in domain if v not in negated) if negated else frozenset(key[1])
            self._spec_sets[key] = found
        return found

    def forbid(
        self,
        cid: str,
        conds: list[tuple[str, frozenset[str]]],
        message: str,
        prov: Provenance,
        strength: Strength = Strength.HARD,
        priority: int = 0,
        cites: tuple[str, ...] = (),
        group: str = "",
    ) -> None:
        # Hot (a 40-device domain adds ~1,200 constraints through here), hence one plain loop per step.
        if not conds:
            return  # a citation-only row
        settled = self.settle(conds)
        if settled is not None:
            self.forbid_sets(cid, settled[0], settled[1], message, prov, strength, priority, cites, group)

    def settle(
        self, conds: list[tuple[str, frozenset[str]]]
    ) -> tuple[tuple[str, ...], tuple[frozenset[str], ...]] | None:
        """The (variables, sets) of the Forbid `forbid` makes of `conds`, or None when it makes none.

        It depends only on the names, the sets and the variables' domains, so a source that meets the same
        conditions on every build may keep the answer (sources.placement does)."""
        variables = self.problem.variables
        if not conds:
            return None
        merged: dict[str, frozenset[str]] = {}
        for name, vals in conds:
            if name not in variables:
                return None  # a rule about variables this domain does not have
            if not vals:
                return None  # can never be violated
            if name in merged:
                vals = merged[name] & vals
                if not vals:
                    return None
            merged[name] = vals
        # a condition covering the whole domain says nothing: leave it out (issuperset reads the tuple as is)
        kept = {}
        for name, vals in merged.items():
            if not vals.issuperset(variables[name].values):
                kept[name] = vals
        if kept:
            merged = kept
        return tuple(merged), tuple(merged.values())

    def forbid_sets(
        self,
        cid: str,
        variables: tuple[str, ...],
        sets: tuple[frozenset[str], ...],
        message: str,
        prov: Provenance,
        strength: Strength,
        priority: int,
        cites: tuple[str, ...],
        group: str,
    ) -> None:
        """The Forbid `_add_forbid` settled on, under an id of its own.

        Every name in `variables` is one of the problem's (forbid checked them, and so does the one other
        caller, sources.defaults), so it is appended without Problem.add's check: ~200 a typical build."""
        ids = self._ids
        if cid in ids:
            cid = f"{cid}#{len(self.problem.constraints)}"
        ids.add(cid)
        self.problem.constraints.append(Forbid(cid, variables, message, prov, strength, priority, cites, group, sets))
