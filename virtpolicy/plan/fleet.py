"""A fleet: hosts, their labels and counts, grouped into host classes.

Hosts whose capabilities are identical answer every question identically, so planning works on
classes: a class is the fingerprint of a bundle's normalised capabilities, domcapabilities and nodedev
data. Normalising drops what differs between identical machines (the host UUID, whitespace, attribute
order, comments) and keeps everything the engine reads.

A fleet comes from a directory of host bundles (each subdirectory, or each domcapabilities file, is one
host) or from an inventory file:

    [[host]]
    name = "r1-h01"
    bundle = "bundles/qemu-7.2"      # relative to the inventory file; or connect = "qemu+ssh://h/system"
    labels = { rack = "r1", zone = "a" }
    count = 12                        # twelve identical hosts: r1-h01-1 ... r1-h01-12
    kernel = "5.14.0-503.el9.x86_64"  # uname -r on the host (over the bundle's host.toml)
    kernel_features = { virtio-net-uso = true }   # what the release does not show (a backport)

Hosts whose kernels differ in a host-kernel-dependent feature (knowledge/data/host-kernel-features.toml)
are different classes even when their libvirt XML is identical: the fingerprint covers the status of each
such feature, not the release.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtpolicy.errors import HostError, InputError
from virtpolicy.inputs.host import Host, apply_meta, load_host_bundle
from virtpolicy.inputs.hostmeta import HostMeta, parse_meta, read_host_meta
from virtpolicy.inputs.xmlsafe import parse_bytes, read_file

MAX_HOSTS = 1_000_000
HOST_KEYS = {"name", "bundle", "connect", "labels", "count", "kernel", "kernel_features"}
VOLATILE = ("host/uuid",)  # capabilities fields that differ between otherwise identical hosts


@dataclass(frozen=True)
class FleetHost:
    name: str
    host_class: str  # the fingerprint of its capabilities
    labels: tuple[tuple[str, str], ...] = ()
    source: str = ""  # bundle path or URI

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "class": self.host_class, "labels": dict(self.labels), "source": self.source}


@dataclass
class Fleet:
    hosts: list[FleetHost] = field(default_factory=list)
    classes: dict[str, Host] = field(default_factory=dict)  # fingerprint -> the loaded host (one per class)

    def members(self, host_class: str) -> list[FleetHost]:
        return [h for h in self.hosts if h.host_class == host_class]

    def add(self, name: str, host: Host, fingerprint: str, labels: dict[str, str], source: str) -> None:
        self.classes.setdefault(fingerprint, host)
        self.hosts.append(FleetHost(name, fingerprint, tuple(sorted(labels.items())), source))


def fingerprint(path: Path, meta: HostMeta | None = None) -> str:
    """A short digest of the bundle's normalised host data: equal for hosts with identical capabilities.
    `meta` (default: the bundle's host.toml) adds the host's kernel-dependent features, when known."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(path.glob("*.xml"))
    for file in files:
        root = parse_bytes(read_file(file), str(file)).getroot()
        for volatile in VOLATILE:
            for el in root.findall(volatile):
                el.getparent().remove(el)
        for el in root.iter():
            if el.text is not None and not el.text.strip():
                el.text = None
            if el.tail is not None and not el.tail.strip():
                el.tail = None
        etree.strip_tags(root, etree.Comment)
        digest.update(file.name.encode() + b"\0" + etree.tostring(root, method="c14n") + b"\0")
    kernel = (meta if meta is not None else read_host_meta(path)).signature()
    if kernel:
        digest.update(b"kernel-features\0" + kernel + b"\0")
    return digest.hexdigest()[:16]


def load_fleet(path: Path) -> Fleet:
    """A fleet from a directory of bundles or a TOML inventory; HostError naming the file otherwise."""
    if path.is_dir():
        return _from_directory(path)
    if path.is_file() and path.suffix == ".toml":
        return _from_inventory(path)
    raise HostError(f"{path}: not a fleet: give a directory of host bundles or an inventory .toml file")


def _from_directory(path: Path) -> Fleet:
    fleet = Fleet()
    entries = sorted(p for p in path.iterdir() if p.is_dir() or p.suffix == ".xml")
    for entry in entries:
        _add_bundle(fleet, entry.name if entry.is_dir() else entry.stem, entry, {})
    if not fleet.hosts:
        raise HostError(f"{path}: no host bundles in this fleet directory")
    return fleet


def _add_bundle(
    fleet: Fleet, name: str, bundle: Path, labels: dict[str, str], count: int = 1, entry: HostMeta | None = None
) -> None:
    meta = read_host_meta(bundle).merged(entry) if entry is not None else read_host_meta(bundle)
    digest = fingerprint(bundle, meta)
    host = fleet.classes.get(digest)
    if host is None:
        host = load_host_bundle(bundle)
        apply_meta(host, meta)
    for i in range(count):
        fleet.add(name if count == 1 else f"{name}-{i + 1}", host, digest, labels, str(bundle))


def _from_inventory(path: Path) -> Fleet:
    try:
        data = tomllib.loads(read_file(path).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not a TOML inventory: {exc}") from None
    entries = data.get("host")
    if not isinstance(entries, list) or not entries:
        raise InputError(
            f"{path}: an inventory lists hosts as [[host]] tables (name, bundle or connect, labels, count)"
        )
    fleet = Fleet()
    total = 0
    names: set[str] = set()
    for i, entry in enumerate(entries, 1):
        where = f"{path}: [[host]] #{i}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a table")
        unknown = sorted(set(entry) - HOST_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)} (accepted: {', '.join(sorted(HOST_KEYS))})")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise InputError(f"{where}: host '{name}' is listed twice")
        names.add(name)
        count = entry.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_HOSTS:
            raise InputError(f"{where} ({name}): 'count' must be a whole number from 1 to {MAX_HOSTS}")
        total += count
        if total > MAX_HOSTS:
            raise InputError(f"{path}: more than {MAX_HOSTS} hosts")
        labels = entry.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise InputError(f"{where} ({name}): 'labels' must be a table of strings")
        bundle, uri = entry.get("bundle"), entry.get("connect")
        if (bundle is None) == (uri is None) or not isinstance(bundle or uri, str):
            raise InputError(f"{where} ({name}): give exactly one of 'bundle' (a path) or 'connect' (a libvirt URI)")
        try:
            meta = parse_meta(entry, f"{where} ({name})", frozenset({"kernel", "kernel_features"}))
        except HostError as exc:
            raise InputError(str(exc)) from None
        if bundle is not None:
            _add_bundle(fleet, name, (path.parent / bundle), labels, count, meta)
        else:
            _add_live(fleet, name, str(uri), labels, count, meta)
    return fleet


def _add_live(fleet: Fleet, name: str, uri: str, labels: dict[str, str], count: int, meta: HostMeta) -> None:
    import tempfile

    from virtpolicy.inputs.capture import capture

    with tempfile.TemporaryDirectory(prefix="virtpolicy-fleet-") as tmp:
        capture(uri, Path(tmp))  # its host.toml names the URI, so the class's host can be asked again
        _add_bundle(fleet, name, Path(tmp), labels, count, meta)
    for i in range(1, count + 1):  # the bundle was temporary: name the URI as the source
        index = len(fleet.hosts) - i
        fleet.hosts[index] = FleetHost(fleet.hosts[index].name, fleet.hosts[index].host_class,
                                       fleet.hosts[index].labels, uri)  # fmt: skip


def classes_of(hosts: Iterable[FleetHost]) -> list[str]:
    """Class fingerprints in first-seen order."""
    return list(dict.fromkeys(h.host_class for h in hosts))
