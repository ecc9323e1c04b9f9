"""libvirt's own test-suite domains (Debian source package libvirt 9.0, tests/qemuxml2xmloutdata/).

These are complete, post-parse domains nobody on this team wrote, made against the QEMU 7.2 test host
that tests/corpus.py assembles as a host bundle. Every x86 file must come back unchanged (apart from the
engine's record and the machine alias made canonical), or be listed in tests/data/corpus-outcomes.toml
with the outcome it must have and why: a false conflict or a changed complete domain fails here.
Without the corpus (scripts/fetch-libvirt-corpus.sh, run by `scripts/setup.sh test`) these tests skip,
except under CI, where a missing corpus is a failure.
"""

from __future__ import annotations

import contextlib
import io
import tomllib
from pathlib import Path

import pytest
from corpus import corpus_host_bundle, latest_x86_64_files, normalise, require_corpus, x86_64_files
from lxml import etree

from virtpolicy.cli import main

OUTCOMES = Path(__file__).parent / "data" / "corpus-outcomes.toml"
SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_corpus()
    return corpus_host_bundle(tmp_path_factory.mktemp("corpus-host"))


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def _outcomes() -> dict[str, dict[str, str]]:
    return tomllib.loads(OUTCOMES.read_text()).get("file", {})


def run_cli(*args: str) -> tuple[int, str]:
    """The CLI in-process (the same entry point as the command), with its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def _files() -> list[Path]:
    return x86_64_files() or latest_x86_64_files()


def _ids() -> list[str]:
    return [p.name for p in _files()] or ["no-corpus"]


def _solve(path: Path, bundle: Path, out: Path, command: str = "solve") -> tuple[int, str]:
    args = [command, str(path), "--host", str(bundle)]
    if command == "solve":
        args += ["-q", "-o", str(out)]
    return run_cli(*args)


def test_the_outcome_table_names_only_corpus_files() -> None:
    require_corpus()
    names = {p.name for p in _files()}
    unknown = sorted(set(_outcomes()) - names)
    assert not unknown, f"corpus-outcomes.toml lists files the corpus does not have: {unknown}"
    for name, row in _outcomes().items():
        assert row.get("outcome") in ("conflict", "input-error", "changed"), name
        assert row.get("why"), f"{name}: every listed file says why"


@pytest.mark.parametrize("name", _ids())
def test_corpus_domain_is_unchanged_or_has_its_listed_outcome(
    name: str, bundle: Path, schema: etree.RelaxNG, tmp_path: Path
) -> None:
    path = next(p for p in _files() if p.name == name)
    expected = _outcomes().get(name, {"outcome": "unchanged"})
    out = tmp_path / "out.xml"
    code, err = _solve(path, bundle, out)
    assert "internal error" not in err, err
    outcome = {0: "unchanged", 1: "input-error", 2: "conflict"}[code]
    if code == 0 and normalise(out.read_bytes()) != normalise(path.read_bytes()):
        outcome = "changed"
    assert outcome == expected["outcome"], f"{name}: {outcome} (expected {expected['outcome']}): {err[-2000:]}"
    if "fragment" in expected:
        assert expected["fragment"] in err, err
    if code == 0:
        assert schema.validate(etree.parse(str(out))), schema.error_log.last_error
        again = tmp_path / "again.xml"
        assert _solve(out, bundle, again)[0] == 0
        assert again.read_bytes() == out.read_bytes(), "solving the output again gives the same bytes"
        # and `check` agrees with solve on every unchanged file
        assert _solve(path, bundle, out, "check")[0] == 0


@pytest.mark.libvirt
def test_a_sample_of_outputs_defines_in_real_libvirt_with_addresses_kept(libvirt, bundle: Path, tmp_path: Path) -> None:
    """50 outputs, spread over the corpus: libvirt accepts them and keeps every PCI address we wrote."""
    files = [p for p in _files() if _outcomes().get(p.name, {}).get("outcome") in (None, "unchanged")]
    sample = files[:: max(1, len(files) // 50)][:50]
    defined = rejected_input = 0
    for path in sample:
        out = tmp_path / path.name
        code, err = _solve(path, bundle, out)
        assert code == 0, err
        xml = out.read_text()
        root = etree.fromstring(xml.encode())
        name = f"vp-corpus-{defined}"
        root.find("name").text = name
        for uuid in root.findall("uuid"):
            root.remove(uuid)
        try:
            dumped = etree.fromstring(libvirt.define(etree.tostring(root, encoding="unicode")).encode())
        except Exception as exc:  # libvirt refuses the input itself on this host: say which, do not count it
            original = etree.fromstring(path.read_bytes())
            original.find("name").text = name + "-in"
            for uuid in original.findall("uuid"):
                original.remove(uuid)
            try:
                libvirt.define(etree.tostring(original, encoding="unicode"))
            except Exception:
                rejected_input += 1
                continue
            finally:
                with contextlib.suppress(Exception):
                    libvirt.undefine(name + "-in")
            raise AssertionError(f"{path.name}: libvirt defines the input but refuses our output: {exc}") from exc
        try:
            ours = {_where(a): dict(a.attrib) for a in root.iterfind("devices/*/address[@type='pci']")}
            theirs = {_where(a): dict(a.attrib) for a in dumped.iterfind("devices/*/address[@type='pci']")}
            for key, attrs in ours.items():
                assert theirs.get(key) == attrs, f"{path.name}: {key} moved: {attrs} -> {theirs.get(key)}"
        finally:
            libvirt.undefine(name)
        defined += 1
    assert defined >= 40, f"only {defined} of {len(sample)} defined ({rejected_input} inputs refused by libvirt here)"


def _where(address: etree._Element) -> str:
    """A device's identity across a define: libvirt sorts controllers, so they go by type and index."""
    device = address.getparent()
    if device.tag == "controller":
        return f"controller[{device.get('type')}:{device.get('index')}]"
    siblings = [d for d in device.getparent() if d.tag == device.tag]
    return f"{device.tag}[{siblings.index(device)}]"
