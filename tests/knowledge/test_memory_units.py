"""Memory sizes are read once, by inputs.units (libvirt's virScaleInteger), wherever the engine reads them.

The profile fact `domain.memory_mib` and the NUMA cells' sum used to carry a table of their own that lacked
P, E and 'byte' and read an unknown unit as KiB; both now go through units.to_kib.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from lxml import etree

from virtpolicy import Engine
from virtpolicy.inputs.units import bytes_per
from virtpolicy.sources.placement import check_app_cells

SCHEMA = Path("/usr/share/libvirt/schemas/basictypes.rng")


def _schema_units() -> list[str]:
    """Every spelling of basictypes.rng's `unit` pattern, ([bB]([yY][tT][eE][sS]?)?)|([kKmMgGtTpPeE]([iI]?[bB])?)."""
    text = SCHEMA.read_text()
    pattern = re.search(r'<define name="unit">\s*<data type="string">\s*<param name="pattern">([^<]+)<', text)
    assert pattern and pattern.group(1) == "([bB]([yY][tT][eE][sS]?)?)|([kKmMgGtTpPeE]([iI]?[bB])?)"
    spelled = ["b", "byte", "bytes"] + [p + s for p, s in itertools.product("kmgtpe", ("", "b", "ib"))]
    return [u for word in spelled for u in (word, word.upper()) if re.fullmatch(pattern.group(1), u)]


def test_every_unit_the_schema_allows_is_read() -> None:
    if not SCHEMA.exists():
        pytest.fail("libvirt's schemas are missing (Debian libvirt0: scripts/setup.sh test)", pytrace=False)
    units = _schema_units()
    assert len(units) == 2 * (3 + 6 * 3)
    for unit in units:
        assert bytes_per(unit) > 0, unit
    assert bytes_per("P") == bytes_per("PiB") == 2**50 and bytes_per("EB") == 10**18


@pytest.mark.parametrize(
    "value, unit, mib",
    [("1", "P", 2**30), ("2", "EiB", 2 * 2**40), ("3221225472", "byte", 3072), ("1048576", None, 1024)],
)
def test_the_memory_fact_reads_every_unit(value: str, unit: str | None, mib: int) -> None:
    written = f" unit='{unit}'" if unit else ""
    xml = f"<domain type='kvm'><name>m</name><memory{written}>{value}</memory><vcpu>1</vcpu></domain>"
    build = Engine().build(xml, os="rhel9.0")
    assert build.facts is not None and build.facts.resolve("domain.memory_mib") == mib


def test_the_cells_sum_reads_every_unit() -> None:
    """1 GiB of <memory> in cells of 512 MiB and 524288 KiB adds up: no warning."""
    root = etree.fromstring(
        "<domain><memory unit='G'>1</memory><vcpu>2</vcpu><cpu><numa>"
        "<cell id='0' cpus='0' memory='512' unit='MiB'/><cell id='1' cpus='1' memory='536870912' unit='bytes'/>"
        "</numa></cpu></domain>"
    )
    assert check_app_cells(root, "<test>", 2) == []
    root.find("memory").set("unit", "P")
    (warning,) = check_app_cells(root, "<test>", 2)
    assert "/domain/memory is 1.07374e+09 MiB" in warning
