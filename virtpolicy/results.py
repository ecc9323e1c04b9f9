"""What the engine answers, as typed objects a program can use without parsing text.

Each object is a view of one solve: the typed fields and `to_dict()` are read from the same build and
solver outcome, so `to_dict()` is exactly the JSON the CLI prints with `--format json` (schemas in
docs/json-schema.md and docs/explain-schema.md) and cannot disagree with the attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from virtpolicy.core.problem import Constraint, Problem
    from virtpolicy.core.solve import Conflict, Solution
    from virtpolicy.inputs.guestos import GuestOS
    from virtpolicy.sources.context import Build

Command = Literal["solve", "check", "add_device"]


@dataclass(frozen=True)
class Requirement:
    """One requirement with where it came from: the app's XPath, a profile's file:line, an osinfo or host fact."""

    id: str
    strength: str  # "hard" | "soft"
    priority: int
    variables: tuple[str, ...]
    message: str
    kind: str  # app | profile | guest | host | structural | engine
    where: str  # one-line form of the provenance (XPath, file:line, OS id, host file, rule id)
    provenance: Mapping[str, Any] = field(compare=False)  # the kind-specific fields (docs/explain-schema.md)
    relies_on: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Requirement:
        prov = data["provenance"]
        return cls(
            id=data["id"],
            strength=data["strength"],
            priority=data["priority"],
            variables=tuple(data["variables"]),
            message=data["message"],
            kind=prov["kind"],
            where=prov["where"],
            provenance=dict(prov),
            relies_on=tuple(data["relies_on"]),
        )

    @classmethod
    def of(cls, constraint: Constraint) -> Requirement:
        return cls.from_json(constraint.to_json())

    @property
    def is_hard(self) -> bool:
        return self.strength == "hard"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "strength": self.strength,
            "priority": self.priority,
            "variables": list(self.variables),
            "message": self.message,
            "provenance": dict(self.provenance),
            "relies_on": list(self.relies_on),
        }

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: {self.message}"


@dataclass(frozen=True)
class Decision:
    """A decided variable, its value and the requirement that decided it (None: the only value left)."""

    variable: str
    value: str
    label: str
    reason: Requirement | None


@dataclass(frozen=True)
class ConflictSet:
    """A minimal set of requirements that cannot hold together: without any one member the rest can."""

    id: str
    members: tuple[Requirement, ...]


@dataclass(frozen=True)
class Correction:
    """A minimal set of requirements whose removal makes the request feasible, cheapest first."""

    id: str
    cost: int
    drop: tuple[str, ...]  # requirement ids
    actions: tuple[str, ...]  # the same, as things to do


def conflicts_of(report: Mapping[str, Any]) -> list[ConflictSet]:
    return [
        ConflictSet(c["id"], tuple(Requirement.from_json(m) for m in c["members"])) for c in report.get("conflicts", ())
    ]


def corrections_of(report: Mapping[str, Any]) -> list[Correction]:
    return [
        Correction(k["id"], k["cost"], tuple(k["drop"]), tuple(k["actions"])) for k in report.get("corrections", ())
    ]


class Result:
    """The outcome of `Engine.solve`, `Engine.check` or `Engine.add_device`.

    Feasible: `xml` holds the domain (for add_device, `device_xml` the device) and `decisions` every
    decided variable. Infeasible: `conflicts` the minimal conflicting sets and, computed on first use,
    `corrections`. Warnings are things the app should know that do not stop the domain (inert devices,
    skipped guest checks).
    """

    def __init__(
        self,
        command: Command,
        built: Build,
        outcome: Solution | Conflict,
        *,
        xml: bytes | None = None,
        device_xml: str | None = None,
        report: dict[str, Any] | None = None,
        elapsed_ms: float = 0.0,
        diff: str | None = None,
        max_conflicts: int = 10,
    ) -> None:
        self.command = command
        self._built = built
        self._outcome = outcome
        self._xml = xml
        self.device_xml = device_xml
        self._report = report
        self.elapsed_ms = elapsed_ms
        self.diff = diff  # solve(refresh=True): the unified diff against the input ('' when nothing changes)
        self._max_conflicts = max_conflicts

    # --- the verdict ------------------------------------------------------------------------------
    @property
    def feasible(self) -> bool:
        from virtpolicy.core.solve import Solution

        return isinstance(self._outcome, Solution)

    @property
    def status(self) -> str:
        if not self.feasible:
            return "conflict"
        return "fits" if self.command == "check" else "solved"

    @property
    def xml(self) -> str | None:
        """The complete domain (solve; check gives the domain back unchanged only through `solve`)."""
        return self._xml.decode() if self._xml is not None else None

    @property
    def xml_bytes(self) -> bytes | None:
        return self._xml

    # --- typed views ------------------------------------------------------------------------------
    @cached_property
    def decisions(self) -> list[Decision]:
        solution = self._solution
        if solution is None:
            return []
        variables = self._built.problem.variables
        return [
            Decision(name, d.value, variables[name].label, Requirement.of(d.reason) if d.reason is not None else None)
            for name, d in solution.decisions.items()
        ]

    @property
    def assignment(self) -> dict[str, str]:
        """Every variable's value (decided or fixed by the app), for programs comparing solves."""
        solution = self._solution
        return dict(solution.assignment) if solution is not None else {}

    @cached_property
    def conflicts(self) -> list[ConflictSet]:
        if self.feasible:
            return []
        if self._report is not None:  # check: every minimal conflict, as explain finds them
            return conflicts_of(self._report)
        members = self._outcome.members  # type: ignore[union-attr]
        return [ConflictSet("C1", tuple(Requirement.of(c) for c in members))]

    @cached_property
    def background(self) -> list[Requirement]:
        """The libvirt/QEMU facts the conflicts rely on."""
        if self.feasible:
            return []
        if self._report is not None:
            return [Requirement.from_json(b) for b in self._report.get("background", ())]
        return [Requirement.of(c) for c in self._outcome.background]  # type: ignore[union-attr]

    @cached_property
    def corrections(self) -> list[Correction]:
        """The smallest changes that resolve every conflict (computed once, on first use)."""
        if self.feasible:
            return []
        if self._report is not None and "corrections" in self._report:
            return corrections_of(self._report)
        from virtpolicy.core.explain import ConflictExplainer

        explanation = ConflictExplainer(self._built.problem).explain(self._max_conflicts)
        return [
            Correction(f"K{i}", k.cost, tuple(c.id for c in k.members), tuple(k.actions))
            for i, k in enumerate(explanation.corrections, 1)
        ]

    @cached_property
    def warnings(self) -> list[str]:
        solution = self._solution
        return self._built.warnings_for(solution) if solution is not None else list(self._built.warnings)

    @property
    def problem(self) -> Problem:
        """The constraint problem this result solved (variables and constraints with provenance)."""
        return self._built.problem

    @property
    def guest(self) -> GuestOS:
        """The guest OS as the engine saw it: osinfo-db's facts plus the supplement rows."""
        return self._built.guest

    @property
    def build(self) -> Build:
        """The engine's build of this request (for diagnostics and tests; its shape may change)."""
        return self._built

    @property
    def outcome(self) -> Solution | Conflict:
        """The solver's own outcome object (for diagnostics and tests; its shape may change)."""
        return self._outcome

    # --- documents --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Exactly the JSON the CLI prints for this command with --format json."""
        from virtpolicy.outputs.report import conflict_json, device_json, solution_json

        if self._report is not None:
            return self._report
        if not self.feasible:
            return conflict_json(self._built, self._outcome)  # type: ignore[arg-type]
        if self.command == "add_device":
            return device_json(self._built, self._outcome, self.device_xml or "")  # type: ignore[arg-type]
        return solution_json(self._built, self._outcome, self.xml or "")  # type: ignore[arg-type]

    def summary(self) -> str:
        """What the CLI prints on stderr: the decisions with their reasons, or the minimal conflict."""
        from virtpolicy.outputs.check_domain import check_text
        from virtpolicy.outputs.report import conflict_text, solution_text

        if self._report is not None:
            return check_text(self._report)
        if not self.feasible:
            return conflict_text(self._built, self._outcome)  # type: ignore[arg-type]
        return solution_text(self._built, self._outcome, self.elapsed_ms)  # type: ignore[arg-type]

    @property
    def _solution(self) -> Solution | None:
        return self._outcome if self.feasible else None  # type: ignore[return-value]

    def __repr__(self) -> str:
        name = self._built.domain.name
        detail = f"{len(self.decisions)} decisions" if self.feasible else f"{len(self.conflicts)} conflict(s)"
        return f"<Result {self.command} '{name}': {self.status}, {detail}>"


class Report:
    """`Engine.explain`: every minimal conflict and correction, or why each value was chosen.

    One report dictionary (schema virtpolicy-explain/1) is rendered as text, JSON or self-contained
    HTML, so the formats cannot disagree; the typed fields are read from it.
    """

    def __init__(self, report: dict[str, Any]) -> None:
        self._report = report

    @property
    def feasible(self) -> bool:
        return self._report["status"] == "solved"

    @property
    def status(self) -> str:
        return str(self._report["status"])

    @property
    def complete(self) -> bool:
        """False when max_conflicts stopped the enumeration before every minimal conflict was found."""
        return bool(self._report["complete"])

    @cached_property
    def conflicts(self) -> list[ConflictSet]:
        return conflicts_of(self._report)

    @cached_property
    def corrections(self) -> list[Correction]:
        return corrections_of(self._report)

    @cached_property
    def background(self) -> list[Requirement]:
        return [Requirement.from_json(b) for b in self._report["background"]]

    @cached_property
    def decisions(self) -> list[Decision]:
        return [
            Decision(
                d["variable"],
                d["value"],
                d["label"],
                Requirement.from_json(d["decided_by"]) if d["decided_by"] is not None else None,
            )
            for d in self._report["decisions"]
        ]

    def to_dict(self) -> dict[str, Any]:
        return self._report

    def to_text(self, colour: bool | None = False) -> str:
        from virtpolicy.outputs.explain_report import to_text

        return to_text(self._report, colour=colour)

    def to_html(self) -> str:
        from virtpolicy.outputs.explain_report import to_html

        return to_html(self._report)

    def __repr__(self) -> str:
        return f"<Report '{self._report['domain']}': {self.status}, {len(self.conflicts)} conflict(s)>"


@dataclass(frozen=True)
class Finding:
    """One thing `profiles check` found: where (file:line), how bad (error | warning), what."""

    where: str
    level: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.level}: {self.message}"


@dataclass(frozen=True)
class LintReport:
    """`Engine.check_profiles`: findings per profile, and pairs that can never be combined."""

    profiles: tuple[str, ...]
    findings: tuple[Finding, ...]
    incompatible: tuple[tuple[str, str, str], ...]  # (profile a, profile b, the reason)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        from virtpolicy.outputs.report import REPORT_SCHEMA_VERSION

        return {
            "schema": REPORT_SCHEMA_VERSION,
            "status": "ok" if self.ok else "errors",
            "profiles": list(self.profiles),
            "findings": [{"where": f.where, "level": f.level, "message": f.message} for f in self.findings],
            "incompatible": [{"profiles": [a, b], "reason": why} for a, b, why in self.incompatible],
        }
