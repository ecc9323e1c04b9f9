"""Turning the app's XML, the host, the guest OS and the rule tables into one constraint problem.

Variables are named after what they decide: `machine`, `firmware`, `disk[0].bus`, `video.model`. Rule
tables name classes (`disk.bus`) and each source expands them per device instance. Each constraint
records its provenance, so a conflict can say which file, XPath, osinfo OS or host enum to change.

The sources run in three phases over one BuildContext (sources.context): every source declares its
variables, then adds its requirements, then its preferences. The order within a phase is the
documented strength order (app, structure, placement, host, guest, profiles, engine defaults); it is
also the decision order of the variables and the order of the constraints, which keeps explanations
and output bytes stable.
"""

from __future__ import annotations

from typing import Protocol

from lxml import etree

from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.guestos import GuestOS
from virtpolicy.inputs.host import Host
from virtpolicy.sources.app import AppSource
from virtpolicy.sources.context import Build, BuildContext, Instance, SelectedProfile, read_explicit
from virtpolicy.sources.defaults import DefaultsSource
from virtpolicy.sources.guest import GuestSource
from virtpolicy.sources.host import HostSource
from virtpolicy.sources.placement import PciPlanner
from virtpolicy.sources.profiles import ProfileCompiler
from virtpolicy.sources.structural import StructuralSource

__all__ = ["Build", "Builder", "ConstraintSource", "Instance", "build", "read_explicit"]


class ConstraintSource(Protocol):
    """One kind of requirement. A source only reads the context's inputs and adds to its problem."""

    name: str

    def __init__(self, ctx: BuildContext) -> None: ...


DECLARE = ("app", "placement", "defaults", "profiles")  # profiles: the driver packs they declare for the guest
CONSTRAIN = ("app", "structural", "placement", "host", "guest", "profiles")
PREFER = ("defaults", "placement")


class Builder:
    """Runs the sources over one context; the context, not the builder, is what a source sees."""

    def __init__(self, ctx: BuildContext) -> None:
        self.ctx = ctx
        sources = (AppSource, StructuralSource, PciPlanner, HostSource, GuestSource, ProfileCompiler, DefaultsSource)
        self.sources = {s.name: s(self.ctx) for s in sources}

    def build(self) -> Build:
        for phase, names in (("declare", DECLARE), ("constrain", CONSTRAIN), ("prefer", PREFER)):
            for name in names:
                getattr(self.sources[name], phase)()
        return self.ctx.result()


def build(
    domain: Domain,
    host: Host,
    guest: GuestOS,
    guest_support: str = "strict",
    profiles: list[SelectedProfile] | None = None,
    device_names: dict[str, str] | None = None,
    focus: etree._Element | None = None,
    complete: bool | None = None,
) -> Build:
    """The problem of one request: a context over the inputs, and every source run over it."""
    return Builder(BuildContext(domain, host, guest, guest_support, profiles, device_names, focus, complete)).build()
