"""osinfo-supplement.toml [[pack]]: what a declared driver pack lets the guest drive, row by row.

The INF files the rows cite are not in the corpus (they are Windows driver sources), so the check here is that
each row's ids are the ones its own citation names, and that a profile declaring the pack gains exactly them.
"""

from __future__ import annotations

import re
import tomllib

from virtpolicy.knowledge.catalog import DATA, catalog, driver_packs

ROWS = tomllib.loads((DATA / "osinfo-supplement.toml").read_text())["pack"]


def _ids_of(row: dict[str, str]) -> list[str]:
    if "virtio" in row:
        family = catalog().virtio[row["virtio"]]
        return [i for i in (family.legacy, family.modern) if i]
    return list(row["device_ids"])


def test_each_row_claims_the_ids_its_inf_line_names() -> None:
    for row in ROWS:
        named = re.findall(r"(?:VEN_([0-9A-F]{4})&)?DEV_([0-9A-F]{4})", row["cite"])
        vendor = next(v for v, _ in named if v)
        cited = {f"http://pcisig.com/pci/{(v or vendor).lower()}/{d.lower()}" for v, d in named}
        assert set(_ids_of(row)) == cited, row["driver"]


def test_virtio_win_is_every_row_of_the_pack() -> None:
    ids = driver_packs()["virtio-win"]
    assert len(ids) == len(set(ids)) == 15
    assert set(ids) == {i for row in ROWS if row["name"] == "virtio-win" for i in _ids_of(row)}
    assert "http://pcisig.com/pci/1b36/0100" in ids  # QXL's qxldod


def test_a_profile_declaring_the_pack_gains_its_ids(tmp_path) -> None:
    from virtpolicy.profiles.tomlprofile import load_toml_profile

    path = tmp_path / "p.toml"
    path.write_text('name = "p"\nversion = "1"\ndescription = "d"\n[[rule]]\nid = "d"\ndrivers = ["virtio-win"]\n')
    (rule,) = load_toml_profile(path).rules
    assert rule.drivers == driver_packs()["virtio-win"]
