"""What a host bundle says about its host beyond libvirt's XML: `host.toml`.

`virtpolicy host capture` writes it: the libvirt URI the bundle came from (so planning can ask that
libvirt again, e.g. for `virsh hypervisor-cpu-baseline`), when, the libvirt and hypervisor versions, and
the host's kernel release when the URI names this machine (libvirt reports no kernel release, so a
remote host's is left for the operator to add). An inventory entry may give `kernel` and
`kernel_features` too; the entry wins over the bundle.

    connect = "qemu+ssh://h01/system"
    captured = "2025-12-01T10:00:00Z"
    libvirt = "9.0.0"
    hypervisor = "QEMU 7.2.0"
    kernel = "6.1.0-18-amd64"                    # uname -r
    kernel_features = { virtio-net-uso = true }  # what the release does not show (a backport)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from virtpolicy.errors import HostError
from virtpolicy.inputs.xmlsafe import read_file

HOST_META = "host.toml"
STRING_KEYS = ("connect", "captured", "libvirt", "hypervisor", "kernel")
KEYS = frozenset((*STRING_KEYS, "kernel_features"))
MAX_TEXT = 1024


@dataclass(frozen=True)
class HostMeta:
    connect: str = ""
    captured: str = ""
    libvirt: str = ""
    hypervisor: str = ""
    kernel: str = ""
    kernel_features: tuple[tuple[str, bool], ...] = ()
    source: str = ""  # the file it was read from

    @property
    def declared(self) -> dict[str, bool]:
        return dict(self.kernel_features)

    def merged(self, other: HostMeta) -> HostMeta:
        """This one with what `other` sets (an inventory entry over its bundle's host.toml)."""
        changes: dict[str, Any] = {k: getattr(other, k) for k in STRING_KEYS if getattr(other, k)}
        if other.kernel_features:
            changes["kernel_features"] = tuple(sorted({**self.declared, **other.declared}.items()))
        return replace(self, **changes)

    def signature(self) -> bytes:
        """What of this host's kernel distinguishes it from a host with the same libvirt XML: the status of
        every host-kernel-dependent feature (not the release itself: two releases with the same features
        are one host class). Empty when nothing is known, so bundles without host.toml keep their class."""
        from virtpolicy.knowledge.kernel_features import statuses

        if not self.kernel and not self.kernel_features:
            return b""
        return ";".join(f"{k}={v}" for k, v in sorted(statuses(self.kernel, self.declared).items())).encode()


def parse_meta(data: dict[str, Any], where: str, allowed: frozenset[str] = KEYS) -> HostMeta:
    """Validate the host keys of a host.toml (or an inventory entry); HostError naming `where` and the key."""
    from virtpolicy.knowledge.kernel_features import feature_ids

    values: dict[str, Any] = {}
    for key in STRING_KEYS:
        if key in allowed and key in data:
            value = data[key]
            if not isinstance(value, str) or len(value) > MAX_TEXT or "\n" in value:
                raise HostError(f"{where}: '{key}' must be a one-line string")
            values[key] = value.strip()
    if "kernel_features" in allowed and "kernel_features" in data:
        table = data["kernel_features"]
        ids = feature_ids()
        if not isinstance(table, dict):
            raise HostError(f"{where}: 'kernel_features' must be a table of true/false ({', '.join(ids)})")
        for name, value in table.items():
            if name not in ids:
                raise HostError(f"{where}: kernel_features.{name}: unknown feature (known: {', '.join(ids)})")
            if not isinstance(value, bool):
                raise HostError(f"{where}: kernel_features.{name} must be true or false")
        values["kernel_features"] = tuple(sorted(table.items()))
    return HostMeta(**values, source=where)


def read_host_meta(bundle: Path) -> HostMeta:
    """The bundle's host.toml, or an empty HostMeta when it has none (or is a single domcaps file)."""
    path = bundle / HOST_META
    if not bundle.is_dir() or not path.is_file():
        return HostMeta()
    try:
        data = tomllib.loads(read_file(path).decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HostError(f"{path}: not a TOML host description: {exc}") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise HostError(f"{path}: unknown key(s) {', '.join(unknown)} (accepted: {', '.join(sorted(KEYS))})")
    return parse_meta(data, str(path))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_meta(meta: HostMeta, notes: dict[str, str] | None = None) -> str:
    """host.toml text; `notes` adds a comment after a key (or stands for a key left out)."""
    notes = notes or {}
    lines = ["# Written by virtpolicy host capture: where this bundle came from and what libvirt's XML lacks."]
    for key in STRING_KEYS:
        value = getattr(meta, key)
        note = f"  # {notes[key]}" if key in notes else ""
        if value:
            lines.append(f"{key} = {_quote(value)}{note}")
        elif key in notes:
            lines.append(f"# {key}: {notes[key]}")
    if meta.kernel_features:
        inner = ", ".join(f"{k} = {'true' if v else 'false'}" for k, v in meta.kernel_features)
        lines.append(f"kernel_features = {{ {inner} }}")
    return "\n".join(lines) + "\n"
