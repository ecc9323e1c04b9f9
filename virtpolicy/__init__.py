"""virtpolicy: a policy engine for libvirt domains.

Partial domain XML, profiles, host capabilities and the guest OS's driver support become constraint
variables; a solver finds a consistent assignment, or a minimal set of clashing requirements.
"""

__version__ = "0.1.0"
