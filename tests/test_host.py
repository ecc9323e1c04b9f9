"""Host bundles: the embedded x86_64 KVM host, single domcaps files, and broken bundles."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from virtpolicy.errors import InputError
from virtpolicy.inputs.host import EMBEDDED_BUNDLE, Host, embedded_host, load_host_bundle

PEER_SAMPLES = Path(__file__).resolve().parent / "data" / "hosts" / "peer-samples"  # a copy of ../shared
AARCH64_DOMCAPS = PEER_SAMPLES / "kvm-aarch64-domcaps.xml"


@pytest.fixture(scope="module")
def host() -> Host:
    return embedded_host()


def test_embedded_arch_and_virt_types(host: Host) -> None:
    assert host.arch == "x86_64"
    assert sorted(host.virt_types("x86_64")) == ["kvm", "qemu"]
    assert host.virt_types("aarch64") == []
    assert Path(host.source) == EMBEDDED_BUNDLE
    assert host.name == "x86_64-kvm-qemu7.2"


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_embedded_families_and_canonical_names(host: Host, virt_type: str) -> None:
    assert sorted(host.families("x86_64", virt_type)) == ["pc", "q35"]
    assert host.canonical("x86_64", virt_type, "q35") == "pc-q35-7.2"
    assert host.canonical("x86_64", virt_type, "pc") == "pc-i440fx-7.2"
    assert host.default_machine("x86_64", virt_type, "q35") == "pc-q35-7.2"
    assert host.default_machine("x86_64", virt_type, "pc") == "pc-i440fx-7.2"
    assert host.canonical("x86_64", virt_type, "no-such-machine") is None
    assert host.domcaps_for("x86_64", virt_type, "virt") is None


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_ide_bus_only_on_pc(host: Host, virt_type: str) -> None:
    q35 = host.domcaps_for("x86_64", virt_type, "q35")
    pc = host.domcaps_for("x86_64", virt_type, "pc")
    assert q35 is not None and pc is not None
    assert q35.machine == "pc-q35-7.2" and pc.machine == "pc-i440fx-7.2"
    assert q35.virt_type == virt_type and pc.virt_type == virt_type
    q35_bus = q35.enum("devices/disk/bus")
    pc_bus = pc.enum("devices/disk/bus")
    assert q35_bus is not None and pc_bus is not None
    assert "ide" not in q35_bus and "sata" in q35_bus
    assert "ide" in pc_bus and "sata" in pc_bus
    assert q35.enum("devices/no-such-element/x") is None  # unknown, not empty


@pytest.mark.parametrize("virt_type", ["kvm", "qemu"])
def test_secure_loader_only_on_q35(host: Host, virt_type: str) -> None:
    q35 = host.domcaps_for("x86_64", virt_type, "q35")
    pc = host.domcaps_for("x86_64", virt_type, "pc")
    assert q35 is not None and pc is not None
    assert any("secboot" in loader for loader in q35.loaders)
    assert pc.loaders and not any("secboot" in loader for loader in pc.loaders)


def test_host_passthrough_only_with_kvm(host: Host) -> None:
    kvm = host.domcaps_for("x86_64", "kvm", "q35")
    tcg = host.domcaps_for("x86_64", "qemu", "q35")
    assert kvm is not None and tcg is not None
    assert "host-passthrough" in kvm.cpu_modes
    assert "host-passthrough" not in tcg.cpu_modes
    assert "host-model" in tcg.cpu_modes


def test_hyperv_features_exactly_spinlocks_and_vendor_id(host: Host) -> None:
    for caps in host.domcaps:
        assert sorted(caps.hyperv_features) == ["spinlocks", "vendor_id"], caps.source


def test_single_domcaps_file_aarch64() -> None:
    host = load_host_bundle(AARCH64_DOMCAPS)
    assert host.arch == "aarch64"
    assert host.virt_types("aarch64") == ["kvm"]
    assert host.families("aarch64", "kvm") == ["virt"]
    assert host.virt_types("x86_64") == []
    (caps,) = host.domcaps
    assert caps.arch == "aarch64"
    assert host.default_machine("aarch64", "kvm", "virt") == caps.machine


def test_single_embedded_domcaps_file(tmp_path: Path) -> None:
    """A lone domcaps file is a host of one machine; no capabilities.xml needed."""
    host = load_host_bundle(EMBEDDED_BUNDLE / "domcaps-x86_64-pc-kvm.xml")
    assert host.arch == "x86_64"
    assert host.virt_types("x86_64") == ["kvm"]
    assert host.families("x86_64", "kvm") == ["pc"]


def test_missing_bundle_path_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    with pytest.raises(InputError) as info:
        load_host_bundle(missing)
    assert str(info.value).startswith(str(missing)), str(info.value)


def test_bundle_without_capabilities_named(tmp_path: Path) -> None:
    shutil.copy(EMBEDDED_BUNDLE / "domcaps-x86_64-q35-kvm.xml", tmp_path)
    with pytest.raises(InputError, match="capabilities.xml") as info:
        load_host_bundle(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bundle_without_domcaps_named(tmp_path: Path) -> None:
    shutil.copy(EMBEDDED_BUNDLE / "capabilities.xml", tmp_path)
    with pytest.raises(InputError, match="no domcapabilities") as info:
        load_host_bundle(tmp_path)
    assert str(tmp_path) in str(info.value)


def _copy_bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(EMBEDDED_BUNDLE, bundle)
    return bundle


def test_corrupt_capabilities_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    (bundle / "capabilities.xml").write_text("<capabilities><host>")
    with pytest.raises(InputError) as info:
        load_host_bundle(bundle)
    assert str(info.value).startswith(f"{bundle / 'capabilities.xml'}:1:"), str(info.value)


def test_corrupt_domcaps_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    (bundle / "domcaps-x86_64-pc-kvm.xml").write_text("<domainCapabilities>\n<path>")
    with pytest.raises(InputError) as info:
        load_host_bundle(bundle)
    assert str(bundle / "domcaps-x86_64-pc-kvm.xml") in str(info.value)


def test_wrong_root_single_file_named() -> None:
    caps = EMBEDDED_BUNDLE / "capabilities.xml"
    with pytest.raises(InputError, match="expected <domainCapabilities>") as info:
        load_host_bundle(caps)
    assert str(caps) in str(info.value)


def test_wrong_root_in_bundle_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    (bundle / "capabilities.xml").write_text("<domainCapabilities/>")
    with pytest.raises(InputError, match="expected <capabilities>") as info:
        load_host_bundle(bundle)
    assert str(bundle / "capabilities.xml") in str(info.value)


def test_non_numeric_vcpu_max_named(tmp_path: Path) -> None:
    bad = tmp_path / "domcaps.xml"
    text = (EMBEDDED_BUNDLE / "domcaps-x86_64-q35-kvm.xml").read_text()
    bad.write_text(
        text.replace("<vcpu max='288'/>", "<vcpu max='lots'/>").replace('<vcpu max="288"/>', '<vcpu max="lots"/>')
    )
    assert "lots" in bad.read_text()
    with pytest.raises(InputError, match=str(bad)):
        load_host_bundle(bad)


def test_non_numeric_max_cpus_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    caps = bundle / "capabilities.xml"
    text = caps.read_text()
    assert "maxCpus=" in text
    caps.write_text(text.replace("maxCpus='", "maxCpus='x").replace('maxCpus="', 'maxCpus="x'))
    with pytest.raises(InputError, match="capabilities.xml"):
        load_host_bundle(bundle)
