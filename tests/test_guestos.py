"""Guest OS lookup in the real osinfo-db: ids, inheritance, hidden devices, firmware, the index cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from virtpolicy.errors import InputError
from virtpolicy.inputs.guestos import OsinfoDB

E1000E = "http://pcisig.com/pci/8086/10d3"
Q35 = "http://qemu.org/chipset/x86/q35"
VIRTIO_NET_LEGACY = "http://pcisig.com/pci/1af4/1000"
VIRTIO_BLK_LEGACY = "http://pcisig.com/pci/1af4/1001"
VIRTIO_NET_MODERN = "http://pcisig.com/pci/1af4/1041"


@pytest.fixture(scope="module")
def db(osinfo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> OsinfoDB:
    return OsinfoDB(osinfo_db, cache_dir=tmp_path_factory.mktemp("osinfo-cache"))


def _declares(os_file: str, device: str) -> bool:
    return device in Path(os_file).read_text()


# ----------------------------------------------------------------- real database


@pytest.mark.parametrize(
    ("short", "uri"),
    [
        ("rhel6.10", "http://redhat.com/rhel/6.10"),
        ("win10", "http://microsoft.com/win/10"),
        ("ubuntu22.04", "http://ubuntu.com/ubuntu/22.04"),
    ],
)
def test_short_id_and_uri_give_same_os(db: OsinfoDB, short: str, uri: str) -> None:
    by_short = db.lookup(short)
    by_uri = db.lookup(uri)
    assert by_short == by_uri
    assert by_short.id == uri
    assert by_short.short_id == short
    assert by_short.device_ids  # a real OS drives something


def test_win10_inherits_e1000e_and_q35_from_win7(db: OsinfoDB) -> None:
    win10 = db.lookup("win10")
    # the facts really are inherited: win-10.xml does not list them itself
    assert not _declares(win10.source, E1000E) and not _declares(win10.source, Q35)
    assert win10.supports(E1000E)
    assert win10.supports(Q35)
    win7 = db.lookup("win7")
    assert win7.supports(E1000E) and win7.supports(Q35)
    assert win10.chain[:3] == ("http://microsoft.com/win/8.1", "http://microsoft.com/win/8", win7.id)
    assert win10.is_windows


def test_rhel6_10_inherits_legacy_virtio_from_rhel6_0(db: OsinfoDB) -> None:
    rhel610 = db.lookup("rhel6.10")
    assert "http://redhat.com/rhel/6.0" in rhel610.chain
    assert rhel610.chain[0] == "http://redhat.com/rhel/6.9"  # nearest first
    assert not _declares(rhel610.source, VIRTIO_NET_LEGACY)
    assert rhel610.supports(VIRTIO_NET_LEGACY) and rhel610.supports(VIRTIO_BLK_LEGACY)
    assert not rhel610.supports(VIRTIO_NET_MODERN)  # RHEL 6 has no virtio 1.0 drivers
    assert db.lookup("rhel6.0").supports(VIRTIO_NET_LEGACY)
    assert not rhel610.is_windows


def test_rhel5_lacks_q35(db: OsinfoDB) -> None:
    assert not db.lookup("rhel5.11").supports(Q35)
    assert db.lookup("rhel7.9").supports(Q35)


def test_win11_bios_unsupported_on_x86_64(db: OsinfoDB) -> None:
    win11 = db.lookup("win11")
    assert win11.firmware_supported("x86_64", "bios") is False
    assert win11.firmware_supported("x86_64", "efi") is True
    assert win11.firmware_supported("aarch64", "bios") is None  # osinfo says nothing about it
    assert db.lookup("win10").firmware_supported("x86_64", "bios") is None
    # devices still come from win10 along the chain
    assert win11.supports(E1000E)


def test_unknown_os_suggests_close_ids(db: OsinfoDB) -> None:
    with pytest.raises(InputError) as info:
        db.lookup("rhel6.99")
    message = str(info.value)
    assert "'rhel6.99'" in message
    assert "did you mean" in message and "rhel6.9" in message
    with pytest.raises(InputError, match="win10"):
        db.lookup("windows10")


def test_unknown_os_without_close_match(db: OsinfoDB) -> None:
    with pytest.raises(InputError, match="unknown guest OS 'zzzzqqqq'") as info:
        db.lookup("zzzzqqqq")
    assert "did you mean" not in str(info.value)


def test_generic_is_built_in(db: OsinfoDB) -> None:
    generic = db.lookup("generic")
    assert generic.device_ids == frozenset()
    assert generic.firmware_supported("x86_64", "bios") is None


def test_not_an_osinfo_db(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=str(tmp_path)):
        OsinfoDB(tmp_path, cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------- a tiny fake database


def _os(os_id: str, short: str, body: str) -> str:
    return (
        f'<os id="{os_id}"><short-id>{short}</short-id><name>{short}</name>'
        f"<family>fakeos</family><version>1</version>{body}</os>"
    )


def _write(path: Path, *oses: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n<libosinfo version="0.0.1">' + "".join(oses) + "</libosinfo>"
    )


@pytest.fixture
def fake_db(tmp_path: Path) -> Path:
    root = tmp_path / "osinfo"
    _write(
        root / "os" / "vendor" / "a.xml",
        _os(
            "http://vendor/a",
            "fakea",
            '<firmware arch="x86_64" type="efi"/><firmware arch="x86_64" type="bios"/>'
            '<devices><device id="dev:one"/><device id="dev:two"/></devices>',
        ),
    )
    _write(
        root / "os" / "vendor" / "b.xml",
        _os(
            "http://vendor/b",
            "fakeb",
            '<derives-from id="http://vendor/a"/>'
            '<firmware arch="x86_64" type="bios" supported="false"/>'
            '<devices><device id="dev:one" supported="false"/><device id="dev:three"/></devices>',
        ),
    )
    return root


def test_supported_false_hides_inherited_device(fake_db: Path, tmp_path: Path) -> None:
    db = OsinfoDB(fake_db, cache_dir=tmp_path / "cache")
    a = db.lookup("fakea")
    b = db.lookup("fakeb")
    assert a.device_ids == {"dev:one", "dev:two"}
    assert b.device_ids == {"dev:two", "dev:three"}  # dev:one hidden, dev:two inherited
    assert b.chain == ("http://vendor/a",)


def test_firmware_nearest_wins(fake_db: Path, tmp_path: Path) -> None:
    db = OsinfoDB(fake_db, cache_dir=tmp_path / "cache")
    assert db.lookup("fakea").firmware_supported("x86_64", "bios") is True
    b = db.lookup("fakeb")
    assert b.firmware_supported("x86_64", "bios") is False  # b's own entry beats a's
    assert b.firmware_supported("x86_64", "efi") is True  # inherited from a


def test_derives_from_cycle_terminates(tmp_path: Path) -> None:
    root = tmp_path / "osinfo"
    _write(
        root / "os" / "v" / "c.xml",
        _os("http://v/c", "fakec", '<derives-from id="http://v/d"/><devices><device id="dev:c"/></devices>'),
        _os("http://v/d", "faked", '<derives-from id="http://v/c"/><devices><device id="dev:d"/></devices>'),
    )
    db = OsinfoDB(root, cache_dir=tmp_path / "cache")
    assert db.lookup("fakec").device_ids == {"dev:c", "dev:d"}
    assert db.lookup("faked").device_ids == {"dev:c", "dev:d"}


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("osinfo-index-*.json"))


def test_index_cache_written_and_reused(fake_db: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    OsinfoDB(fake_db, cache_dir=cache)
    files = _cache_files(cache)
    assert len(files) == 1
    index = json.loads(files[0].read_text())["index"]
    assert index["fakeb"].endswith("b.xml") and index["http://vendor/a"].endswith("a.xml")
    before = files[0].stat().st_mtime_ns
    # Poison an OS file the index already knows, keeping the directory (and thus the signature) as it was:
    # a construction that re-parsed every file would now fail; one that reuses the index does not.
    vendor = fake_db / "os" / "vendor"
    dir_stat = vendor.stat()
    (vendor / "b.xml").write_text("<libosinfo><os")
    os.utime(vendor, ns=(dir_stat.st_atime_ns, dir_stat.st_mtime_ns))
    again = OsinfoDB(fake_db, cache_dir=cache)
    assert files[0].stat().st_mtime_ns == before, "the cache was rewritten"
    assert again.lookup("fakea").device_ids == {"dev:one", "dev:two"}


def test_index_cache_invalidated_by_new_os(fake_db: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    OsinfoDB(fake_db, cache_dir=cache)
    _write(fake_db / "os" / "vendor" / "c.xml", _os("http://vendor/c", "fakec", '<derives-from id="http://vendor/b"/>'))
    db = OsinfoDB(fake_db, cache_dir=cache)
    assert db.lookup("fakec").device_ids == {"dev:two", "dev:three"}
    assert "fakec" in json.loads(_cache_files(cache)[0].read_text())["index"]


def test_corrupt_cache_is_rebuilt(fake_db: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    OsinfoDB(fake_db, cache_dir=cache)
    (file,) = _cache_files(cache)
    file.write_text("{not json")
    db = OsinfoDB(fake_db, cache_dir=cache)
    assert db.lookup("fakeb").device_ids == {"dev:two", "dev:three"}
    assert json.loads(file.read_text())["index"]["fakea"].endswith("a.xml")


def test_real_db_cache_reused(osinfo_db: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    OsinfoDB(osinfo_db, cache_dir=cache)
    (file,) = _cache_files(cache)
    before = file.stat().st_mtime_ns
    db = OsinfoDB(osinfo_db, cache_dir=cache)
    assert file.stat().st_mtime_ns == before
    assert db.lookup("win10").supports(E1000E)
    assert db.lookup("http://redhat.com/rhel/6.10").supports(VIRTIO_NET_LEGACY)


def test_unwritable_cache_dir_still_works(fake_db: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")  # works even as root, unlike chmod
    db = OsinfoDB(fake_db, cache_dir=blocker / "cache")
    assert db.lookup("fakeb").device_ids == {"dev:two", "dev:three"}
    again = OsinfoDB(fake_db, cache_dir=blocker / "cache")
    assert again.lookup("http://vendor/a").short_id == "fakea"
    assert blocker.is_file()
