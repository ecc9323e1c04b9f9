"""The policy language: structural libvirt/QEMU facts, host-enum bindings and engine defaults, as data."""
