"""Host-kernel-dependent features (KubeVirt issue 16386): virtio-net USO exists on Linux >= 6.2 hosts and not
on EL9 hosts, and QEMU >= 8.2 machine types turn it on, so a guest started on one cannot move to the other.
`plan common` pins such a feature off unless every chosen host has it (through the machine type, since
libvirt 9.0's schema has no attribute for it) and says when it cannot; `plan migrate` refuses a destination
that lacks a feature the source offers. The data table's claims about libvirt's schema are checked
against the real RelaxNG schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lxml import etree
from support import cli, plan_migrate_json

from virtpolicy.inputs.hostmeta import read_host_meta
from virtpolicy.knowledge.kernel_features import kernel_features, kernel_version
from virtpolicy.plan.fleet import load_fleet

PEER = Path(__file__).resolve().parent / "data" / "hosts" / "peer-samples"  # a copy of ../shared
LATEST = PEER / "kvm-x86_64-domcaps-latest.xml"  # a real QEMU 9.0 host: pc-q35-9.0, Skylake-Client-IBRS
# The q35 versions QEMU 9.0 provides (hw/i386/pc_q35.c DEFINE_Q35_MACHINE, 2.4 to 9.0), for a capabilities
# document next to the real 9.0 domcapabilities: the peer sample is a domcapabilities file alone.
MINORS = {2: range(4, 13), 3: (0, 1), 4: (0, 1, 2), 5: (0, 1, 2), 6: (0, 1, 2), 7: (0, 1, 2), 8: (0, 1, 2), 9: (0,)}
Q35_VERSIONS = [f"{major}.{minor}" for major, minors in MINORS.items() for minor in minors]
TEMPLATE = """<domain type='kvm'>
  <name>vp-kernel</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
    <libosinfo:os id="http://fedoraproject.org/fedora/37"/></libosinfo:libosinfo></metadata>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/images/k.qcow2'/></disk>
    <interface type='network'><source network='default'/>{driver}</interface>
  </devices>
</domain>
"""


def _require_peer() -> None:
    """The sample is part of the repository (tests/data/hosts/peer-samples): missing is a broken checkout."""
    assert LATEST.is_file(), f"{LATEST} missing"


def qemu90_bundle(target: Path, kernel: str = "", declared: str = "", machines: list[str] | None = None) -> Path:
    """A QEMU 9.0 host: the real 9.0 domcapabilities, a capabilities document listing the q35 versions QEMU
    9.0 has (or `machines`), and a host.toml naming its kernel release (or declaring features)."""
    _require_peer()
    target.mkdir(parents=True)
    shutil.copyfile(LATEST, target / "domcaps-x86_64-q35-kvm.xml")
    versions = machines if machines is not None else Q35_VERSIONS
    rows = "\n".join(f"      <machine maxCpus='4096'>pc-q35-{v}</machine>" for v in versions)
    (target / "capabilities.xml").write_text(
        "<capabilities>\n  <host><cpu><arch>x86_64</arch></cpu></host>\n  <guest>\n    <os_type>hvm</os_type>\n"
        "    <arch name='x86_64'>\n      <wordsize>64</wordsize>\n"
        "      <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        f"{rows}\n      <machine canonical='pc-q35-{versions[-1]}' maxCpus='4096'>q35</machine>\n"
        "      <domain type='kvm'/>\n    </arch>\n  </guest>\n</capabilities>\n"
    )
    lines = ([f'kernel = "{kernel}"'] if kernel else []) + ([f"kernel_features = {{ {declared} }}"] if declared else [])
    if lines:
        (target / "host.toml").write_text("\n".join(lines) + "\n")
    return target


def _template(tmp_path: Path, driver: str = "") -> Path:
    path = tmp_path / "template.xml"
    path.write_text(TEMPLATE.format(driver=driver))
    return path


def _common(template: Path, fleet: Path) -> tuple[dict, str]:  # type: ignore[type-arg]
    proc = cli("plan", "common", str(template), "--fleet", str(fleet), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr.decode()


def _feature(report: dict, feature: str) -> dict:  # type: ignore[type-arg]
    return next(k for k in report["kernel_features"] if k["id"] == feature)


def test_uso_is_pinned_off_by_machine_8_1_when_an_el9_host_lacks_it(tmp_path: Path, domain_schema) -> None:  # type: ignore[no-untyped-def]
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "ubuntu-24.04", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "el9", kernel="5.14.0-503.el9.x86_64")
    report, stderr = _common(_template(tmp_path), fleet)
    uso = _feature(report, "virtio-net-uso")
    assert uso["status"] == "pinned-off", uso
    assert uso["pinned_by"] == "machine pc-q35-8.1", uso
    assert uso["interfaces"] == ["interface[0] (network, virtio)"], uso
    assert "el9 (kernel 5.14.0-503.el9.x86_64)" in uso["message"], uso
    assert report["machine"] == "pc-q35-8.1", "the newest machine whose compat turns USO off"
    assert "kernel feature virtio-net-uso: pinned off" in stderr, stderr
    tree = etree.ElementTree(etree.fromstring(report["xml"].encode()))
    assert domain_schema.validate(tree), domain_schema.error_log
    for bundle in sorted(fleet.iterdir()):  # the result as it stands, on each host
        again = cli("solve", "-q", "--host", str(bundle), "-", stdin=report["xml"].encode())
        assert again.returncode == 0, (bundle.name, again.stderr)
        assert again.stdout.decode() == report["xml"], f"{bundle.name} changed the common domain"


def test_uso_stays_on_when_every_host_has_it(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "a", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "b", kernel="6.2.0")
    report, stderr = _common(_template(tmp_path), fleet)
    assert _feature(report, "virtio-net-uso")["status"] == "all-have", report["kernel_features"]
    assert report["machine"] == "pc-q35-9.0", "nothing to pin: the newest common machine"
    assert "kernel feature" not in stderr, stderr


def test_a_declared_backport_counts_and_makes_one_class(tmp_path: Path) -> None:
    """An EL9 kernel with the tap USO backport, declared: the same class as a 6.8 host."""
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "new", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "el9-backport", kernel="5.14.0-570.el9.x86_64", declared="virtio-net-uso = true")
    assert len(load_fleet(fleet).classes) == 1
    report, _ = _common(_template(tmp_path), fleet)
    assert _feature(report, "virtio-net-uso")["status"] == "all-have"
    assert report["machine"] == "pc-q35-9.0"


def test_an_unknown_kernel_is_taken_to_lack_uso(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "known", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "unknown")
    report, _ = _common(_template(tmp_path), fleet)
    uso = _feature(report, "virtio-net-uso")
    assert uso["status"] == "pinned-off" and "unknown (kernel unknown)" in uso["message"], uso


def test_uso_that_cannot_be_pinned_is_reported_and_no_xml_is_invented(tmp_path: Path, domain_schema) -> None:  # type: ignore[no-untyped-def]
    """Hosts that share no machine version up to 8.1 (the real 9.0 domcapabilities file alone, in an inventory
    that names each host's kernel): USO stays on, and the plan says it cannot turn it off."""
    _require_peer()
    shutil.copyfile(LATEST, tmp_path / "latest.xml")
    inventory = tmp_path / "fleet.toml"
    inventory.write_text(
        '[[host]]\nname = "ubuntu"\nbundle = "latest.xml"\nkernel = "6.8.0-45-generic"\n\n'
        '[[host]]\nname = "el9"\nbundle = "latest.xml"\nkernel = "5.14.0-503.el9.x86_64"\n'
    )
    assert len(load_fleet(inventory).classes) == 2, "the kernels differ in USO: two classes"
    report, stderr = _common(_template(tmp_path), inventory)
    uso = _feature(report, "virtio-net-uso")
    assert uso["status"] == "unpinnable" and uso["pinned_by"] is None, uso
    assert "no machine version up to 8.1" in uso["message"] and "libvirt 9.0 has no attribute" in uso["message"]
    assert "kernel feature virtio-net-uso: NOT pinned off" in stderr, stderr
    assert report["machine"] == "pc-q35-9.0"
    assert "uso" not in report["xml"].lower(), "no XML libvirt 9.0 would refuse"
    assert domain_schema.validate(etree.ElementTree(etree.fromstring(report["xml"].encode())))


def test_a_host_declaring_no_ufo_is_reported_whatever_the_xml_says(tmp_path: Path) -> None:
    """QEMU saves the source tap's UFO support and the destination checks it against its own tap, whatever
    host_ufo/guest_ufo say, so no domain XML makes the move safe: the plan says so, even for a template that
    turns UFO off."""
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "a", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "old-tap", kernel="6.8.0-45-generic", declared="virtio-net-ufo = false")
    report, stderr = _common(_template(tmp_path, "<driver><host ufo='off'/><guest ufo='off'/></driver>"), fleet)
    ufo = _feature(report, "virtio-net-ufo")
    assert ufo["status"] == "unpinnable", ufo
    assert "old-tap (declared false)" in ufo["message"] and "has_ufo" in ufo["message"], ufo
    assert "kernel feature virtio-net-ufo: NOT pinned off" in stderr


def test_user_networking_uses_no_tap_feature(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "a", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "el9", kernel="5.14.0-503.el9.x86_64")
    template = tmp_path / "user.xml"
    user = TEMPLATE.format(driver="").replace("type='network'><source network='default'/>", "type='user'>")
    template.write_text(user)
    report, _ = _common(template, fleet)
    assert _feature(report, "virtio-net-uso")["status"] == "not-used"
    assert report["machine"] == "pc-q35-9.0", "no tap, nothing to pin"


def _laid_out(host: Path, tmp_path: Path) -> bytes:
    proc = cli("solve", "-q", "--host", str(host), str(_template(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_migrate_refuses_an_el9_destination_for_a_uso_guest(tmp_path: Path) -> None:
    new = qemu90_bundle(tmp_path / "new", kernel="6.8.0-45-generic")
    el9 = qemu90_bundle(tmp_path / "el9", kernel="5.14.0-503.el9.x86_64")
    domain = _laid_out(new, tmp_path)
    assert b"pc-q35-9.0" in domain
    (dest,) = plan_migrate_json(domain, "--from", str(new), "--to", str(el9))["destinations"]
    assert not dest["can_migrate"], dest
    (reason,) = [r["message"] for r in dest["reasons"] if r["check"] == "kernel"]
    assert reason.startswith("virtio-net-uso:") and "kernel 5.14.0-503.el9.x86_64" in reason, reason
    back = plan_migrate_json(_laid_out(el9, tmp_path), "--from", str(el9), "--to", str(new))["destinations"][0]
    assert back["can_migrate"], "the source lacks USO: it never offered it"


def test_migrate_warns_when_the_destination_kernel_is_unknown(tmp_path: Path) -> None:
    new = qemu90_bundle(tmp_path / "new", kernel="6.8.0-45-generic")
    unknown = qemu90_bundle(tmp_path / "unknown")
    (dest,) = plan_migrate_json(_laid_out(new, tmp_path), "--from", str(new), "--to", str(unknown))["destinations"]
    assert dest["can_migrate"], dest
    assert any(w["check"] == "kernel" and w["message"].startswith("virtio-net-uso:") for w in dest["warnings"]), dest


def test_migrate_with_machine_8_1_has_no_uso_to_lose(tmp_path: Path) -> None:
    new = qemu90_bundle(tmp_path / "new", kernel="6.8.0-45-generic")
    el9 = qemu90_bundle(tmp_path / "el9", kernel="5.14.0-503.el9.x86_64")
    domain = _laid_out(new, tmp_path).replace(b"pc-q35-9.0", b"pc-q35-8.1")
    (dest,) = plan_migrate_json(domain, "--from", str(new), "--to", str(el9))["destinations"]
    assert dest["can_migrate"] and not dest["warnings"], dest


def test_the_table_cites_every_row_and_its_libvirt_xml_claims_hold(domain_schema) -> None:  # type: ignore[no-untyped-def]
    """Each row has one citation, a way to detect it and a libvirt verdict; where the row says libvirt 9.0 has
    no attribute for its properties, the real schema refuses them, and where it gives XML, the schema
    accepts it."""

    def valid(driver: str) -> bool:
        xml = (
            "<domain type='kvm'><name>v</name><memory>1024</memory><os><type>hvm</type></os><devices>"
            f"<interface type='network'><source network='default'/><model type='virtio'/>{driver}</interface>"
            "</devices></domain>"
        )
        return bool(domain_schema.validate(etree.ElementTree(etree.fromstring(xml))))

    assert valid("") and valid("<driver><host tso4='off'/><guest csum='off'/></driver>"), "the probe itself"
    rows = kernel_features()
    assert {r.id for r in rows} == {"virtio-net-uso", "virtio-net-udp-tunnel-gso", "virtio-net-ufo"}
    for row in rows:
        assert row.citation and row.detect and row.libvirt, row.id
        if row.libvirt_xml:
            assert valid(row.libvirt_xml), row.id
            continue
        assert row.pin == "machine" and row.off_up_to_machine, row.id
        names = row.qemu_properties + tuple(p.split("_", 1)[1] for p in row.qemu_properties)
        for attr in names:
            for side in ("host", "guest"):
                probe = f"<driver><{side} {attr}='off'/></driver>"
                assert not valid(probe), f"{row.id}: libvirt 9.0's schema accepts {probe}"


def test_kernel_releases_and_declarations() -> None:
    uso = next(f for f in kernel_features() if f.id == "virtio-net-uso")
    assert kernel_version("5.14.0-427.13.1.el9_4.x86_64") == (5, 14, 0)
    assert kernel_version("6.2") == (6, 2)
    assert uso.status("6.2.0-39-generic", {}) == "has"
    assert uso.status("6.1.0-18-amd64", {}) == "lacks"
    assert uso.status("", {}) == "unknown"
    assert uso.status("5.14.0", {"virtio-net-uso": True}) == "has", "a declaration wins over the release"
    assert uso.offered_by("pc-q35-8.2") and not uso.offered_by("pc-q35-8.1")
    assert uso.offered_by("pc-q35-rhel9.6.0") is None, "downstream machines follow their vendor's compat"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kernel_features = { virtio-net-tso = true }\n", "kernel_features.virtio-net-tso: unknown feature"),
        ('kernel_features = { virtio-net-uso = "yes" }\n', "kernel_features.virtio-net-uso must be true or false"),
        ("kernel = 6\n", "'kernel' must be a one-line string"),
        ('colour = "blue"\n', "unknown key(s) colour"),
        ("kernel = \n", "not a TOML host description"),
    ],
)
def test_a_bad_host_toml_is_one_line_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    bundle = qemu90_bundle(tmp_path / "h")
    (bundle / "host.toml").write_text(text)
    proc = cli("plan", "common", str(_template(tmp_path)), "--fleet", str(tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and str(bundle / "host.toml") in lines[0] and message in lines[0], lines
    with pytest.raises(Exception, match="host.toml"):
        read_host_meta(bundle)


def test_a_bad_inventory_kernel_entry_names_the_entry(tmp_path: Path) -> None:
    _require_peer()
    shutil.copyfile(LATEST, tmp_path / "latest.xml")
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('[[host]]\nname = "h"\nbundle = "latest.xml"\nkernel_features = { uso = true }\n')
    proc = cli("plan", "hosts", str(_template(tmp_path)), "--fleet", str(inventory))
    assert proc.returncode == 1
    (line,) = proc.stderr.decode().strip().splitlines()
    assert f"{inventory}: [[host]] #1 (h): kernel_features.uso: unknown feature" in line, line


def test_min_hosts_leaves_out_the_el9_host_to_keep_uso(tmp_path: Path) -> None:
    """A kernel feature is capability like any other: with K = n-1 the optimiser leaves out the host that
    lacks it, says it would cost USO, and the plan keeps the newest machine."""
    fleet = tmp_path / "fleet"
    qemu90_bundle(fleet / "a", kernel="6.8.0-45-generic")
    qemu90_bundle(fleet / "b", kernel="6.8.0-47-generic")
    qemu90_bundle(fleet / "el9", kernel="5.14.0-503.el9.x86_64")
    proc = cli("plan", "common", str(_template(tmp_path)), "--fleet", str(fleet), "--min-hosts", "2",
               "--format", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (left,) = report["left_out"]
    assert left["hosts"] == "el9" and left["would_lose"] == ["kernel-feature=virtio-net-uso"], left
    assert report["machine"] == "pc-q35-9.0" and _feature(report, "virtio-net-uso")["status"] == "all-have"
