"""`virtpolicy check` on what virt-install 4.1 creates, as libvirt stores it.

For every OS variant of the conformance suite: `virt-install --print-xml` (the peer a management app
would use), defined in the real libvirtd and dumped back (libvirt's own defaults and addresses added),
then checked. A domain libvirt and the guest can run must fit (exit 0); the real problems virt-install
is known to create are conflicts naming the guest's missing driver (KNOWN_PROBLEMS, each with why).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
from libvirt_harness import LibvirtHarness
from test_conformance import OS_VARIANTS

from virtpolicy.cli import main

pytestmark = pytest.mark.libvirt

# os -> (a fact the conflict must name, why virt-install's domain cannot work for that guest here)
HYPERV = (
    "features/hyperv/features",
    "virt-install turns on Hyper-V relaxed/vapic/spinlocks for Windows without asking the host; this host's "
    "domcapabilities list only spinlocks and vendor_id, and QEMU aborts at start with the others (DESIGN.md)",
)
KNOWN_PROBLEMS: dict[str, tuple[str, str]] = {
    os_id: HYPERV for os_id in ("winxp", "win7", "win8.1", "win10", "win11", "win2k19", "win2k22")
}


def _virt_install(uri: str, os_id: str, image: Path) -> str:
    argv = [
        "virt-install", "--connect", uri, "--print-xml", "--dry-run", "--name", _name(os_id), "--osinfo", os_id,
        "--memory", "1024", "--vcpus", "1", "--import", "--disk", f"path={image}", "--network", "user",
        "--noautoconsole",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _name(os_id: str) -> str:
    return "vp-vi-" + os_id.replace(".", "-")


def _check(path: Path) -> tuple[int, dict]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(path), "--format", "json"])
    assert "internal error" not in err.getvalue(), err.getvalue()
    return code, json.loads(out.getvalue())


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vi") / "vi.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True, timeout=60)
    return path


@pytest.mark.parametrize("os_id", OS_VARIANTS)
def test_check_of_a_virt_install_domain_as_libvirt_stores_it(
    os_id: str, libvirt: LibvirtHarness, image: Path, tmp_path: Path
) -> None:
    xml = _virt_install(libvirt.uri, os_id, image)
    try:
        dumped = libvirt.define(xml)
    finally:
        with contextlib.suppress(Exception):
            libvirt.undefine(_name(os_id))
    path = tmp_path / f"{os_id}.xml"
    path.write_text(dumped)
    code, report = _check(path)
    if os_id in KNOWN_PROBLEMS:
        device, why = KNOWN_PROBLEMS[os_id]
        assert code == 2, f"{os_id}: expected the conflict ({why}), got {report['status']}"
        members = [m for c in report["conflicts"] for m in c["members"]]
        assert any(device in json.dumps(m) for m in members), (why, members)
    else:
        assert code == 0, f"{os_id}: {json.dumps(report.get('conflicts'), indent=1)[:3000]}"
        assert report["status"] == "fits"
    assert path.read_text() == dumped, "check never rewrites"
