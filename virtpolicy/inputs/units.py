"""libvirt's scaled integers (memory sizes with a `unit`), exactly as libvirt reads them.

formatdomain.html "Memory Allocation": b/bytes, KB (10^3), k/KiB (2^10), MB, M/MiB, GB, G/GiB, TB, T/TiB,
PB, P/PiB, EB, E/EiB, case-insensitive (virScaleInteger in libvirt's virutil.c); the default unit of
`<memory>` and NUMA cell `memory` is KiB. A size beyond libvirt's limit, LLONG_MAX bytes
(virMemoryMaxValue on 64-bit hosts), is refused by libvirt; it is refused here before any arithmetic
uses it, so a tiny document cannot make the engine compute with absurd numbers.
"""

from __future__ import annotations

MAX_MEMORY_BYTES = 2**63 - 1  # libvirt's virMemoryMaxValue(): LLONG_MAX bytes
ACCEPTED_UNITS = "b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB, PB, P, PiB, EB, E, EiB"
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


class UnitError(ValueError):
    """A unit or scaled value libvirt would refuse; the message says what would be accepted."""


def bytes_per(unit: str) -> int:
    """Bytes in one `unit` (virScaleInteger's rules)."""
    u = unit.strip()
    if u.lower() in ("b", "byte", "bytes"):
        return 1
    if u and u[0].lower() in _POWERS:
        rest = u[1:].lower()
        if rest in ("", "ib"):
            return 1024 ** _POWERS[u[0].lower()]
        if rest == "b":
            return 1000 ** _POWERS[u[0].lower()]
    raise UnitError(f"unknown unit '{unit}' (libvirt accepts {ACCEPTED_UNITS})")


def to_kib(value: str, unit: str | None, default_unit: str = "KiB") -> int:
    """A scaled size in KiB, rounded up as libvirt does (VIR_DIV_UP(bytes, 1024))."""
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise UnitError(f"'{value}' is not a non-negative whole number")
    if len(text) > 40:  # far beyond the limit whatever the unit: do not even convert it
        raise UnitError(f"'{text[:20]}...' exceeds libvirt's limit of {MAX_MEMORY_BYTES} bytes")
    total = int(text) * bytes_per(unit if unit is not None else default_unit)
    if total > MAX_MEMORY_BYTES:
        raise UnitError(f"{text} {unit or default_unit} exceeds libvirt's limit of {MAX_MEMORY_BYTES} bytes (8 EiB)")
    return -(-total // 1024)


