"""What a custom CPU needs before it starts on this test machine, said out loud (like
LibvirtHarness.runnable_here, which handles host-model and host-passthrough the same way).

KVM here is PVM (kvm_pvm): it reports arch-capabilities in CPUID but refuses the write of MSR 0x10a,
and QEMU aborts at start ("failed to set MSR 0x10a", kvm_buf_set_msrs assertion). libvirt's baseline of
this host's host-model CPU requires arch-capabilities, because the host-model CPU does; so here, and
only here, the feature is disabled before the start, and the test reports that it was.
"""

from __future__ import annotations

from lxml import etree


def runnable_cpu(xml: str) -> tuple[str, list[str]]:
    from libvirt_harness import _kvm_is_pvm

    root = etree.fromstring(xml.encode())
    feature = root.find("cpu/feature[@name='arch-capabilities']")
    if root.get("type") != "kvm" or not _kvm_is_pvm() or feature is None or feature.get("policy") != "require":
        return xml, []
    feature.set("policy", "disable")
    note = "arch-capabilities disabled: KVM here is PVM, which refuses MSR 0x10a and QEMU aborts at start"
    return etree.tostring(root, encoding="unicode"), [note]
