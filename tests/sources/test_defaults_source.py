"""sources.defaults alone: the engine's preferences, soft and citing engine-defaults.toml."""

from __future__ import annotations

from support import one_source, partial_domain

from virtpolicy.core.problem import Source, Strength


def test_preferences_are_soft_and_cite_their_row(host, osdb) -> None:
    _, added = one_source(partial_domain("d", None, None, ""), "defaults", host, osdb, "rhel9.0", phase="prefer")
    assert added
    for c in added:
        assert c.strength is Strength.SOFT and c.provenance.source is Source.ENGINE, c.id


def test_hyperv_variables_only_for_windows(host, osdb) -> None:
    linux, _ = one_source(partial_domain("d", None, None, ""), "defaults", host, osdb, "rhel9.0", phase="prefer")
    windows, added = one_source(partial_domain("d", None, None, ""), "defaults", host, osdb, "win10", phase="prefer")
    assert not linux.hyperv and windows.hyperv
    assert any(c.id.startswith("engine.hyperv:") for c in added)
