"""The public API: docs/api.md runs as written, and one Engine gives the CLI's bytes from threads, from a
process pool and after pickling."""

from __future__ import annotations

import doctest
import json
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
from support import REPO, cli, partial_domain

from virtpolicy import ArgumentError, Engine, HostError, InputError, ProfileError, UnknownOSError, VirtpolicyError
from virtpolicy.inputs.host import EMBEDDED_BUNDLE

EXAMPLES = sorted((REPO / "examples").glob("*.xml"))
FEDORA = "http://fedoraproject.org/fedora/37"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def test_api_document_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    failures, tried = doctest.testfile(str(REPO / "docs" / "api.md"), module_relative=False, verbose=False)
    assert tried > 20, "docs/api.md lost its examples"
    assert failures == 0


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_to_dict_is_the_cli_json(engine: Engine, example: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    proc = cli("solve", "--format", "json", str(example.relative_to(REPO)))
    result = engine.solve(str(example.relative_to(REPO)))
    assert json.loads(proc.stdout) == json.loads(json.dumps(result.to_dict()))
    assert proc.returncode == (0 if result.feasible else 2)


def test_domain_forms_give_the_same_bytes(engine: Engine, tmp_path: Path) -> None:
    from lxml import etree

    path = tmp_path / "dom.xml"  # no top-level comment: an element has none to carry
    path.write_text(partial_domain("forms", FEDORA, None, "<interface type='user'/>"))
    text = path.read_text()
    element = etree.fromstring(path.read_bytes())
    before = etree.tostring(element)
    forms = [path, str(path), text, path.read_bytes(), element, etree.ElementTree(element)]
    outputs = {engine.solve(form, source="x").xml for form in forms}
    assert len(outputs) == 1
    assert etree.tostring(element) == before, "the caller's element was modified"


def test_eight_threads_give_the_cli_bytes(engine: Engine) -> None:
    expected = {p: cli("solve", "-q", str(p)).stdout for p in EXAMPLES}
    jobs = [p for p in EXAMPLES for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        outputs = list(pool.map(lambda p: engine.solve(p, source=str(p)), jobs))
    for path, result in zip(jobs, outputs, strict=True):
        if result.feasible:
            assert result.xml_bytes == expected[path], path.name
        else:
            assert expected[path] == b"", path.name


def _solve_in_worker(engine: Engine, path: str) -> bytes | None:
    return engine.solve(path).xml_bytes


def test_process_pool_and_pickle_give_the_same_bytes(engine: Engine) -> None:
    clone = pickle.loads(pickle.dumps(engine))
    paths = [str(p) for p in EXAMPLES]
    local = [engine.solve(p).xml_bytes for p in paths]
    assert [clone.solve(p).xml_bytes for p in paths] == local
    with ProcessPoolExecutor(max_workers=2) as pool:
        remote = list(pool.map(_solve_in_worker, [engine] * len(paths), paths))
    assert remote == local


def test_several_hosts_by_id(tmp_path: Path) -> None:
    engine = Engine({"a": EMBEDDED_BUNDLE, "b": EMBEDDED_BUNDLE / "domcaps-x86_64-pc-kvm.xml"})
    xml = partial_domain("h", FEDORA, None, "<interface type='user'/>")
    assert engine.solve(xml, host="a").assignment["machine"] == "q35"
    assert engine.solve(xml, host="b").assignment["machine"] == "pc"  # that host describes pc only
    with pytest.raises(ArgumentError, match="no host 'c' is loaded"):
        engine.solve(xml, host="c")
    engine.add_host("c", EMBEDDED_BUNDLE)
    engine.remove_host("a")
    assert sorted(engine.hosts) == ["b", "c"]


@pytest.mark.parametrize(
    ("call", "error", "names"),
    [
        (lambda e: e.solve(b"<domain"), InputError, "<domain bytes>"),
        (lambda e: e.solve("/nonexistent/dom.xml"), InputError, "/nonexistent/dom.xml"),
        (lambda e: e.solve("examples/rhel6-on-q35.xml", os="nosuchos"), UnknownOSError, "nosuchos"),
        (lambda e: e.solve("examples/rhel6-on-q35.xml", os=7), ArgumentError, "os:"),
        (lambda e: e.solve("examples/rhel6-on-q35.xml", profiles="modern-q35"), ArgumentError, "profiles:"),
        (lambda e: e.solve("examples/rhel6-on-q35.xml", profiles=["no-such"]), ProfileError, "no-such"),
        (lambda e: e.solve("examples/rhel6-on-q35.xml", guest_support="sloppy"), ArgumentError, "guest_support"),
        (lambda e: e.solve("examples/rhel6-on-q35.xml", refresh="yes"), ArgumentError, "refresh"),
        (lambda e: e.explain("examples/rhel6-on-q35.xml", max_conflicts=0), ArgumentError, "max_conflicts"),
        (lambda e: e.add_device("examples/rhel6-on-q35.xml", "<interface/>", node=-1), ArgumentError, "node"),
        (lambda e: e.add_device("examples/rhel6-on-q35.xml", "<interface/>", policy="x"), ArgumentError, "policy"),
        (lambda e: e.solve(None), ArgumentError, "domain:"),
    ],
)
def test_bad_arguments_are_named_errors(
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    call,
    error,
    names,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(error) as info:
        call(engine)
    assert isinstance(info.value, VirtpolicyError)
    assert names in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_engine_arguments(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="no such host bundle"):
        Engine(tmp_path / "missing")
    with pytest.raises(ArgumentError, match="host:"):
        Engine(3.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="not an osinfo database"):
        Engine(osinfo_db=tmp_path)


def test_input_error_locates_the_xpath(engine: Engine) -> None:
    bad = partial_domain(
        "v", FEDORA, "q35", "<disk type='file' device='disk'><target dev='vda'/><address type='pci' bus='zz'/></disk>"
    )
    with pytest.raises(InputError) as info:
        engine.solve(bad, source="app.xml")
    assert info.value.input == "app.xml"
    assert info.value.location and info.value.location.startswith("/domain/devices/disk"), str(info.value)


def test_a_complete_domain_libvirt_would_refuse_is_the_apps_input_error(tmp_path: Path) -> None:
    """Nothing is filled into a complete domain, so one lacking what libvirt requires (a disk target) is
    refused as input, naming the element and the way out, by solve and check alike; as partial it solves."""
    disk = "<disk type='file' device='disk'><source file='/var/lib/libvirt/images/a.qcow2'/></disk>"
    xml = partial_domain("c", FEDORA, "pc", "<controller type='pci' index='0' model='pci-root'/>" + disk)
    path = tmp_path / "c.xml"
    path.write_text(xml)
    for command in ("solve", "check"):
        proc = cli(command, str(path))
        assert proc.returncode == 1, proc.stderr
        line = proc.stderr.decode().strip()
        assert "\n" not in line and "/domain/devices/disk[1]" in line and "--partial" in line, line
    assert cli("solve", "-q", "--partial", str(path)).returncode == 0


def test_reload_profiles_reads_a_changed_library(tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    profile = library / "acme.toml"
    rule = '[[rule]]\nid = "clock"\nrequire = {{ "clock.offset" = ["{0}"] }}\nstrength = "hard"\n'
    profile.write_text('name = "acme"\nversion = "1.0"\ndescription = "d"\n\n' + rule.format("utc"))
    engine = Engine(profile_path=[library])
    xml = partial_domain("r", FEDORA, None, "<interface type='user'/>")
    assert engine.solve(xml, profiles=["acme"]).assignment["clock.offset"] == "utc"
    profile.write_text('name = "acme"\nversion = "2.0"\ndescription = "d"\n\n' + rule.format("localtime"))
    assert engine.solve(xml, profiles=["acme"]).assignment["clock.offset"] == "utc", "loaded once per engine"
    engine.reload_profiles()
    assert engine.solve(xml, profiles=["acme"]).assignment["clock.offset"] == "localtime"
