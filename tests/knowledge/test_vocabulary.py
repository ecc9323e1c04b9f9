"""The vocabulary table against libvirt's own schema, and against what the builder and the profile language use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from virtpolicy import Engine
from virtpolicy.knowledge.vocabulary import global_variables, profile_vocabulary
from virtpolicy.sources.context import Build

SCHEMAS = Path("/usr/share/libvirt/schemas")
ENGINE_NAMES = {"none", "efi-secure"}  # the engine's names for "no <cpu>" and "efi with secure-boot"


@pytest.mark.parametrize("name", sorted(global_variables()))
def test_every_accepted_value_is_in_the_cited_schema_lines(name: str) -> None:
    var = global_variables()[name]
    assert set(var.decides) <= set(var.accepts), name
    cited = re.match(r"(\w+\.rng):(\d+)-(\d+)", var.citation)
    assert cited, f"{name}: citation names no schema line range: {var.citation}"
    lines = (SCHEMAS / cited.group(1)).read_text().splitlines()[int(cited.group(2)) - 1 : int(cited.group(3))]
    values = set(re.findall(r"<value>([^<]+)</value>", "\n".join(lines)))
    assert set(var.accepts) - ENGINE_NAMES <= values, f"{name}: {var.citation} holds only {sorted(values)}"


def test_the_builder_declares_what_the_table_decides() -> None:
    """With nothing written by the app, each variable's values come from the table's `decides` (the host
    may narrow them; domain.type adds the host's own guest domain types); a value the app wrote is added."""
    engine = Engine()
    domain = "<domain type='kvm'><name>v</name><memory>1048576</memory><vcpu>1</vcpu>{}</domain>"
    build = engine.build(domain.format(""), os="rhel9.0")
    assert isinstance(build, Build)
    for var in global_variables().values():
        declared = build.problem.variables[var.name].values
        if var.name == "domain.type":
            assert set(var.decides) <= set(declared) <= {*var.decides, *build.host.virt_types(build.arch)}
        else:
            assert declared and set(declared) <= set(var.decides), var.name
    written = engine.build(domain.format("<clock offset='timezone' timezone='Europe/Paris'/>"), os="rhel9.0")
    assert "timezone" not in global_variables()["clock.offset"].decides
    assert "timezone" in written.problem.variables["clock.offset"].values


def test_the_profile_language_accepts_exactly_the_table() -> None:
    vocabulary = profile_vocabulary()
    for var in global_variables().values():
        assert vocabulary[var.name] == var.accepts
