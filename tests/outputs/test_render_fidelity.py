"""Fidelity on existing domains: a complete domain comes back as written, `check` never rewrites.

The reproductions in tests/data/fidelity/ are minimal libvirt-produced domains that earlier versions
changed or refused (each file's comment says how). The completeness rule is docs/completeness.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus import normalise
from lxml import etree
from support import cli, partial_domain, run

from virtpolicy.inputs.domain import Domain
from virtpolicy.knowledge.completeness import completeness

REPO = Path(__file__).resolve().parents[2]
FIDELITY = REPO / "tests" / "data" / "fidelity"
ADDRESSING = {"ramfb.xml", "usbnet.xml", "unassigned.xml", "vserial-no-agent.xml"}  # tests/sources/test_addressing.py


@pytest.mark.parametrize("path", sorted(FIDELITY.glob("*.xml")), ids=lambda p: p.stem)
def test_complete_reproduction_comes_back_unchanged(path: Path) -> None:
    done = cli("solve", str(path), "--os", "linux2022", "-q")
    assert done.returncode == 0, done.stderr.decode()
    assert normalise(done.stdout) == normalise(path.read_bytes())
    again = cli("solve", "-", "--os", "linux2022", "-q", stdin=done.stdout)
    assert again.stdout == done.stdout, "solving the output again must give the same bytes"


def test_rhel7_balloon_on_pc_is_no_conflict_and_no_warning_the_supplement_knows_virtio_balloon() -> None:
    path = FIDELITY / "balloon-rhel7-pc.xml"
    done = cli("check", str(path))
    assert done.returncode == 0, done.stderr.decode()
    assert b"warning" not in done.stdout + done.stderr
    assert b"fits host" in done.stdout


def _element(xml: str) -> etree._Element:
    return etree.fromstring(xml)


@pytest.mark.parametrize(
    ("devices", "signal"),
    [
        ("<emulator>/usr/bin/qemu-system-x86_64</emulator>", "emulator"),
        ("<controller type='pci' index='0' model='pcie-root'/>", "root-controller"),
        ("<input type='mouse' bus='ps2'><address type='isa'/></input>", "address"),
    ],
)
def test_each_libvirt_written_signal_makes_a_domain_complete(devices: str, signal: str) -> None:
    root = _element(partial_domain("c", None, None, devices))
    state = completeness(root, "<test>")
    assert state.complete and state.signal == signal, state


def test_a_partial_template_is_partial_and_the_app_can_say_otherwise_either_way() -> None:
    root = _element(partial_domain("p", None, None, "<disk type='file' device='disk'/>"))
    assert not completeness(root, "<test>").complete
    assert completeness(root, "<test>", override=True).complete
    flagged = _element(
        partial_domain(
            "p",
            None,
            None,
            "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
            "<metadata><virtpolicy:complete xmlns:virtpolicy='http://virtpolicy.org/xmlns/domain/1.0' value='no'/>"
            "</metadata>",
        )
    )
    state = completeness(flagged, "<test>")
    assert not state.complete and "metadata" in state.reason
    assert completeness(flagged, "<test>", override=True).complete


def test_a_complete_domain_gains_nothing_a_partial_one_is_completed(host, osdb) -> None:
    devices = "<emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/>"
    complete = run(partial_domain("c", "http://libosinfo.org/linux/2022", "pc", devices), host, osdb)
    assert complete.solved and complete.built.complete
    assert normalise(complete.xml) == normalise(
        partial_domain("c", "http://libosinfo.org/linux/2022", "pc-i440fx-7.2", devices).encode()
    ), "only the machine alias becomes canonical"
    partial = run(partial_domain("p", "http://libosinfo.org/linux/2022", "pc", devices), host, osdb, complete=False)
    root = etree.fromstring(partial.xml)
    assert root.find("features/acpi") is not None and root.find("devices/graphics") is not None


def test_check_reports_the_real_problem_of_a_laid_out_rhel6_with_plain_virtio_on_q35(tmp_path: Path) -> None:
    dumpxml = partial_domain(
        "r6",
        "http://redhat.com/rhel/6.10",
        "pc-q35-7.2",
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>"
        "<disk type='file' device='disk'><source file='/d.img'/><target dev='vda' bus='virtio'/>"
        "<address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></disk>"
        "<controller type='pci' index='0' model='pcie-root'/>"
        "<controller type='pci' index='1' model='pcie-root-port'><model name='pcie-root-port'/>"
        "<target chassis='1' port='0x10'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0' multifunction='on'/>"
        "</controller>",
    )
    path = tmp_path / "r6.xml"
    path.write_text(dumpxml)
    done = cli("check", str(path))
    assert done.returncode == 2, done.stderr.decode()
    assert b"rhel6.10" in done.stderr and b"disk" in done.stderr
    as_json = cli("check", str(path), "--format", "json")
    report = json.loads(as_json.stdout)
    assert report["status"] == "conflict" and report["conflicts"], report
    assert path.read_text() == dumpxml, "check never rewrites"


def test_check_without_os_metadata_checks_the_host_only_and_says_so() -> None:
    text = (FIDELITY / "no-features.xml").read_bytes()
    done = cli("check", "-", stdin=text)
    assert done.returncode == 0, done.stderr.decode()
    assert b"guest-driver checks were skipped" in done.stdout
    report = json.loads(cli("check", "-", "--format", "json", stdin=text).stdout)
    assert report["status"] == "fits" and report["checked"]["guest_drivers"] is False
    # solve of the same complete domain works too: it comes back unchanged
    solved = cli("solve", "-", "-q", stdin=text)
    assert solved.returncode == 0 and normalise(solved.stdout) == normalise(text)


def test_a_partial_domain_without_os_still_needs_one() -> None:
    done = cli("solve", "-", stdin=partial_domain("p", None, None, "").encode())
    assert done.returncode == 1 and b"no guest OS" in done.stderr


def test_an_auxiliary_device_the_guest_cannot_drive_is_kept_with_a_warning_never_added(host, osdb) -> None:
    rng = "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
    # RHEL 6 has no virtio-rng driver (neither osinfo-db nor the supplement lists one)
    explicit = run(partial_domain("a", "http://redhat.com/rhel/6.10", "pc", rng), host, osdb)
    assert explicit.solved, explicit.describe()
    warnings = explicit.built.warnings_for(explicit.result)
    assert any("virtio-rng" in w and "cannot use it" in w for w in warnings), warnings
    assert etree.fromstring(explicit.xml).find("devices/rng").get("model") == "virtio"
    absent = run(partial_domain("a", "http://redhat.com/rhel/6.10", "pc", ""), host, osdb)
    assert etree.fromstring(absent.xml).find("devices/rng") is None


def test_the_boot_disk_without_a_driver_stays_a_conflict(host, osdb) -> None:
    disk = "<disk type='file' device='disk'><source file='/d.img'/><target dev='vda' bus='virtio'/></disk>"
    out = run(partial_domain("w", "http://microsoft.com/win/10", "q35", disk), host, osdb)
    assert not out.solved


def test_qxl_on_a_modern_linux_is_fine_from_the_supplement(host, osdb) -> None:
    video = "<video><model type='qxl'/></video>"
    out = run(partial_domain("q", "http://ubuntu.com/ubuntu/22.04", "q35", video), host, osdb)
    assert out.solved, out.describe()
    assert not out.built.warnings_for(out.result)
    assert "osinfo-supplement.toml" in out.built.guest.source


def test_domain_source_is_kept_by_check_on_stdin_and_file_alike(tmp_path: Path) -> None:
    path = tmp_path / "nf.xml"
    path.write_bytes((FIDELITY / "no-features.xml").read_bytes())
    domain = Domain.from_file(path)
    assert completeness(domain.root, domain.source).complete
