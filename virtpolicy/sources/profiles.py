"""Compiling selected profiles into constraints, so composition is solved jointly, not applied in order.

A rule's condition is split: facts (guest OS, host, domain) are decided now; solver variables stay
symbolic and make the rule an implication inside the solve ("if machine is q35 then ..."). Snippet
parts that name modelled variables become constraints; the rest becomes an XML action applied to the
output when its condition holds in the solution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from lxml import etree

from virtpolicy.core.problem import Forbid, Predicate, Provenance, Source, Strength
from virtpolicy.errors import ProfileError
from virtpolicy.profiles import snippets
from virtpolicy.profiles.expr import ExprError, Expression, Value
from virtpolicy.profiles.facts import Facts
from virtpolicy.profiles.model import Rule
from virtpolicy.sources.context import SelectedProfile, XmlAction

if TYPE_CHECKING:
    from virtpolicy.sources.context import BuildContext

PROFILE_SOFT_BASE = 100  # above lenient guest support and engine defaults


Condition = Callable[[dict[str, str]], bool]


class ProfileCompiler:
    """The profiles' rules as constraints (and XML actions), and the driver packs they declare."""

    name = "profiles"

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        self.facts = ctx.facts
        self.actions = ctx.actions
        self.functions = ctx.facts.functions()

    def declare(self) -> None:
        """Profiles may declare driver packs (virtio-win): the guest then drives those devices."""
        declared = self.drivers(self.ctx.profiles)
        if declared:
            ids = frozenset(d for d, _ in declared)
            rules = ", ".join(sorted({f"{r.profile}:{r.id}" for _, r in declared}))
            guest = self.ctx.guest
            self.ctx.amend_guest(
                replace(
                    guest,
                    device_ids=guest.device_ids | ids,
                    short_id=guest.short_id,
                    source=f"{guest.source} + drivers declared by {rules}",
                )
            )

    def constrain(self) -> None:
        self.compile(self.ctx.profiles)

    # --- conditions --------------------------------------------------------------------------------
    def _solver_refs(self, rule: Rule) -> list[str]:
        refs: list[str] = []
        if rule.when is not None:
            known = set(self.ctx.problem.variables) | set(self._class_refs())
            refs += sorted(n for n in rule.when.names() if n in known)
        if rule.match is not None:
            modelled, _ = snippets.modelled_parts(rule.match.root, "match")
            refs += [m.variable for m in modelled if m.variable not in refs]
        return refs

    def _class_refs(self) -> set[str]:
        return {f"{i.cls.name}.{v}" for i in self.ctx.instances for v in i.cls.variables}

    def _static_match(self, rule: Rule) -> bool:
        if rule.match is None:
            return True
        _, rest = snippets.modelled_parts(rule.match.root, "match")
        return snippets.contains(self.ctx.domain.root, rest)

    def _condition(self, rule: Rule, refs: list[str], mapping: dict[str, str]) -> Condition | bool:
        """True/False when the facts decide it; otherwise a test over solver values."""
        if not self._static_match(rule):
            return False
        match_values = []
        if rule.match is not None:
            modelled, _ = snippets.modelled_parts(rule.match.root, "match")
            match_values = [(mapping.get(m.variable, m.variable), m.value) for m in modelled]
        when = rule.when
        if not refs:
            return self._evaluate(rule, when, {}) if when is not None else True

        def test(values: dict[str, str]) -> bool:
            if any(values.get(var) != value for var, value in match_values):
                return False
            return when is None or bool(self._evaluate(rule, when, {r: values[mapping[r]] for r in refs}))

        return test

    def _evaluate(self, rule: Rule, expr: Expression, values: dict[str, str]) -> Value:
        def resolve(name: str) -> Value:
            return values[name] if name in values else self.facts.resolve(name)

        try:
            return expr.evaluate(resolve, self.functions)
        except ExprError as exc:
            raise ProfileError(f"{rule.where}: rule '{rule.id}': {exc}") from None
        except KeyError as exc:
            raise ProfileError(f"{rule.where}: rule '{rule.id}': {exc} is not known for this domain") from None

    # --- entry points -------------------------------------------------------------------------------
    def drivers(self, selected: list[SelectedProfile]) -> list[tuple[str, Rule]]:
        """Driver packs declared by rules whose facts hold: the guest gains these osinfo ids."""
        found = []
        for sel in selected:
            for rule in sel.profile.rules:
                if not rule.drivers:
                    continue
                if self._solver_refs(rule):
                    raise ProfileError(f"{rule.where}: rule '{rule.id}': a 'drivers' rule may only test facts")
                if self._condition(rule, [], {}) is True:
                    found += [(d, rule) for d in rule.drivers]
        return found

    def compile(self, selected: list[SelectedProfile]) -> None:
        for sel in selected:
            for rule in sel.profile.rules:
                self._rule(sel, rule)

    # --- one rule ----------------------------------------------------------------------------------
    def _expand(self, refs: list[str]) -> Iterator[dict[str, str]]:
        yield from self.ctx.expand(refs)

    def _rule(self, sel: SelectedProfile, rule: Rule) -> None:
        refs = self._solver_refs(rule)
        effects: list[tuple[str, str, tuple[str, ...], bool]] = []  # (kind, ref, values, only_unset)
        for kind, table in (("require", rule.require), ("forbid", rule.forbid), ("prefer", rule.prefer)):
            effects += [(kind, ref, values, False) for ref, values in table.items()]
        for ref, expr in rule.equal.items():  # a value computed from the facts, then required (or preferred)
            value = self._evaluate(rule, expr, {})
            shown = str(value).lower() if isinstance(value, bool) else str(value)
            effects.append(("require" if rule.hard else "prefer", ref, (shown,), False))
        for snip in rule.snippets:
            modelled, rest = snippets.modelled_parts(snip.root, snip.action)
            kind = "require" if rule.hard else "prefer"
            effects += [(kind, m.variable, (m.value,), snip.action == "default") for m in modelled]
            if not snippets.is_empty(rest):
                self.actions.append(XmlAction(rule, sel, self._any_condition(rule, refs), snippet=snip, fragment=rest))
        if rule.derive:
            self.actions.append(XmlAction(rule, sel, self._any_condition(rule, refs), derive=rule.derive))
        for kind, ref, values, only_unset in effects:
            for mapping in self._expand([ref, *refs]):
                var = mapping[ref]
                if var not in self.ctx.problem.variables:
                    continue
                if only_unset and self.ctx.app_wrote(var):
                    continue  # 'default' fills only what the app left open
                condition = self._condition(rule, refs, mapping)
                if condition is False:
                    continue
                self._effect(sel, rule, kind, var, values, condition, refs, mapping)

    def _any_condition(self, rule: Rule, refs: list[str]) -> Condition:
        """For XML actions: the rule holds for at least one device instance in the solution."""
        mappings = list(self._expand(refs)) or [{}]
        conditions = [self._condition(rule, refs, m) for m in mappings]

        def test(values: dict[str, str]) -> bool:
            return any(c is True or (callable(c) and c(values)) for c in conditions)

        return test

    def _effect(
        self,
        sel: SelectedProfile,
        rule: Rule,
        kind: str,
        var: str,
        values: tuple[str, ...],
        condition: Condition | bool,
        refs: list[str],
        mapping: dict[str, str],
    ) -> None:
        domain = self.ctx.problem.variables[var].values
        file, _, line = rule.where.rpartition(":")
        prov = Provenance(
            Source.PROFILE,
            rule.where,
            f"{sel.profile.name} {sel.profile.version} rule {rule.id}",
            data=(
                ("profile", sel.profile.name),
                ("version", sel.profile.version),
                ("rule", rule.id),
                ("file", file),
                ("line", int(line) if line.isdigit() else 0),
                ("selected_by", sel.where),
            ),
        )
        hard = rule.hard and kind != "prefer"
        strength = Strength.HARD if hard else Strength.SOFT
        priority = 0 if hard else PROFILE_SOFT_BASE + sel.priority + rule.priority
        if kind == "prefer":
            wishes = [(v,) for v in values if v in domain]
        else:
            allowed = [v for v in domain if (v in values) == (kind == "require")]
            wishes = [tuple(allowed)]
        for wish in wishes:
            verb = {"require": "requires", "forbid": "forbids", "prefer": "prefers"}[kind]
            shown = wish if kind == "prefer" else values
            message = f"profile {sel.profile.name} {verb} {var} {'in' if len(shown) > 1 else '='} {'/'.join(shown)}"
            if rule.description:
                message += f" ({rule.description})"
            cid = f"profile:{sel.profile.name}:{rule.id}:{var}={'|'.join(wish)}"
            group = f"profile:{sel.profile.name}:{rule.id}:{var}" if kind == "prefer" else ""
            if condition is True:
                self.ctx.forbid(
                    cid,
                    [(var, frozenset(v for v in domain if v not in wish))],
                    message,
                    prov,
                    strength=strength,
                    priority=priority,
                    group=group,
                )
                continue
            assert callable(condition)
            cond_vars = tuple(dict.fromkeys(mapping[r] for r in refs))
            variables = tuple(dict.fromkeys((*cond_vars, var)))
            allowed_set = frozenset(wish)

            def test(
                values: dict[str, str], _c: Condition = condition, _v: str = var, _a: frozenset[str] = allowed_set
            ) -> bool:
                return not _c(values) or values[_v] in _a

            self.ctx.add(
                Predicate(
                    id=cid,
                    variables=variables,
                    message=f"{message}, when {rule.when.source if rule.when else 'matched'}",
                    provenance=prov,
                    strength=strength,
                    priority=priority,
                    group=group,
                    test=test,
                )
            )


def apply_actions(actions: list[XmlAction], root: etree._Element, values: dict[str, str], facts: Facts) -> None:
    """Apply the unmodelled XML and derived values of every rule that holds in the solution."""
    for action in actions:
        if not action.condition(values):
            continue
        if action.snippet is not None and action.fragment is not None:
            snippets.apply(action.snippet.action, action.snippet.multiple, action.fragment, root)
        for path, expr in action.derive.items():
            _derive(action, path, expr, root, facts)


def _derive(action: XmlAction, path: str, expr: Expression, root: etree._Element, facts: Facts) -> None:
    """Set an attribute (…/@name) or an element's text (…/text()), creating the last element if missing."""
    parent_path, _, attr = path.rpartition("/@") if "/@" in path else (path.removesuffix("/text()"), "", "text()")
    parent_path, _, child = parent_path.rpartition("/") if "/" in parent_path else ("", "", parent_path)
    try:
        value = expr.evaluate(facts.resolve, facts.functions())
        parents = root.xpath(parent_path) if parent_path else [root]
    except (ExprError, etree.XPathError) as exc:
        raise ProfileError(f"{action.rule.where}: rule '{action.rule.id}': set {path}: {exc}") from None
    for parent in parents:
        if not isinstance(parent, etree._Element):
            continue
        target = parent.find(child)
        if target is None:
            target = _insert_top_level(parent, child) if parent is root else etree.SubElement(parent, child)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if attr == "text()":
            if not (target.text or "").strip() or action.rule.hard:
                target.text = text
        elif target.get(attr) is None or action.rule.hard:
            target.set(attr, text)


def _insert_top_level(root: etree._Element, tag: str) -> etree._Element:
    """A new child of <domain> goes before <devices> (libvirt's order), not after it."""
    el = etree.Element(tag)
    devices = root.find("devices")
    if devices is not None:
        devices.addprevious(el)
    else:
        root.append(el)
    return el


__all__ = ["Forbid", "ProfileCompiler", "SelectedProfile", "XmlAction", "apply_actions"]
