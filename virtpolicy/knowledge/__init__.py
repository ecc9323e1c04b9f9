"""libvirt/QEMU/osinfo facts as data tables (knowledge/data/*.toml), each row with its citation.

One loader per table; nothing else in the engine states a libvirt fact.
"""
