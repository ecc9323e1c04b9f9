"""The constraint sources, one per kind of requirement.

The app's XML, structural facts, the host, the guest OS, profiles, engine defaults and PCI/NUMA placement
each become variables and constraints with provenance.
"""
