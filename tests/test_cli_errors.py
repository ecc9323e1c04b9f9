"""The command line as a user meets it: exit codes, one-line errors naming the input, JSON reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from lxml import etree

from virtpolicy.inputs.host import EMBEDDED_BUNDLE

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "rhel6-on-q35.xml"
LIBOSINFO = "http://libosinfo.org/xmlns/libvirt/domain/1.0"

PLAIN = (
    "<domain type='kvm'><name>plain</name><memory unit='MiB'>1024</memory>"
    "<os><type arch='x86_64'>hvm</type></os>"
    "<devices><disk type='file' device='disk'><source file='/var/lib/x.img'/></disk></devices></domain>\n"
)
RHEL5_Q35 = (
    "<domain type='kvm'><name>old</name><memory unit='MiB'>1024</memory>"
    f"<metadata><libosinfo:libosinfo xmlns:libosinfo='{LIBOSINFO}'><libosinfo:os id='http://redhat.com/rhel/5.11'/>"
    "</libosinfo:libosinfo></metadata>"
    "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
    "<devices><disk type='file' device='disk'><source file='/var/lib/old.img'/></disk></devices></domain>\n"
)


def run(*args: str, stdin: bytes | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "solve", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=20,
        cwd=cwd,
        check=False,
    )


def assert_input_error(proc: subprocess.CompletedProcess[bytes], *names: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("virtpolicy: error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    assert proc.stdout == b"", "nothing may be printed on stdout for bad input"
    return lines[0]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ----------------------------------------------------------------- bad input: exit 1, one line


def test_malformed_xml(tmp_path: Path) -> None:
    bad = write(tmp_path / "broken.xml", "<domain>\n<name>x</name>\n<devices>\n</domain>\n")
    line = assert_input_error(run(str(bad), "--os", "rhel9.0"), f"{bad}:4:")
    assert "malformed XML" in line


def test_entity_expansion(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "lol.xml",
        '<?xml version="1.0"?>\n<!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>\n'
        "<domain><name>&b;</name></domain>\n",
    )
    assert_input_error(run(str(bad), "--os", "rhel9.0"), f"{bad}:2:", "entity")


def test_unknown_os(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    line = assert_input_error(run(str(dom), "--os", "rhel6.99"), "'rhel6.99'")
    assert "rhel6.9" in line  # a suggestion


def test_unreadable_host(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    assert_input_error(run(str(dom), "--os", "rhel9.0", "--host", "/nonexistent"), "/nonexistent")


def test_corrupt_capabilities_in_host_dir(tmp_path: Path) -> None:
    bundle = tmp_path / "host"
    shutil.copytree(EMBEDDED_BUNDLE, bundle)
    write(bundle / "capabilities.xml", "<capabilities>\n<host>\n")
    dom = write(tmp_path / "plain.xml", PLAIN)
    assert_input_error(run(str(dom), "--os", "rhel9.0", "--host", str(bundle)), str(bundle / "capabilities.xml"))


def test_non_numeric_domcaps_vcpu_max(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "dc.xml",
        (EMBEDDED_BUNDLE / "domcaps-x86_64-q35-kvm.xml").read_text().replace("max='288'", "max='x'"),
    )
    dom = write(tmp_path / "plain.xml", PLAIN)
    assert_input_error(run(str(dom), "--os", "rhel9.0", "--host", str(bad)), str(bad))


def test_wrong_root_element(tmp_path: Path) -> None:
    net = write(tmp_path / "net.xml", "<network><name>default</name></network>\n")
    assert_input_error(run(str(net), "--os", "rhel9.0"), f"{net}:1:", "<network>")


def test_no_os_info_and_no_os_flag(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    line = assert_input_error(run(str(dom)), str(dom))
    assert "--os" in line


def test_missing_domain_file(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.xml"
    assert_input_error(run(str(missing), "--os", "rhel9.0"), str(missing))


def test_stdin_bad_input_named_stdin() -> None:
    assert_input_error(run("-", "--os", "rhel9.0", stdin=b"<domain"), "<stdin>:1:")


def test_bad_vcpu_count(tmp_path: Path) -> None:
    dom = write(tmp_path / "vcpu.xml", PLAIN.replace("<os>", "<vcpu>two</vcpu><os>"))
    assert_input_error(run(str(dom), "--os", "rhel9.0"), str(dom), "/domain/vcpu")


# ----------------------------------------------------------------- good input


def test_stdin_input_solves() -> None:
    proc = run("-", "--os", "rhel9.0", "-q", stdin=PLAIN.encode())
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""  # -q: no summary
    root = etree.fromstring(proc.stdout)
    assert root.tag == "domain" and root.findtext("name") == "plain"
    assert root.find("os/type").get("machine") == "pc-q35-7.2"
    assert root.find("devices/disk/target").get("bus") == "virtio"


def test_file_and_stdin_agree(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    from_file = run(str(dom), "--os", "rhel9.0", "-q")
    from_stdin = run("-", "--os", "rhel9.0", "-q", stdin=PLAIN.encode())
    assert from_file.returncode == from_stdin.returncode == 0
    assert from_file.stdout == from_stdin.stdout


def test_output_file(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    out = tmp_path / "out.xml"
    proc = run(str(dom), "--os", "rhel9.0", "-q", "-o", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    assert etree.fromstring(out.read_bytes()).findtext("name") == "plain"


# ----------------------------------------------------------------- conflicts: exit 2


def test_conflict_exit_2_names_machine_and_os(tmp_path: Path) -> None:
    dom = write(tmp_path / "old.xml", RHEL5_Q35)
    proc = run(str(dom))
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert "/domain/os/type/@machine" in err
    assert "rhel5.11" in err
    assert proc.stdout == b""


def test_conflict_json(tmp_path: Path) -> None:
    dom = write(tmp_path / "old.xml", RHEL5_Q35)
    proc = run(str(dom), "--format", "json")
    assert proc.returncode == 2, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["status"] == "conflict"
    assert report["os"]["short_id"] == "rhel5.11"
    members = report["conflict"]
    assert len(members) == 2, members
    wheres = {m["provenance"]["where"] for m in members}
    sources = {m["provenance"]["kind"] for m in members}
    assert "/domain/os/type/@machine" in wheres
    assert sources == {"app", "guest"}
    assert all(m["strength"] == "hard" for m in members)


def _solved_json(proc: subprocess.CompletedProcess[bytes]) -> etree._Element:
    assert proc.returncode == 0, proc.stderr.decode()
    report = json.loads(proc.stdout)
    assert report["status"] == "solved"
    root = etree.fromstring(report["xml"].encode())
    assert root.tag == "domain"
    variables = {d["variable"]: d["value"] for d in report["decisions"]}
    assert variables["machine"] in ("q35", "pc")
    return root


def test_solved_json_without_passed_over_values(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    root = _solved_json(run(str(dom), "--os", "rhel9.0", "--format", "json", "-q"))
    assert root.findtext("name") == "plain"


def test_solved_json_example() -> None:
    root = _solved_json(run(str(EXAMPLE), "--format", "json", "-q"))
    assert root.findtext("name") == "rhel6-q35"
    assert root.find("devices/interface/model").get("type") == "virtio-transitional"


def _cells(vcpus: int, memory_mib: int, cells: str) -> bytes:
    return (
        f"<domain type='kvm'><name>cells</name><memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
        f"<os><type arch='x86_64'>hvm</type></os><cpu><numa>{cells}</numa></cpu><devices/></domain>\n"
    ).encode()


def test_inconsistent_numa_cells_are_one_line_errors_naming_the_cell(tmp_path: Path) -> None:
    cell = "<cell id='{}' cpus='{}' memory='{}' unit='MiB'/>"
    cases = {
        "beyond": (_cells(2, 1024, cell.format(0, "0", 512) + cell.format(1, "1-2", 512)), "names vCPU 2"),
        "overlap": (_cells(2, 1024, cell.format(0, "0-1", 512) + cell.format(1, "1", 512)), "vCPU 1 is in"),
        "unassigned": (_cells(4, 1024, cell.format(0, "0", 512) + cell.format(1, "1", 512)), "vCPU(s) 2, 3"),
    }
    for name, (xml, fragment) in cases.items():
        line = assert_input_error(run(str(write(tmp_path / f"{name}.xml", xml)), "--os", "fedora37"), fragment)
        assert "/domain/cpu/numa" in line, line


def test_cell_memory_that_does_not_add_up_is_accepted_as_libvirt_does_with_a_warning(tmp_path: Path) -> None:
    cell = "<cell id='{}' cpus='{}' memory='{}' unit='MiB'/>"
    xml = _cells(2, 2048, cell.format(0, "0", 512) + cell.format(1, "1", 512))
    done = run(str(write(tmp_path / "memory.xml", xml)), "--os", "fedora37", "-q")
    assert done.returncode == 0, done.stderr
    assert b"the cells hold 1024 MiB but /domain/memory is 2048 MiB; libvirt takes the sum" in done.stderr
    # a hot-plug memory module counts: cells + module = <memory>, nothing to warn about
    dimm = (
        "<memory model='dimm'><target><size unit='MiB'>1024</size><node>0</node></target></memory></devices>"
    )
    with_module = xml.replace(b"<devices/>", b"<devices>" + dimm.encode())
    done = run(str(write(tmp_path / "module.xml", with_module)), "--os", "fedora37", "-q")
    assert done.returncode == 0, done.stderr
    assert b"libvirt takes the sum" not in done.stderr


# ----------------------------------------------------------------- resource bombs, exit codes, write errors (issue 9)


def _timed(*args: str) -> tuple[subprocess.CompletedProcess[bytes], float]:
    import time

    start = time.perf_counter()
    proc = run(*args)
    return proc, time.perf_counter() - start


def test_tiny_domains_with_giant_sizes_are_refused_quickly(tmp_path: Path) -> None:
    """Each is a few hundred bytes that once grew to gigabytes: refused before anything is expanded."""
    cell = "<cpu><numa><cell id='0' cpus='0-4294967295' memory='1048576'/></numa></cpu>"
    cases = {
        "vcpu": (PLAIN.replace("<os>", "<vcpu>4294967296</vcpu><os>"), "/domain/vcpu"),
        "cells": (PLAIN.replace("<os>", f"<vcpu>4</vcpu>{cell}<os>"), "/domain/cpu/numa/cell/@cpus"),
        "memory": (PLAIN.replace("<memory unit='MiB'>1024", "<memory unit='EiB'>1024"), "exceeds libvirt's limit"),
        "bus": (PLAIN.replace("</disk>", "<address type='pci' bus='zz' slot='0x01'/></disk>"), "@bus"),
    }
    for name, (xml, fragment) in cases.items():
        proc, elapsed = _timed(str(write(tmp_path / f"{name}.xml", xml)), "--os", "fedora37")
        assert_input_error(proc, f"{name}.xml:1:", fragment)
        assert elapsed < 10, f"{name}: {elapsed:.1f} s"


def test_dev_zero_is_refused_after_16_mib() -> None:
    proc, elapsed = _timed("/dev/zero", "--os", "fedora37")
    assert_input_error(proc, "/dev/zero", "larger than 16 MiB")
    assert elapsed < 10


def test_usage_error_exits_1_not_2_in_one_line() -> None:
    """2 means 'conflicting requirements'; a mistyped option is bad input."""
    line = assert_input_error(run("--no-such-option"))
    assert "unrecognized arguments: --no-such-option" in line


def test_output_to_a_directory_is_one_line_naming_it(tmp_path: Path) -> None:
    dom = write(tmp_path / "plain.xml", PLAIN)
    assert_input_error(run(str(dom), "--os", "fedora37", "-q", "-o", str(tmp_path)), str(tmp_path), "cannot write")
