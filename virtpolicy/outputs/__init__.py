"""What is made from a solution: the rendered domain, the PCI topology, reports, checks, hotplug."""
