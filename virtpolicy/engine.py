"""The one way into virtpolicy: an `Engine` loads hosts, osinfo-db and the profile library once and
answers any number of requests.

The CLI, the tests, the benchmarks and the later what-if, planning and REST layers all go through it,
so a fix in the pipeline (read, validate, build, solve, render, validate the output) reaches every
caller. Requests share nothing mutable: each gets its own parsed domain and build, so one Engine may be
used from many threads; pickling keeps the loaded hosts and re-opens osinfo-db from its path (the index
is cached on disk), which is what a worker process needs.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from lxml import etree

from virtpolicy.errors import ArgumentError, InputError, OutputRejected
from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.guestos import DEFAULT_OSINFO_DB, UNKNOWN_OS, GuestOS, OsinfoDB
from virtpolicy.inputs.host import EMBEDDED_BUNDLE, Host, load_host_bundle
from virtpolicy.knowledge.completeness import completeness
from virtpolicy.knowledge.pci import POLICIES
from virtpolicy.results import LintReport, Report, Result

if TYPE_CHECKING:
    from virtpolicy.profiles.model import Profile
    from virtpolicy.sources.context import Build, SelectedProfile

XmlInput = str | bytes | os.PathLike[str] | etree._Element | etree._ElementTree
HostInput = Host | str | os.PathLike[str]
ProfileInput = Union[str, os.PathLike[str], "Profile", "SelectedProfile"]  # noqa: UP007 (names for type checking)
GUEST_SUPPORT = ("strict", "lenient")
_SAME = object()  # _build: the guest is found for the domain as complete as it is built


def read_xml(value: XmlInput, what: str, source: str | None = None) -> tuple[bytes, str]:
    """Any form a caller holds XML in -> (bytes, the name messages use).

    A str is XML when it starts with '<' (after blanks), otherwise a path; bytes are XML; an lxml
    element or tree is serialised (the caller's object is never modified).
    """
    from virtpolicy.inputs.xmlsafe import read_file

    if isinstance(value, etree._ElementTree):
        value = value.getroot()
    if isinstance(value, etree._Element):
        return etree.tostring(value), source or f"<{what} element>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), source or f"<{what} bytes>"
    if isinstance(value, str) and value.lstrip().startswith("<"):
        return value.encode(), source or f"<{what} string>"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return read_file(path), source or str(path)
    raise ArgumentError(
        f"{what}: expected XML text, bytes, a path or an lxml element, not {type(value).__name__}", input=what
    )


def _parse_profile_spec(spec: str) -> tuple[str, str | None]:
    """'name@1.2' -> ('name', '1.2'); a path may hold an '@' of its own."""
    name, at, version = spec.rpartition("@")
    if not at or "/" in version:
        return spec, None
    return name, version or None


class Engine:
    """Hosts, osinfo-db and profiles, loaded once; `solve`, `explain`, `check`, `add_device` per request.

    `host` is a host bundle directory, a domcapabilities file, a loaded `Host`, or a mapping of host ids
    to any of these (requests then pick one with `host=`; the first is the default). Without it the
    embedded QEMU 7.2 x86_64 bundle is used. `osinfo_db` is a path or an `OsinfoDB`. `profile_path`
    directories are searched for profiles before the user, system and shipped directories.
    """

    def __init__(
        self,
        host: HostInput | Mapping[str, HostInput] | None = None,
        *,
        osinfo_db: str | os.PathLike[str] | OsinfoDB = DEFAULT_OSINFO_DB,
        profile_path: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self._hosts: dict[str, Host] = {}
        specs: Mapping[str, HostInput] | None
        if host is None:
            specs = None
        elif isinstance(host, Mapping):
            specs = host
            if not specs:
                raise ArgumentError("host: an empty mapping names no host", input="host")
        else:
            specs = {"": host}
        for key, spec in (specs or {"": EMBEDDED_BUNDLE}).items():
            if not isinstance(key, str):
                raise ArgumentError(f"host: host ids are strings, not {type(key).__name__}", input="host")
            loaded = self._load_host(spec)
            self._hosts[key or loaded.name] = loaded
        if isinstance(osinfo_db, OsinfoDB):
            self._osdb = osinfo_db
        elif isinstance(osinfo_db, (str, os.PathLike)):
            self._osdb = OsinfoDB(Path(osinfo_db))
        else:
            raise ArgumentError(f"osinfo_db: expected a path or an OsinfoDB, not {type(osinfo_db).__name__}")
        if isinstance(profile_path, (str, os.PathLike)):
            profile_path = [profile_path]
        self._profile_path = tuple(Path(p) for p in profile_path)
        self._profiles: dict[tuple[str, str | None, bool], Profile] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_connection(cls, uri: str, **kwargs: Any) -> Engine:
        """An engine for the host a live libvirt describes (virsh capabilities, domcapabilities, nodedev)."""
        import tempfile

        from virtpolicy.inputs.capture import live_host

        with tempfile.TemporaryDirectory(prefix="virtpolicy-host-") as tmp:
            return cls(live_host(uri, Path(tmp)), **kwargs)

    @staticmethod
    def _load_host(spec: HostInput) -> Host:
        if isinstance(spec, Host):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return load_host_bundle(Path(spec))
        raise ArgumentError(f"host: expected a host bundle path or a Host, not {type(spec).__name__}", input="host")

    # --- what is loaded ---------------------------------------------------------------------------
    @property
    def hosts(self) -> dict[str, Host]:
        return dict(self._hosts)

    @property
    def osinfo(self) -> OsinfoDB:
        return self._osdb

    @property
    def profile_path(self) -> tuple[Path, ...]:
        return self._profile_path

    def add_host(self, host_id: str, host: HostInput) -> Host:
        """Load (or replace) a host under this id; later requests may name it with host=."""
        loaded = self._load_host(host)
        with self._lock:
            self._hosts[host_id] = loaded
        return loaded

    def remove_host(self, host_id: str) -> None:
        with self._lock:
            if host_id not in self._hosts:
                raise ArgumentError(f"host: no host '{host_id}' is loaded", input="host")
            if len(self._hosts) == 1:
                raise ArgumentError(f"host: '{host_id}' is the only host; an engine needs one", input="host")
            del self._hosts[host_id]

    def host(self, host_id: str | None = None) -> Host:
        if host_id is None:
            return next(iter(self._hosts.values()))
        if not isinstance(host_id, str):
            raise ArgumentError(f"host: expected a host id string, not {type(host_id).__name__}", input="host")
        try:
            return self._hosts[host_id]
        except KeyError:
            raise ArgumentError(
                f"host: no host '{host_id}' is loaded (loaded: {', '.join(self._hosts)})", input="host"
            ) from None

    def profiles(self) -> dict[str, Path]:
        """Every profile name on the search path and the file that defines it."""
        from virtpolicy.profiles.library import available

        return available(self._profile_path)

    def profile(self, name: str, version: str | None = None) -> Profile:
        """A profile by name (or file), loaded once per engine."""
        return self._find_profile(name, version, f"profile {name}", allow_path=True)

    def reload_profiles(self) -> None:
        """Forget loaded profiles (a daemon whose library changed on disk)."""
        with self._lock:
            self._profiles.clear()

    # --- requests ---------------------------------------------------------------------------------
    def solve(
        self,
        domain: XmlInput,
        *,
        profiles: Iterable[ProfileInput] = (),
        os: str | GuestOS | None = None,
        guest_support: str = "strict",
        refresh: bool = False,
        complete: bool | None = None,
        host: str | None = None,
        source: str | None = None,
        output_name: str = "<output>",
    ) -> Result:
        """The complete domain, or the minimal conflict (Result.feasible tells which).

        `complete` overrides docs/completeness.md's rule (True: check and add nothing; False: fill gaps);
        `refresh` re-decides what earlier solves decided and puts the difference in `Result.diff`.
        """
        from virtpolicy.core.solve import Conflict
        from virtpolicy.core.solve import solve as run_solver
        from virtpolicy.inputs.schema import validate_complete, validate_output
        from virtpolicy.outputs.render import render, to_bytes

        _check_flag("refresh", refresh)
        parsed = self._domain(domain, source, complete)
        original = parsed
        if refresh:
            from virtpolicy.outputs.refresh import forget_engine_decisions

            parsed = forget_engine_decisions(parsed)
        start = time.perf_counter()
        built = self._build(  # refresh re-decides: the domain is partial again (its guest is found as before)
            parsed, profiles, os, guest_support, host, complete=False if refresh else complete, guest_complete=complete
        )
        outcome = run_solver(built.problem)
        if isinstance(outcome, Conflict):
            return Result("solve", built, outcome, elapsed_ms=(time.perf_counter() - start) * 1000)
        rendered = render(built, outcome)
        xml = to_bytes(rendered)
        try:
            validate_output(rendered, output_name, printed=xml)
        except OutputRejected:
            if built.complete:  # the app's own domain lacks what libvirt requires: its input error, not ours
                validate_complete(original.tree, original.source, built.completeness.reason)
            raise
        elapsed = (time.perf_counter() - start) * 1000
        changes = None
        if refresh:
            from virtpolicy.outputs.refresh import diff

            changes = diff(original, xml)
        return Result("solve", built, outcome, xml=xml, elapsed_ms=elapsed, diff=changes)

    def explain(
        self,
        domain: XmlInput,
        *,
        profiles: Iterable[ProfileInput] = (),
        os: str | GuestOS | None = None,
        guest_support: str = "strict",
        complete: bool | None = None,
        host: str | None = None,
        max_conflicts: int = 10,
        source: str | None = None,
    ) -> Report:
        """Every minimal conflict and correction; when feasible, why each value was chosen."""
        from virtpolicy.core.solve import solve as run_solver
        from virtpolicy.outputs.explain_report import build_report

        limit = _positive("max_conflicts", max_conflicts)
        built = self._build(self._domain(domain, source), profiles, os, guest_support, host, complete=complete)
        return Report(build_report(built, run_solver(built.problem), limit))

    def check(
        self,
        domain: XmlInput,
        *,
        profiles: Iterable[ProfileInput] = (),
        os: str | GuestOS | None = None,
        guest_support: str = "strict",
        host: str | None = None,
        max_conflicts: int = 10,
        source: str | None = None,
    ) -> Result:
        """An existing domain as it stands: fits (status 'fits') or every minimal conflict; never rewritten."""
        from virtpolicy.core.solve import solve as run_solver
        from virtpolicy.inputs.schema import validate_complete
        from virtpolicy.outputs.check_domain import check_report

        limit = _positive("max_conflicts", max_conflicts)
        parsed = self._domain(domain, source, True)
        built = self._build(parsed, profiles, os, guest_support, host, complete=True)
        if not parsed.strictly_valid:
            validate_complete(parsed.tree, parsed.source, built.completeness.reason)
        outcome = run_solver(built.problem)
        report = check_report(built, outcome, limit)
        return Result("check", built, outcome, report=report, max_conflicts=limit)

    def add_device(
        self,
        domain: XmlInput,
        device: XmlInput,
        *,
        node: int | None = None,
        policy: str = "required",
        profiles: Iterable[ProfileInput] = (),
        os: str | GuestOS | None = None,
        guest_support: str = "strict",
        host: str | None = None,
        source: str | None = None,
        device_source: str | None = None,
    ) -> Result:
        """The device completed, with a free hot-plug slot the laid-out domain already has."""
        from virtpolicy.inputs.schema import validate_device
        from virtpolicy.inputs.xmlsafe import parse_bytes
        from virtpolicy.outputs.hotplug import add_device

        if node is not None and (isinstance(node, bool) or not isinstance(node, int) or node < 0):
            raise ArgumentError(f"node: expected a guest NUMA node number (0 or more), not {node!r}", input="node")
        if policy not in POLICIES:
            raise ArgumentError(f"policy: '{policy}' is not one of {', '.join(POLICIES)}", input="policy")
        parsed = self._domain(domain, source)
        data, name = read_xml(device, "device", device_source)
        element = parse_bytes(data, name).getroot()
        validate_device(element, name)
        selected, guest = self._request(parsed, profiles, os, guest_support, complete=None)
        start = time.perf_counter()
        outcome = add_device(
            parsed,
            element,
            self.host(host),
            guest,
            guest_support,
            selected,
            self._osdb.device_names(),
            node,
            policy,
        )
        elapsed = (time.perf_counter() - start) * 1000
        if isinstance(outcome, tuple):
            built, conflict = outcome
            return Result("add_device", built, conflict, elapsed_ms=elapsed)
        text = etree.tostring(outcome.device, encoding="unicode").strip()
        return Result("add_device", outcome.built, outcome.solution, device_xml=text, elapsed_ms=elapsed)

    def build(
        self,
        domain: XmlInput,
        *,
        profiles: Iterable[ProfileInput] = (),
        os: str | GuestOS | None = None,
        guest_support: str = "strict",
        complete: bool | None = None,
        host: str | None = None,
        source: str | None = None,
    ) -> Build:
        """The constraint problem of a request, not solved: what-if and planning vary it and solve parts.

        The returned Build's shape follows the engine's internals; solve, check and explain are the
        stable entry points.
        """
        return self._build(self._domain(domain, source, complete), profiles, os, guest_support, host, complete)

    def check_profiles(self, files: Iterable[str | os.PathLike[str]] | None = None) -> LintReport:
        """Lint profiles (default: the whole library) and find pairs that can never be combined."""
        from virtpolicy.profiles.lint import ProfileChecker

        paths = sorted(self.profiles().values()) if files is None else [Path(f) for f in files]
        report = ProfileChecker(self).check(paths)
        return LintReport(tuple(p.name for p in report.profiles), tuple(report.findings), tuple(report.incompatible))

    # --- the pipeline's shared steps --------------------------------------------------------------
    def _domain(self, domain: XmlInput, source: str | None, complete: bool | None = None) -> Domain:
        if isinstance(domain, Domain):
            copied = Domain(copy.deepcopy(domain.tree), source or domain.source)
            copied.strictly_valid = domain.strictly_valid
            return copied
        data, name = read_xml(domain, "domain", source)
        return Domain.from_bytes(data, name, complete)

    def _build(
        self,
        domain: Domain,
        profiles: Iterable[ProfileInput],
        os_key: str | GuestOS | None,
        guest_support: str,
        host: str | None,
        complete: bool | None,
        guest_complete: bool | None | object = _SAME,
    ) -> Build:
        from virtpolicy.sources.build import build

        chosen = self.host(host)
        as_written = complete if guest_complete is _SAME else guest_complete  # how the app's domain counts
        selected, guest = self._request(domain, profiles, os_key, guest_support, as_written)  # type: ignore[arg-type]
        return build(domain, chosen, guest, guest_support, selected, self._osdb.device_names(), complete=complete)

    def _request(
        self,
        domain: Domain,
        profiles: Iterable[ProfileInput],
        os_key: str | GuestOS | None,
        guest_support: str,
        complete: bool | None,
    ) -> tuple[list[SelectedProfile], GuestOS]:
        if guest_support not in GUEST_SUPPORT:
            raise ArgumentError(
                f"guest_support: '{guest_support}' is not one of {', '.join(GUEST_SUPPORT)}", input="guest_support"
            )
        if complete is not None:
            _check_flag("complete", complete)
        guest = self._guest(domain, os_key, complete)
        return self._selected_profiles(domain, profiles), guest

    def _guest(self, domain: Domain, os_key: str | GuestOS | None, complete: bool | None) -> GuestOS:
        """The named OS; for a complete domain that names none, UNKNOWN_OS (guest-driver checks skipped)."""
        if isinstance(os_key, GuestOS):
            return os_key
        if os_key is not None and not isinstance(os_key, str):
            raise ArgumentError(f"os: expected an osinfo short id or URI, not {type(os_key).__name__}", input="os")
        key = os_key or (domain.os_id.value if domain.os_id else None)
        if key is None and completeness(domain.root, domain.source, complete).complete:
            return UNKNOWN_OS
        if key is None:
            raise InputError(
                f"{domain.source}: no guest OS: add <libosinfo:os id='...'/> metadata or pass --os "
                "(--os generic for an OS osinfo-db does not know)"
            )
        return self._osdb.lookup(key)

    def _selected_profiles(self, domain: Domain, profiles: Iterable[ProfileInput]) -> list[SelectedProfile]:
        """The domain's metadata selections, then the caller's.

        A domain is often written by someone other than the operator, so its selections are names on the
        search path only; a file is accepted from the caller alone (the CLI's --profile, the API's
        profiles=), who is the operator.
        """
        from virtpolicy.inputs.domain import xpath_of
        from virtpolicy.profiles.model import Profile
        from virtpolicy.sources.context import SelectedProfile

        if isinstance(profiles, (str, bytes, os.PathLike)):
            raise ArgumentError("profiles: expected a list of profile names, not one string", input="profiles")
        lines: dict[str, int] = {}  # XPath of each selecting element -> its line, for file:line messages
        metadata = domain.root.find("metadata")
        for el in metadata.iterfind(".//{*}profile") if metadata is not None else ():
            lines.setdefault(xpath_of(el), el.sourceline or 0)
        selected = []
        for sel in domain.profile_selections():
            line = lines.get(sel.where)
            where = f"{domain.source}:{line}: {sel.where}" if line else f"{domain.source}: {sel.where}"
            profile = self._find_profile(sel.name, sel.version, where, allow_path=False)
            selected.append(SelectedProfile(profile, sel.priority, sel.where))
        for spec in profiles:
            if isinstance(spec, SelectedProfile):  # a caller that sets priorities itself (what-if)
                selected.append(spec)
                continue
            if isinstance(spec, Profile):
                selected.append(SelectedProfile(spec, 0, "--profile"))
                continue
            if not isinstance(spec, (str, os.PathLike)):
                raise ArgumentError(
                    f"profiles: expected profile names or files, not {type(spec).__name__}", input="profiles"
                )
            text = os.fspath(spec)
            name, version = _parse_profile_spec(text) if isinstance(spec, str) else (text, None)
            profile = self._find_profile(name, version, f"--profile {text}", allow_path=True)
            selected.append(SelectedProfile(profile, 0, "--profile"))
        names = [s.profile.name for s in selected]
        return [s for i, s in enumerate(selected) if s.profile.name not in names[:i]]

    def _find_profile(self, name: str, version: str | None, where: str, allow_path: bool) -> Profile:
        from virtpolicy.profiles.library import find_profile

        key = (name, version, allow_path)
        cached = self._profiles.get(key)
        if cached is None:
            cached = find_profile(name, self._profile_path, version, where, allow_path=allow_path)
            self._profiles[key] = cached
        return cached

    # --- pickling: for worker processes -----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "hosts": self._hosts,
            "osinfo_db": str(self._osdb.path),
            "osinfo_cache": str(self._osdb.cache_dir),
            "profile_path": [str(p) for p in self._profile_path],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._hosts = dict(state["hosts"])
        self._osdb = OsinfoDB(Path(state["osinfo_db"]), cache_dir=Path(state["osinfo_cache"]))
        self._profile_path = tuple(Path(p) for p in state["profile_path"])
        self._profiles = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Engine hosts={list(self._hosts)} osinfo_db={str(self._osdb.path)!r}>"


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ArgumentError(f"{name}: expected True or False, not {value!r}", input=name)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"{name}: expected a whole number of at least 1, not {value!r}", input=name)
    return value
