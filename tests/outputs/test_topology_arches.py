"""The PCI topology the engine lays out on aarch64/riscv64 virt (a PCIe root complex, like q35 but with no
chipset slot on bus 0) and on pSeries (PHB slots, then bridges): the same capacity checks and
explanations as on q35, and addresses libvirt's schema accepts. Hosts: the real KVM capabilities of
tests/data/hosts/peer-samples (a virt-8.2 aarch64 host and a pseries-8.2 ppc64le host)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lxml import etree

from virtpolicy import Engine

PEERS = Path(__file__).resolve().parents[1] / "data" / "hosts" / "peer-samples"
BUNDLES = {"aarch64": ("kvm-aarch64", "virt"), "ppc64le": ("kvm-ppc64le", "pseries")}


def _bundle(tmp: Path, arch: str) -> Path:
    stem, machine = BUNDLES[arch]
    if not (PEERS / f"{stem}.xml").is_file():
        pytest.fail(f"{PEERS / f'{stem}.xml'} missing (the shared peer samples)", pytrace=False)
    bundle = tmp / arch
    bundle.mkdir()
    shutil.copy(PEERS / f"{stem}.xml", bundle / "capabilities.xml")
    shutil.copy(PEERS / f"{stem}-domcaps.xml", bundle / f"domcaps-{arch}-{machine}-kvm.xml")
    return bundle


def _domain(arch: str, nics: int, model: str = "virtio") -> str:
    devices = f"<interface type='user'><model type='{model}'/></interface>" * nics
    return (
        f"<domain type='kvm'><name>t</name><memory unit='MiB'>1024</memory><vcpu>2</vcpu>"
        f"<os><type arch='{arch}'>hvm</type></os><devices>{devices}</devices></domain>"
    )


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Engine]:
    tmp = tmp_path_factory.mktemp("peers")
    return {arch: Engine(host=_bundle(tmp, arch)) for arch in BUNDLES}


def _laid_out(result, schema: etree.RelaxNG) -> etree._Element:
    """A solved domain libvirt's schema accepts, with no PCI address used twice."""
    assert result.feasible, result.conflicts
    root = etree.fromstring(result.xml_bytes)
    assert schema.validate(root), schema.error_log.last_error
    seen = [
        tuple(int(a.get(k), 16) for k in ("bus", "slot", "function")) for a in root.iterfind(".//address[@type='pci']")
    ]
    assert len(seen) == len(set(seen))
    return root


def test_virt_devices_sit_on_root_ports_from_slot_1(engines, domain_schema) -> None:
    root = _laid_out(engines["aarch64"].solve(_domain("aarch64", 3), os="rhel9.0"), domain_schema)
    ports = root.findall("devices/controller[@model='pcie-root-port']")
    assert ports and min(int(p.find("address").get("slot"), 16) for p in ports) == 1
    for nic in root.iterfind("devices/interface"):
        assert nic.find("address").get("bus") != "0x00"  # a PCIe endpoint on its root port


def test_virt_root_port_capacity_is_a_conflict_with_its_count(engines) -> None:
    """e1000e is a PCIe endpoint only (CPF): 250 of them need 250 root ports, and virt has 31 slots of 8."""
    fits = engines["aarch64"].solve(_domain("aarch64", 240, "e1000e"), os="rhel9.0")
    assert fits.feasible, fits.conflicts
    result = engines["aarch64"].solve(_domain("aarch64", 250, "e1000e"), os="rhel9.0")
    assert not result.feasible
    assert all(m.id.startswith("app:/domain/devices/interface") for c in result.conflicts for m in c.members)
    given = next(b for b in result.background if b.id == "structural:pcie-root-port-capacity")
    assert "room for 248" in given.message


def test_pseries_fills_the_phb_then_adds_a_bridge(engines, domain_schema) -> None:
    root = _laid_out(engines["ppc64le"].solve(_domain("ppc64le", 40), os="rhel9.0"), domain_schema)
    assert root.find("devices/controller[@model='pci-bridge']") is not None
    assert not root.findall("devices/controller[@model='pcie-root-port']")  # a PHB takes no root port
