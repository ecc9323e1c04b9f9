"""The solver on small synthetic problems: lexicographic soft constraints and minimal conflicts."""

from __future__ import annotations

from virtpolicy.core.problem import AtMost, Forbid, Problem, Provenance, Source, Strength, require
from virtpolicy.core.solve import Conflict, Solution, Solver

APP = Provenance(Source.APP, "/domain/x")
ENGINE = Provenance(Source.ENGINE, "engine.test")
RULE = Provenance(Source.STRUCTURAL, "rule")


def _problem() -> Problem:
    p = Problem()
    p.add_variable("a", ["1", "2", "3"])
    p.add_variable("b", ["x", "y"])
    return p


def _prefer(p: Problem, var: str, value: str, cid: str, priority: int = 0) -> None:
    domain = p.variables[var].values
    p.add(
        Forbid(
            id=cid,
            variables=(var,),
            message=f"prefer {var}={value}",
            provenance=ENGINE,
            strength=Strength.SOFT,
            priority=priority,
            group=var,
            sets=(frozenset(v for v in domain if v != value),),
        )
    )


def test_soft_constraints_are_taken_in_order_and_kept_only_when_consistent():
    p = _problem()
    p.add(
        Forbid(
            id="no-3-with-y",
            variables=("a", "b"),
            message="",
            provenance=RULE,
            sets=(frozenset({"3"}), frozenset({"y"})),
        )
    )
    _prefer(p, "b", "y", "prefer-b-y")
    _prefer(p, "a", "3", "prefer-a-3")  # clashes with the kept b=y: dropped
    _prefer(p, "a", "2", "prefer-a-2")
    result = Solver(p).solve()
    assert isinstance(result, Solution)
    assert result.assignment == {"a": "2", "b": "y"}
    assert [d.constraint.id for d in result.dropped] == ["prefer-a-3"]
    assert [c.id for c in result.why_dropped(result.dropped[0])] == ["no-3-with-y", "prefer-b-y"] or {
        c.id for c in result.why_dropped(result.dropped[0])
    } == {"prefer-b-y"}


def test_higher_priority_soft_constraint_wins_regardless_of_order():
    p = _problem()
    _prefer(p, "a", "1", "low")
    _prefer(p, "a", "3", "high", priority=10)
    result = Solver(p).solve()
    assert isinstance(result, Solution)
    assert result.assignment["a"] == "3"
    assert result.decisions["a"].reason.id == "high"


def test_hard_app_value_beats_every_preference_and_is_the_recorded_reason():
    p = _problem()
    p.add(require("app", "a", ["1"], p.variables["a"].values, "a is 1", APP))
    _prefer(p, "a", "2", "pref", priority=100)
    result = Solver(p).solve()
    assert result.assignment["a"] == "1"
    assert result.decisions["a"].reason.id == "app"


def test_quickxplain_returns_a_minimal_set_among_many_constraints():
    p = Problem()
    for i in range(12):
        p.add_variable(f"v{i}", ["on", "off"])
    for i in range(12):  # noise: satisfiable constraints
        p.add(require(f"noise{i}", f"v{i}", ["on", "off"], ("on", "off"), "", APP))
    p.add(require("want-on", "v3", ["on"], ("on", "off"), "v3 on", APP))
    p.add(
        Forbid(
            id="on-needs-v7-on",
            variables=("v3", "v7"),
            message="",
            provenance=APP,
            sets=(frozenset({"on"}), frozenset({"off"})),
        )
    )
    p.add(require("want-v7-off", "v7", ["off"], ("on", "off"), "v7 off", APP))
    result = Solver(p).solve()
    assert isinstance(result, Conflict)
    assert {c.id for c in result.members} == {"want-on", "on-needs-v7-on", "want-v7-off"}


def test_structural_facts_are_background_not_members():
    p = _problem()
    p.add(
        Forbid(id="rule", variables=("a", "b"), message="", provenance=RULE, sets=(frozenset({"1"}), frozenset({"x"})))
    )
    p.add(require("app-a", "a", ["1"], p.variables["a"].values, "", APP))
    p.add(require("app-b", "b", ["x"], p.variables["b"].values, "", APP))
    result = Solver(p).solve()
    assert isinstance(result, Conflict)
    assert {c.id for c in result.members} == {"app-a", "app-b"}
    assert [c.id for c in result.background] == ["rule"]


def test_at_most_counts_values():
    p = Problem()
    for i in range(5):
        p.add_variable(f"d{i}", ["ide", "sata"])
        p.add(require(f"app{i}", f"d{i}", ["ide"], ("ide", "sata"), "", APP))
    p.add(
        AtMost(id="cap", variables=tuple(f"d{i}" for i in range(5)), message="", provenance=RULE, value="ide", limit=4)
    )
    result = Solver(p).solve()
    assert isinstance(result, Conflict)
    assert len(result.members) == 5
    assert [c.id for c in result.background] == ["cap"]


def test_same_problem_same_answer():
    answers = set()
    for _ in range(5):
        p = _problem()
        _prefer(p, "b", "y", "p1")
        result = Solver(p).solve()
        answers.add(tuple(sorted(result.assignment.items())))
    assert len(answers) == 1
