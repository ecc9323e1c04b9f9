"""Guest OS driver support from the real osinfo-db.

An OS's devices are the union along its `derives-from` / `clones` chain (libosinfo's
`get_all_devices`), where the nearest OS wins: a `supported="false"` entry hides an inherited one.
Looking one OS up must not parse ~900 files every run, so an id -> file index is built once and cached
on disk, keyed on the database's identity (VERSION, file count, newest directory mtime).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtpolicy.errors import InputError, UnknownOSError
from virtpolicy.inputs.xmlsafe import parse_file, read_file

DEFAULT_OSINFO_DB = Path("/usr/share/osinfo")
WINDOWS_FAMILIES = frozenset({"winnt", "win9x", "win16"})


@dataclass(frozen=True)
class GuestOS:
    """What one guest OS can drive, resolved along its inheritance chain."""

    id: str
    short_id: str
    name: str
    family: str
    version: str
    device_ids: frozenset[str]
    firmware: tuple[tuple[str, str, bool], ...] = ()  # (arch, type, supported), nearest first
    source: str = ""  # the osinfo file that defined this OS
    chain: tuple[str, ...] = field(default=())  # ids of the OSes it inherits from, nearest first

    @property
    def is_windows(self) -> bool:
        return self.family in WINDOWS_FAMILIES

    def supports(self, device_id: str) -> bool:
        return device_id in self.device_ids

    def supports_any(self, device_ids: tuple[str, ...] | list[str]) -> bool:
        return any(d in self.device_ids for d in device_ids)

    def firmware_supported(self, arch: str, fw_type: str) -> bool | None:
        """True / False when osinfo says so for this arch (or 'all'), None when it says nothing."""
        for f_arch, f_type, supported in self.firmware:
            if f_type == fw_type and f_arch in (arch, "all"):
                return supported
        return None

    @property
    def label(self) -> str:
        return f"{self.short_id} ({self.id})" if self.described else "no guest OS named"

    @property
    def described(self) -> bool:
        """False for UNKNOWN_OS: the app named no OS, so there is nothing to check drivers against."""
        return self.id != UNKNOWN_OS_ID


GENERIC_OS = GuestOS(
    id="generic",
    short_id="generic",
    name="Generic OS (no osinfo data)",
    family="generic",
    version="",
    device_ids=frozenset(),
    source="built-in: an OS osinfo does not describe",
)


UNKNOWN_OS_ID = "unknown"
UNKNOWN_OS = GuestOS(
    id=UNKNOWN_OS_ID,
    short_id="unknown",
    name="No guest OS named (guest-driver checks skipped)",
    family="unknown",
    version="",
    device_ids=frozenset(),
    source="built-in: the domain names no OS",
)


@dataclass(frozen=True)
class _Raw:
    id: str
    short_ids: tuple[str, ...]
    name: str
    family: str
    version: str
    parents: tuple[str, ...]
    devices: tuple[tuple[str, bool], ...]
    firmware: tuple[tuple[str, str, bool], ...]
    source: str


def _text(el: etree._Element, tag: str) -> str:
    for child in el.findall(tag):
        if child.get("{http://www.w3.org/XML/1998/namespace}lang") is None:
            return (child.text or "").strip()
    return ""


def _read_os_file(path: Path) -> list[_Raw]:
    root = parse_file(path).getroot()
    result = []
    for os_el in root.findall("os"):
        devices = tuple(
            (d.get("id", ""), d.get("supported", "true") != "false") for d in os_el.findall("devices/device")
        )
        firmware = tuple(
            (f.get("arch", "all"), f.get("type", ""), f.get("supported", "true") != "false")
            for f in os_el.findall("firmware")
        )
        parents = tuple(p.get("id", "") for p in os_el.findall("derives-from")) + tuple(
            p.get("id", "") for p in os_el.findall("clones")
        )
        result.append(
            _Raw(
                id=os_el.get("id", ""),
                short_ids=tuple((s.text or "").strip() for s in os_el.findall("short-id")),
                name=_text(os_el, "name"),
                family=_text(os_el, "family"),
                version=_text(os_el, "version"),
                parents=parents,
                devices=devices,
                firmware=firmware,
                source=str(path),
            )
        )
    return result


class OsinfoDB:
    """Lookup of guest OSes by URI or short id, with a cached id -> file index."""

    def __init__(self, path: Path = DEFAULT_OSINFO_DB, cache_dir: Path | None = None) -> None:
        self.path = path
        os_dir = path / "os"
        if not os_dir.is_dir():
            raise InputError(f"{path}: not an osinfo database (no os/ directory); install Debian osinfo-db")
        self._os_dir = os_dir
        self._cache_dir = cache_dir if cache_dir is not None else _default_cache_dir()
        self._index: dict[str, str] = {}  # id or short-id -> file
        self._raw: dict[str, _Raw] = {}
        self._resolved: dict[str, GuestOS] = {}
        self._device_names: dict[str, str] | None = None
        self._load_index()

    @property
    def cache_dir(self) -> Path:
        return self._cache_dir

    def _signature(self) -> str:
        version_file = self.path / "VERSION"
        version = read_file(version_file).decode(errors="replace").strip() if version_file.exists() else ""
        count = 0
        newest = 0.0
        for vendor in os.scandir(self._os_dir):
            if vendor.is_dir():
                newest = max(newest, vendor.stat().st_mtime)
                count += sum(1 for e in os.scandir(vendor.path) if e.name.endswith(".xml"))
        return f"{version}:{count}:{newest}"

    def _cache_file(self) -> Path:
        digest = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        return self._cache_dir / f"osinfo-index-{digest}.json"

    def _load_index(self) -> None:
        signature = self._signature()
        cache = self._cache_file()
        cached = self._cached_index(cache, signature)
        if cached is not None:
            self._index = cached
            return
        index: dict[str, str] = {}
        for file in sorted(self._os_dir.glob("*/*.xml")):
            for raw in _read_os_file(file):
                self._raw[raw.id] = raw
                index[raw.id] = str(file)
                for short in raw.short_ids:
                    index.setdefault(short, str(file))
        self._index = index
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"signature": signature, "index": index}, sort_keys=True))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only cache only costs speed

    def _cached_index(self, cache: Path, signature: str) -> dict[str, str] | None:
        """The cached index when it is intact and current; None (rebuild) for anything else.

        The cache is a file anyone with the same $XDG_CACHE_HOME may have broken (truncated, edited, a
        list instead of an object): a bad cache costs one rebuild, never an error, and may only name OS
        files inside this database.
        """
        try:
            data = json.loads(read_file(cache))
        except (InputError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("signature") != signature:
            return None
        index = data.get("index")
        prefix = str(self._os_dir) + os.sep
        if not isinstance(index, dict) or not index:
            return None
        if not all(isinstance(k, str) and isinstance(v, str) and v.startswith(prefix) for k, v in index.items()):
            return None
        return index

    def _raw_for(self, key: str) -> _Raw | None:
        file = self._index.get(key)
        if file is None:
            return None
        raws = _read_os_file(Path(file))
        for raw in raws:
            self._raw[raw.id] = raw
        for raw in raws:
            if raw.id == key or key in raw.short_ids:
                return raw
        return None

    def device_names(self) -> dict[str, str]:
        """osinfo device names ('virtio1.0-net') -> ids, so conditions can say os.supports("virtio1.0-net")."""
        if self._device_names is None:
            names: dict[str, str] = {}
            for file in sorted((self.path / "device").rglob("*.xml")):
                root = parse_file(file).getroot()
                for dev in root.findall("device"):
                    name = _text(dev, "name")
                    if name and dev.get("id"):
                        names.setdefault(name, dev.get("id", ""))
            self._device_names = names
        return self._device_names

    def os_ids(self) -> list[str]:
        """Every OS URI the database lists, sorted (what-if and planning iterate over them)."""
        return sorted(k for k in self._index if "://" in k)

    def lookup(self, key: str) -> GuestOS:
        """Resolve an OS by URI or short id; InputError with suggestions when unknown."""
        if key == "generic":
            return GENERIC_OS
        if key in self._resolved:
            return self._resolved[key]
        raw = self._raw.get(key) or self._raw_for(key)
        if raw is None:
            close = difflib.get_close_matches(key, [k for k in self._index if "://" not in k], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownOSError(f"unknown guest OS '{key}' in osinfo-db at {self.path}{hint}")
        guest = self._resolve(raw, ())
        self._resolved[key] = guest
        return guest

    def _resolve(self, raw: _Raw, seen: tuple[str, ...]) -> GuestOS:
        devices: dict[str, bool] = {}
        firmware: list[tuple[str, str, bool]] = list(raw.firmware)
        chain: list[str] = []
        for parent_id in raw.parents:
            if parent_id in seen or parent_id == raw.id:
                continue
            parent_raw = self._raw.get(parent_id) or self._raw_for(parent_id)
            if parent_raw is None:
                continue
            parent = self._resolve(parent_raw, seen + (raw.id,))
            chain.append(parent.id)
            chain.extend(c for c in parent.chain if c not in chain)
            for dev in parent.device_ids:
                devices.setdefault(dev, True)
            firmware.extend(f for f in parent.firmware if (f[0], f[1]) not in {(a, t) for a, t, _ in firmware})
        for dev_id, supported in raw.devices:
            devices[dev_id] = supported
        return GuestOS(
            id=raw.id,
            short_id=raw.short_ids[0] if raw.short_ids else raw.id,
            name=raw.name,
            family=raw.family,
            version=raw.version,
            device_ids=frozenset(d for d, ok in devices.items() if ok),
            firmware=tuple(firmware),
            source=raw.source,
            chain=tuple(chain),
        )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "virtpolicy"
