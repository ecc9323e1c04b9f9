"""Variables and constraints with provenance: the solver's vocabulary.

Every constraint is a nogood over a few variables (`Forbid`) or a count limit (`AtMost`), so all of
them can be explained the same way: what they forbid, and where they came from. Profiles (a later
layer) compile to the same objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

# Constraint.kind values
FORBID, ATMOST, BUDGET, OTHER = "forbid", "atmost", "budget", "other"


class Strength(Enum):
    HARD = "hard"
    SOFT = "soft"


class Source(Enum):
    """Where a constraint comes from, strongest first (DESIGN.md 'Constraint sources')."""

    STRUCTURAL = "structural"
    APP = "app"
    HOST = "host"
    GUEST = "guest"
    PROFILE = "profile"
    ENGINE = "engine"


@dataclass(frozen=True)
class Provenance:
    """Where a requirement came from, precisely enough for a user to go and change it."""

    source: Source
    where: str  # XPath, osinfo OS id, host file, structural rule id, profile file:line
    detail: str = ""  # device id, domcaps enum, value
    citation: str = ""
    data: tuple[tuple[str, str | int | tuple[str, ...]], ...] = ()  # kind-specific fields for JSON

    def describe(self) -> str:
        label = {
            Source.STRUCTURAL: "libvirt/QEMU rule",
            Source.APP: "domain XML",
            Source.HOST: "host",
            Source.GUEST: "osinfo",
            Source.PROFILE: "profile",
            Source.ENGINE: "engine default",
        }[self.source]
        text = f"{label} {self.where}"
        if self.detail:
            text += f" ({self.detail})"
        return text

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"kind": self.source.value, "where": self.where}
        if self.detail:
            data["detail"] = self.detail
        if self.citation:
            data["citation"] = self.citation
        for key, value in self.data:
            data[key] = list(value) if isinstance(value, tuple) else value
        return data


@dataclass(frozen=True)
class Variable:
    name: str
    values: tuple[str, ...]
    label: str = ""  # e.g. "disk[0] bus (/domain/devices/disk[1])"


@dataclass(eq=False)
class Constraint(ABC):
    """Base: a requirement over some variables, with strength, priority and provenance."""

    id: str
    variables: tuple[str, ...]
    message: str
    provenance: Provenance
    strength: Strength = Strength.HARD
    priority: int = 0
    cites: tuple[str, ...] = field(default=())  # structural rule ids it relies on
    group: str = ""  # soft constraints from one preference share a group (tried in order)
    # what the solver's inner loops dispatch on: isinstance against an ABC subclass goes through
    # ABCMeta.__instancecheck__, hundreds of thousands of times per solve of a typical domain
    kind: ClassVar[str] = OTHER

    @abstractmethod
    def holds(self, *values: str) -> bool:
        """True when these values (in `variables` order) satisfy the constraint."""

    def allows(self, values: Iterable[str]) -> list[str]:
        """The values a one-variable constraint allows its variable, in order (the solver narrows domains
        with it many times per solve: a nogood answers from its set, without a call per value)."""
        return [v for v in values if self.holds(v)]

    @property
    def is_hard(self) -> bool:
        return self.strength is Strength.HARD

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "strength": self.strength.value,
            "priority": self.priority,
            "variables": list(self.variables),
            "message": self.message,
            "provenance": self.provenance.to_json(),
            "relies_on": list(self.cites),
        }


@dataclass(eq=False)
class Forbid(Constraint):
    """No solution may have every variable[i] in sets[i] at once."""

    kind: ClassVar[str] = FORBID
    sets: tuple[frozenset[str], ...] = ()

    def holds(self, *values: str) -> bool:
        return any(value not in forbidden for value, forbidden in zip(values, self.sets, strict=True))

    def allows(self, values: Iterable[str]) -> list[str]:
        if len(self.sets) != 1:
            return super().allows(values)
        forbidden = self.sets[0]
        return [v for v in values if v not in forbidden]


@dataclass(eq=False)
class AtMost(Constraint):
    """At most `limit` of the variables take `value` (a capacity: IDE units, ports, slots)."""

    kind: ClassVar[str] = ATMOST
    value: str = ""
    limit: int = 0

    def holds(self, *values: str) -> bool:
        return sum(1 for v in values if v == self.value) <= self.limit


def require(
    cid: str,
    variable: str,
    allowed: Iterable[str],
    domain: Sequence[str],
    message: str,
    provenance: Provenance,
    **kwargs: object,
) -> Forbid:
    """`variable` must take one of `allowed`: a one-variable Forbid of the rest of its domain."""
    allowed_set = set(allowed)
    return Forbid(
        id=cid,
        variables=(variable,),
        message=message,
        provenance=provenance,
        sets=(frozenset(v for v in domain if v not in allowed_set),),
        **kwargs,  # type: ignore[arg-type]
    )


@dataclass
class Problem:
    """Variables (ordered: this order is the decision order) and constraints (ordered: declaration order)."""

    variables: dict[str, Variable] = field(default_factory=dict)
    constraints: list[Constraint] = field(default_factory=list)

    def add_variable(self, name: str, values: Iterable[str], label: str = "") -> None:
        ordered: list[str] = []
        for v in values:
            if v not in ordered:
                ordered.append(v)
        if name in self.variables:
            existing = list(self.variables[name].values)
            ordered = existing + [v for v in ordered if v not in existing]
            label = label or self.variables[name].label
        self.variables[name] = Variable(name, tuple(ordered), label or name)

    def add(self, constraint: Constraint) -> None:
        if all(v in self.variables for v in constraint.variables):
            self.constraints.append(constraint)

    def without(self, ids: Iterable[str]) -> Problem:
        drop = set(ids)
        return Problem(dict(self.variables), [c for c in self.constraints if c.id not in drop])

    def constraint(self, cid: str) -> Constraint:
        for c in self.constraints:
            if c.id == cid:
                return c
        raise KeyError(cid)


@dataclass(eq=False)
class Predicate(Constraint):
    """Any test over named values: profile implications ("if machine is q35 then ...")."""

    test: Callable[[dict[str, str]], bool] = field(default=lambda values: True)

    def holds(self, *values: str) -> bool:
        return self.test(dict(zip(self.variables, values, strict=True)))
