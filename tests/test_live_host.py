"""Reading the host from a live libvirt: `host capture` and `solve --connect`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from libvirt_harness import URI, LibvirtHarness

from virtpolicy.inputs.host import load_host_bundle

pytestmark = pytest.mark.libvirt
REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", *args], capture_output=True, timeout=120, cwd=REPO, check=False
    )


def test_capture_writes_a_loadable_bundle(libvirt: LibvirtHarness, tmp_path: Path):
    done = _cli("host", "capture", "--connect", URI, str(tmp_path / "bundle"))
    assert done.returncode == 0, done.stderr.decode()
    host = load_host_bundle(tmp_path / "bundle")
    assert host.arch == "x86_64"
    assert {"q35", "pc"} <= set(host.families("x86_64", "kvm"))
    assert host.default_machine("x86_64", "kvm", "q35").startswith("pc-q35-")
    assert "ide" not in host.domcaps_for("x86_64", "kvm", "q35").enum("devices/disk/bus")


def test_capture_of_several_hosts_writes_a_fleet(libvirt: LibvirtHarness, tmp_path: Path):
    """Repeated --connect: one bundle per host under DIR, named by the URI's host, ready for --fleet."""
    done = _cli("host", "capture", "--connect", URI, "--connect", URI, str(tmp_path / "fleet"))
    assert done.returncode == 0, done.stderr.decode()
    assert sorted(p.name for p in (tmp_path / "fleet").iterdir()) == ["localhost", "localhost-2"]
    plan = _cli("plan", "hosts", str(REPO / "benchmarks" / "typical.xml"), "--fleet", str(tmp_path / "fleet"))
    assert plan.returncode == 0, plan.stderr.decode()
    assert b"runs on 2 of 2 host(s), 1 class(es)" in plan.stdout, plan.stdout


def test_solve_against_the_live_host_matches_the_embedded_capture(libvirt: LibvirtHarness):
    """The embedded bundle was captured from this kind of machine: both hosts give the same answer."""
    example = str(REPO / "examples" / "rhel6-on-q35.xml")
    live = _cli("solve", example, "-q", "--connect", URI)
    embedded = _cli("solve", example, "-q")
    assert live.returncode == 0, live.stderr.decode()
    assert live.stdout == embedded.stdout


def test_unreachable_libvirt_is_one_line_error():
    done = _cli(
        "solve", str(REPO / "examples" / "rhel6-on-q35.xml"), "--connect", "qemu+unix:///system?socket=/nonexistent"
    )
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtpolicy: error: --connect"), lines


def test_capture_records_the_uri_versions_and_this_machines_kernel(libvirt: LibvirtHarness, tmp_path: Path):
    """host.toml: the URI planning asks again (hypervisor-cpu-baseline), the daemon's versions, and the kernel
    release, known only because the URI is local (libvirt reports none)."""
    import os

    from virtpolicy.inputs.capture import is_local
    from virtpolicy.inputs.hostmeta import read_host_meta

    done = _cli("host", "capture", "--connect", URI, str(tmp_path / "bundle"))
    assert done.returncode == 0, done.stderr.decode()
    assert str(tmp_path / "bundle" / "host.toml") in done.stdout.decode()
    meta = read_host_meta(tmp_path / "bundle")
    assert meta.connect == URI and meta.kernel == os.uname().release, meta
    assert meta.libvirt == "9.0.0" and meta.hypervisor.startswith("QEMU "), meta
    host = load_host_bundle(tmp_path / "bundle")
    assert (host.connect, host.kernel) == (URI, os.uname().release)
    assert is_local("qemu:///system") and is_local("qemu+unix:///system?socket=/x")
    assert not is_local("qemu+ssh://h01/system") and not is_local("test:///default")
