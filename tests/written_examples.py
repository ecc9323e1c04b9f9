"""One example per structural.toml `written` row (knowledge/test_written_rows.py checks the engine's side
without libvirt, test_conformance_arches.py that libvirt and QEMU refuse and run them as the row says)."""

from __future__ import annotations

OS = {"x86_64": "rhel9.0", "aarch64": "rhel9.0", "ppc64le": "rhel9.0", "s390x": "rhel9.0", "riscv64": "generic"}
NIC = "<interface type='user'><model type='{model}'/>{address}</interface>"


def _nic(address: str, model: str = "virtio") -> str:
    return NIC.format(model=model, address=address)


# rule id -> (the app's element, architectures where it is refused, architectures where it is kept)
ELEMENTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "sclp-console-needs-s390": (
        "<console type='pty'><target type='sclp'/></console>",
        ("x86_64", "aarch64"),
        ("s390x",),
    ),
    "spapr-vio-serial-needs-pseries": (
        "<serial type='pty'><target type='spapr-vio-serial'><model name='spapr-vty'/></target></serial>",
        ("x86_64", "aarch64", "s390x"),
        ("ppc64le",),
    ),
    "sclp-serial-needs-s390": (
        "<serial type='pty'><target type='sclp-serial'><model name='sclpconsole'/></target></serial>",
        ("x86_64", "ppc64le"),
        ("s390x",),
    ),
    "pl011-serial-needs-arm-virt": (
        "<serial type='pty'><target type='system-serial'><model name='pl011'/></target></serial>",
        ("riscv64", "ppc64le"),
        ("aarch64",),
    ),
    "16550a-serial-needs-riscv-virt": (
        "<serial type='pty'><target type='system-serial'><model name='16550a'/></target></serial>",
        ("aarch64", "x86_64"),
        ("riscv64",),
    ),
    "system-serial-needs-virt": (
        "<serial type='pty'><target type='system-serial'/></serial>",
        ("x86_64", "s390x"),
        ("aarch64", "riscv64"),
    ),
    "pci-serial-needs-pci": ("<serial type='pty'><target type='pci-serial'/></serial>", ("s390x",), ("x86_64",)),
    "parallel-needs-isa": ("<parallel type='pty'/>", ("aarch64", "ppc64le", "s390x"), ("x86_64",)),
    "ccw-address-needs-s390-ccw": (
        _nic("<address type='ccw' cssid='0xfe' ssid='0x0' devno='0x0001'/>"),
        ("aarch64", "x86_64"),
        ("s390x",),
    ),
    "spapr-vio-address-needs-pseries": (
        _nic("<address type='spapr-vio'/>", "spapr-vlan"),
        ("x86_64", "aarch64"),
        ("ppc64le",),
    ),
    "virtio-mmio-address-needs-virt": (_nic("<address type='virtio-mmio'/>"), ("x86_64", "ppc64le"), ("aarch64",)),
    "ibmvscsi-needs-pseries": (
        "<controller type='scsi' index='0' model='ibmvscsi'/>",
        ("x86_64", "aarch64"),
        ("ppc64le",),
    ),
}
