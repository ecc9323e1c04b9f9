"""The constraint solver: problems, search, explanation. It knows nothing about libvirt."""
