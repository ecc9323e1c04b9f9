"""`virtpolicy whatif combinations --format html`: the page's structure, its determinism, that it fetches
nothing and escapes what it shows, and that a real browser draws the heatmap.

The documents come from the public API in-process, over a handful of profiles, so the page is checked
against what the analysis really says (legacy-pc + modern-q35 and desktop-spice + headless-server can
never be selected together; modern-q35 is dead alone on rhel5.11).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lxml.html
import pytest
from support import assert_self_contained, needs_chromium, screenshot_colours

from virtpolicy import Engine
from virtpolicy.whatif.html import FEASIBLE, INFEASIBLE, PARTIAL, heat_colour, to_html
from virtpolicy.whatif.report import analyse_combinations

PROFILES = ["legacy-pc", "modern-q35", "secure-boot", "desktop-spice", "headless-server"]
OSES = ["fedora37", "win10"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def report(engine: Engine) -> dict[str, Any]:
    return analyse_combinations(engine, PROFILES, OSES, workers=1).to_dict()


@pytest.fixture(scope="module")
def page(report: dict[str, Any]) -> str:
    return to_html(report)


def _squares(page: str) -> dict[tuple[str, str], Any]:
    doc = lxml.html.document_fromstring(page)
    (svg,) = doc.xpath("//svg[@id='pair-heatmap']")
    return {(r.get("data-a"), r.get("data-b")): r for r in svg.xpath(".//rect[@class='pair']")}


def test_heatmap_has_one_square_per_pair_coloured_by_infeasibility(page: str) -> None:
    squares = _squares(page)
    assert len(squares) == len(PROFILES) ** 2
    assert set(squares) == {(a, b) for a in PROFILES for b in PROFILES}
    for a, b in [("legacy-pc", "modern-q35"), ("desktop-spice", "headless-server"), ("legacy-pc", "secure-boot")]:
        for key in [(a, b), (b, a)]:  # symmetric
            assert squares[key].get("fill") == INFEASIBLE, key
            assert squares[key].get("data-cells") == "2"
    assert squares[("secure-boot", "desktop-spice")].get("fill") == FEASIBLE
    assert squares[("modern-q35", "secure-boot")].get("fill") == FEASIBLE
    assert all(squares[(p, p)].get("fill") == FEASIBLE for p in PROFILES)  # nothing is dead alone here
    title = squares[("legacy-pc", "modern-q35")].getparent().find("title").text
    assert title.startswith("legacy-pc + modern-q35: infeasible in 2 of 2 cell(s)")
    assert "feasible in every cell" in squares[("secure-boot", "desktop-spice")].getparent().find("title").text
    doc = lxml.html.document_fromstring(page)
    legend = doc.xpath("//svg[@id='pair-heatmap']//rect[@class='legend']")
    assert {r.get("fill") for r in legend} >= {FEASIBLE, PARTIAL, INFEASIBLE}
    assert len(doc.xpath("//svg[@id='pair-heatmap']//rect[@class='diagonal']")) == len(PROFILES)  # outlined
    assert any("rotate(-45" in (t.get("transform") or "") for t in doc.xpath("//svg[@id='pair-heatmap']//text"))


def test_matrix_combinations_influence_and_summary_are_on_the_page(report: dict[str, Any], page: str) -> None:
    doc = lxml.html.document_fromstring(page)
    rows = doc.xpath("//table[@id='os-matrix']//tr")
    assert [r.xpath("string(th)").strip() for r in rows[1:]] == OSES  # one host: rows name the OS only
    assert [s.text for s in rows[0].xpath("th[@class='v']/span")] == PROFILES
    influence = report["cells"][0]["influence"]["legacy-pc"]
    assert rows[1].xpath("td")[2].text == str(len(influence))  # after infeasible count and checks: legacy-pc
    combos = {c.xpath("string(h3)"): c for c in doc.xpath("//div[@class='combo']")}
    assert list(combos) == ["legacy-pc + modern-q35", "legacy-pc + secure-boot", "desktop-spice + headless-server"]
    clash = combos["legacy-pc + modern-q35"].text_content()
    assert "every cell" in clash  # grouped: shown once for both cells
    assert "profile legacy-pc requires machine = pc" in clash and "legacy-pc.toml:7" in clash
    assert "profile modern-q35 requires machine = q35" in clash
    assert [k.text for k in combos["legacy-pc + modern-q35"].xpath(".//span[@class='kind']")] == ["profile"] * 2
    table = doc.xpath("//table[@id='influence']")[0].text_content()
    assert "machine" in table and "q35" in table and "pc" in table
    summary = doc.xpath("//table[@id='summary']")[0].text_content()
    assert "2: fedora37, win10" in summary and "desktop-spice:sound-pc" in summary
    assert doc.xpath("//table[@id='redundant']") or "No redundant pairs." in page
    assert doc.xpath("//table[@id='interactions']") or "No pair of profiles interacts" in page


def test_a_dead_profile_colours_its_diagonal_and_every_pair_with_it(engine: Engine) -> None:
    """modern-q35 is dead on rhel5.11, so {legacy-pc, modern-q35} is infeasible there though not minimal."""
    report = analyse_combinations(engine, ["legacy-pc", "modern-q35"], ["rhel5.11", "win10"], workers=1).to_dict()
    assert report["cells"][0]["dead"] == ["modern-q35"]
    squares = _squares(to_html(report))
    assert squares[("modern-q35", "modern-q35")].get("fill") == heat_colour(1, 2) == PARTIAL
    assert squares[("legacy-pc", "modern-q35")].get("fill") == INFEASIBLE  # rhel5.11 via the dead one, win10 pair
    assert squares[("legacy-pc", "legacy-pc")].get("fill") == FEASIBLE
    doc = lxml.html.document_fromstring(to_html(report))
    assert doc.xpath("//table[@id='os-matrix']//td[@class='dead']/@title") == ["modern-q35 is infeasible alone here"]
    (dead,) = [c for c in doc.xpath("//div[@class='combo']") if c.xpath("string(h3)") == "modern-q35"]
    assert "rhel5.11 does not support the q35 chipset" in dead.text_content()


def test_rows_name_the_host_when_there_are_several(report: dict[str, Any]) -> None:
    twice = copy.deepcopy(report)
    twice["cells"] += [{**copy.deepcopy(c), "host": "other-host"} for c in report["cells"]]
    twice["summary"]["cells"] = len(twice["cells"])
    doc = lxml.html.document_fromstring(to_html(twice))
    labels = [r.xpath("string(th)").strip() for r in doc.xpath("//table[@id='os-matrix']//tr")[1:]]
    first = report["cells"][0]["host"]
    assert labels == [f"{o} on {h}" for h in (first, "other-host") for o in OSES]


def test_same_document_same_bytes(engine: Engine, report: dict[str, Any], page: str) -> None:
    assert to_html(report) == page
    assert to_html(json.loads(json.dumps(report, sort_keys=True))) == page  # the JSON file renders the same
    assert to_html(analyse_combinations(engine, PROFILES, OSES, workers=1).to_dict()) == page


def test_page_fetches_nothing_runs_nothing_and_escapes_text(report: dict[str, Any], page: str) -> None:
    assert_self_contained(page)
    hostile = copy.deepcopy(report)
    hostile["domain"] = "<b>dom&ain</b>"
    hostile["cells"][0]["minimal_infeasible"][0]["conflict"][0]["message"] = "<img src=x onerror=alert(1)>"
    text = to_html(hostile)
    parsed = lxml.html.document_fromstring(text)
    assert not parsed.xpath("//img | //body//b[contains(., 'dom')]")
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;b&gt;dom&amp;ain&lt;/b&gt;" in text


@needs_chromium
def test_html_report_renders_the_heatmap_in_a_real_browser(page: str, tmp_path: Path) -> None:
    pixels = screenshot_colours(page, tmp_path)

    # six infeasible squares (three pairs, both halves) of 26x26 less their labels, in the first screen
    assert pixels(INFEASIBLE) > 2000, "no infeasible squares drawn"
    assert pixels(FEASIBLE) > 5000, "no feasible squares drawn"
