"""`virtpolicy plan hosts --format html`: the page's structure (funnel, classes with their conflicts, hosts),
its determinism, that it fetches nothing and escapes what it shows, and that a real browser draws the funnel.

The fleet is the one tests/test_plan_hosts.py builds: the embedded QEMU 7.2 host twice, a copy without the
secure-boot loader and a copy without a TPM, so the page is checked against what the planner really says.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lxml.html
import pytest
from hostvariants import small_fleet
from support import assert_self_contained, cli, needs_chromium, screenshot_colours

from virtpolicy.inputs.host import EMBEDDED_BUNDLE
from virtpolicy.outputs.explain_report import KIND_COLOURS
from virtpolicy.plan.html import HOSTS_OPEN, RUNS, cause_colour, to_html

NEEDS_TPM = (
    'name = "needs-tpm"\nversion = "1.0"\ndescription = "a TPM 2.0 device"\n\n[[rule]]\n'
    'id = "tpm"\nrequire = { "tpm.model" = ["tpm-crb", "tpm-tis"] }\nstrength = "hard"\n'
)


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_fleet(tmp_path_factory.mktemp("fleet"), EMBEDDED_BUNDLE)  # h01, h02 twins; old-firmware; no-tpm


def _plan(fleet_dir: Path, out: Path, *extra: str, fmt: str = "html") -> bytes:
    proc = cli("plan", "hosts", "examples/windows10.xml", "--fleet", str(fleet_dir), "--profile", "secure-boot",
               *extra, "--format", fmt, "-o", str(out), "--workers", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"", "with -o the report goes to the file only"
    return out.read_bytes()


@pytest.fixture(scope="module")
def page(fleet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _plan(fleet_dir, tmp_path_factory.mktemp("out") / "report.html").decode()


@pytest.fixture(scope="module")
def report(fleet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return json.loads(_plan(fleet_dir, tmp_path_factory.mktemp("out") / "report.json", fmt="json"))


@pytest.fixture(scope="module")
def two_causes(fleet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """secure-boot and a TPM: old-firmware and no-tpm are refused for different host facts."""
    out = tmp_path_factory.mktemp("out")
    (out / "needs-tpm.toml").write_text(NEEDS_TPM)
    return json.loads(_plan(fleet_dir, out / "report.json", "--profile", str(out / "needs-tpm.toml"), fmt="json"))


def _bars(doc: Any) -> list[Any]:
    (svg,) = doc.xpath("//svg[@id='funnel']")
    return svg.xpath(".//rect[@class='bar']")


def test_funnel_has_the_runs_bar_then_one_bar_per_cause(report: dict[str, Any], page: str) -> None:
    doc = lxml.html.document_fromstring(page)
    bars = _bars(doc)
    assert len(bars) == 1 + len(report["funnel"]) == 2
    assert [b.get("data-hosts") for b in bars] == ["3", "1"]  # h01, h02, no-tpm run it; old-firmware does not
    assert bars[0].get("fill") == RUNS and bars[0].get("data-kind") == "runs"
    assert bars[1].get("fill") == KIND_COLOURS["host"] and bars[1].get("data-kind") == "host"  # a host fact
    assert float(bars[0].get("width")) == 3 * float(bars[1].get("width"))  # one scale: hosts out of the fleet
    titles = [b.getparent().find("title").text for b in bars]
    assert titles[0] == "runs on 3 of 4 host(s)"
    assert titles[1] == f"1 host(s), 1 class(es): {report['funnel'][0]['cause']}"
    assert "os/loader/secure" in report["funnel"][0]["cause"]
    assert doc.xpath("string(//h1)") == "examples/windows10.xml: runs on 3 of 4 host(s)"
    assert "in 3 class(es)" in doc.xpath("string(//p[@id='summary'])")


def test_two_causes_two_bars_most_hosts_first(two_causes: dict[str, Any]) -> None:
    doc = lxml.html.document_fromstring(to_html(two_causes))
    bars = _bars(doc)
    assert [b.get("data-hosts") for b in bars] == ["2", "1", "1"]  # runs; then a host each, by cause
    labels = [b.getparent().xpath("string(text[1])") for b in bars[1:]]
    assert [f["cause"][:40] for f in two_causes["funnel"]] == [label[:40] for label in labels]
    assert "devices/tpm/model" in labels[0] and "os/loader/secure" in labels[1], labels
    assert [b.get("fill") for b in bars[1:]] == [cause_colour("host")] * 2


def test_class_table_and_conflict_members(report: dict[str, Any], page: str) -> None:
    doc = lxml.html.document_fromstring(page)
    rows = doc.xpath("//table[@id='classes']//tr[@class='class']")
    assert [r.get("data-class") for r in rows] == [c["class"] for c in report["classes"]]
    cells = {r.xpath("string(td[3])"): [td.text_content() for td in r.xpath("td")] for r in rows}
    assert set(cells) == {"h01", "no-tpm", "old-firmware"}
    assert cells["h01"][1:4] == ["2", "h01", "yes"] and cells["h01"][4] == ""
    refused = next(c for c in report["classes"] if not c["runs"])
    assert cells["old-firmware"][1:] == ["1", "old-firmware", "no", refused["cause"]]
    (conflict,) = doc.xpath("//table[@id='classes']//tr[@class='conflict']")  # only under the refused class
    assert conflict.get("data-class") == refused["class"]
    assert conflict.getprevious().get("data-class") == refused["class"]  # right under its class row
    members = conflict.xpath(".//li[@class='member']")
    assert len(members) == len(refused["conflict"])
    badges = {m.xpath("string(span[@class='kind'])"): m for m in members}
    assert set(badges) == {"profile", "host"}
    assert badges["host"].xpath("span")[0].get("style") == f"background:{KIND_COLOURS['host']}"
    assert "old-firmware/domcaps-" in badges["host"].xpath("string(small)")
    assert "secure-boot.toml:" in badges["profile"].xpath("string(small)")
    assert "profile secure-boot requires firmware = efi-secure" in badges["profile"].text_content()


def test_host_table_and_details_for_large_fleets(report: dict[str, Any], page: str) -> None:
    doc = lxml.html.document_fromstring(page)
    assert not doc.xpath("//details")
    rows = doc.xpath("//table[@id='hosts']//tr[@class='host']")
    assert [[td.text_content() for td in r.xpath("td")] for r in rows] == [
        [h["name"], "", h["class"], "yes" if h["runs"] else "no"] for h in report["hosts"]
    ]
    big = copy.deepcopy(report)
    template = big["hosts"][0]
    big["hosts"] = [{**template, "name": f"r{i:03d}", "labels": {"zone": "b", "rack": f"r{i % 3}"}}
                    for i in range(HOSTS_OPEN + 1)]  # fmt: skip
    big["hosts_total"] = big["runs_on"] = HOSTS_OPEN + 1
    doc = lxml.html.document_fromstring(to_html(big))
    (details,) = doc.xpath("//details")
    assert details.xpath("string(summary)") == f"{HOSTS_OPEN + 1} hosts ({HOSTS_OPEN + 1} run it)"
    rows = details.xpath(".//table[@id='hosts']//tr[@class='host']")
    assert len(rows) == HOSTS_OPEN + 1
    assert rows[4].xpath("string(td[2])") == "rack=r1, zone=b"  # labels sorted by key


def test_same_plan_same_bytes(fleet_dir: Path, report: dict[str, Any], page: str, tmp_path: Path) -> None:
    assert _plan(fleet_dir, tmp_path / "again.html").decode() == page
    assert to_html(report) + "\n" == page  # -o FILE adds the one newline print would
    assert to_html(json.loads(json.dumps(report, sort_keys=True))) == to_html(report)


def test_page_fetches_nothing_runs_nothing_and_escapes_text(report: dict[str, Any], page: str) -> None:
    assert_self_contained(page)
    hostile = copy.deepcopy(report)
    hostile["domain"] = "<b>dom&ain</b>"
    hostile["hosts"][0]["labels"] = {"<i>k</i>": "<script>v</script>"}
    refused = next(c for c in hostile["classes"] if not c["runs"])
    refused["conflict"][0]["message"] = "<img src=x onerror=alert(1)>"
    refused["example"] = '"><svg onload=alert(1)>'
    hostile["funnel"][0]["cause"] = "</text><script>alert(1)</script>"
    text = to_html(hostile)
    parsed = lxml.html.document_fromstring(text)
    assert not parsed.xpath("//img | //script | //body//b[contains(., 'dom')] | //i | //svg[@onload]")
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;b&gt;dom&amp;ain&lt;/b&gt;" in text
    assert "&lt;/text&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert len(_bars(parsed)) == 2


@needs_chromium
def test_html_report_renders_the_funnel_in_a_real_browser(page: str, tmp_path: Path) -> None:
    pixels = screenshot_colours(page, tmp_path)

    # the runs bar is 3/4 of 560 px by 18 px; the old-firmware bar 1/4 of it; both in the first screen
    assert pixels(RUNS) > 5000, "no runs bar drawn"
    assert pixels(KIND_COLOURS["host"]) > 1500, "no host-fact cause bar drawn"
