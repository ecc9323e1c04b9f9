"""libvirt's nodeset syntax (cpuset, numatune nodeset), read with bounds checked before expanding."""

from __future__ import annotations

NODESET_LIMIT = 65536  # above every vCPU id (<vcpu> is at most 65535); inputs.domain checks tighter limits first


def parse_nodeset(text: str, limit: int = NODESET_LIMIT) -> set[int]:
    """libvirt's nodeset syntax: '0-2,4,^1'; every id below `limit`, checked before a range is expanded
    (ValueError otherwise: '0-4294967295' must not become four billion integers)."""
    nodes: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        exclude = part.startswith("^")
        first, _, last = part.lstrip("^").partition("-")
        low, high = int(first), int(last or first)
        if high >= limit:
            raise ValueError(f"'{text}' names {high}; only 0-{limit - 1} exist")
        if low > high:
            raise ValueError(f"'{part}' is an empty range")
        span = set(range(low, high + 1))
        nodes = nodes - span if exclude else nodes | span
    return nodes
