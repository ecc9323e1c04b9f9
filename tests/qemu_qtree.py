"""Reading QEMU's `info qtree`: which NUMA node each device really sits on.

A pxb-pcie device carries `numa_node` and names a bus (its id); the root ports behind it sit on a bus of
that name under a pxb-host, and devices sit on their root port's bus. So a device's node is the
`numa_node` of the pxb whose bus is among the device's ancestors in the qtree, or None for the root
complex. Used to check that QEMU, not just libvirt's XML, puts each device where virtpolicy placed it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DEV = re.compile(r'^dev: (?P<type>[\w.-]+), id "(?P<id>[^"]*)"')
_BUS = re.compile(r"^bus: (?P<name>\S+)")
_PROP = re.compile(r"^(?P<key>[\w-]+) = (?P<value>\S+)")


@dataclass
class QtreeNode:
    kind: str  # dev | bus
    name: str  # device type or bus name
    ident: str = ""
    props: dict[str, str] = field(default_factory=dict)
    parent: QtreeNode | None = None


def parse_qtree(text: str) -> list[QtreeNode]:
    nodes: list[QtreeNode] = []
    stack: list[tuple[int, QtreeNode]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else None
        if m := _DEV.match(stripped):
            node = QtreeNode("dev", m["type"], m["id"], parent=parent)
        elif m := _BUS.match(stripped):
            node = QtreeNode("bus", m["name"], parent=parent)
        else:
            if (m := _PROP.match(stripped)) and parent is not None and parent.kind == "dev":
                parent.props[m["key"]] = m["value"]
            continue
        nodes.append(node)
        stack.append((indent, node))
    return nodes


def numa_node_of_devices(text: str) -> dict[str, int | None]:
    """QEMU device id (libvirt's alias) -> the NUMA node of the expander it hangs off, None for none."""
    nodes = parse_qtree(text)
    pxb = {n.ident: int(n.props["numa_node"]) for n in nodes if n.name == "pxb-pcie" and "numa_node" in n.props}
    found: dict[str, int | None] = {}
    for n in nodes:
        if n.kind != "dev" or not n.ident:
            continue
        node, up = None, n.parent
        while up is not None:
            if up.kind == "bus" and up.name in pxb:
                node = pxb[up.name]
                break
            up = up.parent
        found[n.ident] = node
    return found
