"""firmware.toml: what each <os> form the app writes asks for, row by row."""

from __future__ import annotations

import pytest
from support import one_source, partial_domain

LOADER = "<loader readonly='yes'{} type='pflash'>/usr/share/OVMF/OVMF_CODE_4M{}.fd</loader>"


@pytest.mark.parametrize(
    "os_xml, allowed, where",
    [
        ("<firmware><feature enabled='yes' name='secure-boot'/></firmware>", ["efi-secure"], "/@enabled"),
        ("<firmware><feature enabled='no' name='secure-boot'/></firmware>", ["efi"], "/@enabled"),
        (LOADER.format(" secure='yes'", ".ms"), ["efi-secure"], "loader"),
        (LOADER.format("", ".secboot"), ["efi-secure"], "loader"),
        (LOADER.format("", ""), ["efi"], "loader"),
        ("", ["efi", "efi-secure"], "/os/@firmware"),
    ],
)
def test_the_first_matching_row_decides(host, osdb, os_xml: str, allowed: list[str], where: str) -> None:
    xml = partial_domain("f", None, "q35", "")
    xml = xml.replace("<os>", "<os>" if os_xml else "<os firmware='efi'>")
    xml = xml.replace("</type></os>", f"</type>{os_xml}</os>")
    _, added = one_source(xml, "app", host, osdb)
    pins = [c for c in added if c.variables == ("firmware",)]
    assert len(pins) == 1
    assert pins[0].provenance.where.endswith(where)
    assert sorted(v for v in ("bios", "efi", "efi-secure") if v not in pins[0].sets[0]) == sorted(allowed)
