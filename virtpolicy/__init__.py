"""virtpolicy: a policy engine for libvirt domains.

Partial domain XML, profiles, host capabilities and the guest OS's driver support become constraint
variables; a solver finds a consistent assignment, or a minimal set of clashing requirements.

    >>> from virtpolicy import Engine
    >>> engine = Engine()                     # the embedded host, /usr/share/osinfo, shipped profiles
    >>> result = engine.solve("examples/rhel6-on-q35.xml")

See docs/api.md. The names below are imported on first use, so `import virtpolicy` (and the CLI's
start) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "virtpolicy.engine",
    "Result": "virtpolicy.results",
    "Report": "virtpolicy.results",
    "LintReport": "virtpolicy.results",
    "Finding": "virtpolicy.results",
    "Requirement": "virtpolicy.results",
    "Decision": "virtpolicy.results",
    "ConflictSet": "virtpolicy.results",
    "Correction": "virtpolicy.results",
    "VirtpolicyError": "virtpolicy.errors",
    "InputError": "virtpolicy.errors",
    "ProfileError": "virtpolicy.errors",
    "HostError": "virtpolicy.errors",
    "UnknownOSError": "virtpolicy.errors",
    "ArgumentError": "virtpolicy.errors",
    "OutputRejected": "virtpolicy.errors",
}
__all__ = [
    "__version__",
    "Engine",
    "Result",
    "Report",
    "LintReport",
    "Finding",
    "Requirement",
    "Decision",
    "ConflictSet",
    "Correction",
    "VirtpolicyError",
    "InputError",
    "ProfileError",
    "HostError",
    "UnknownOSError",
    "ArgumentError",
    "OutputRejected",
]

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.errors import (
        ArgumentError,
        HostError,
        InputError,
        OutputRejected,
        ProfileError,
        UnknownOSError,
        VirtpolicyError,
    )
    from virtpolicy.results import ConflictSet, Correction, Decision, Finding, LintReport, Report, Requirement, Result


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'virtpolicy' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
