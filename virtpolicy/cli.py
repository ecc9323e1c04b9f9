"""The `virtpolicy` command line.

Exit status: 0 solved, 2 conflicting requirements (a result, reported), 1 bad input (one line on
stderr naming the input). Tracebacks are for bugs only, and only with VIRTPOLICY_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from virtpolicy import __version__
from virtpolicy.errors import InputError
from virtpolicy.models.completeness import completeness
from virtpolicy.models.domain import Domain
from virtpolicy.models.guestos import DEFAULT_OSINFO_DB, UNKNOWN_OS, GuestOS, OsinfoDB
from virtpolicy.models.host import EMBEDDED_BUNDLE, Host, load_host_bundle
from virtpolicy.models.pci import POLICIES
from virtpolicy.solver.compile import SelectedProfile

if TYPE_CHECKING:
    from virtpolicy.solver.build import Build

EMBEDDED_EXAMPLE = Path(__file__).parent / "data" / "examples" / "rhel6-on-q35.xml"
EXIT_OK, EXIT_INPUT, EXIT_CONFLICT = 0, 1, 2


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which means "conflict" here: usage errors are bad input (1), one line."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("virtpolicy").strip()  # 'solve', 'device add' for a subcommand's error
        self.exit(EXIT_INPUT, f"virtpolicy: error: {command + ': ' if command else ''}{message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="virtpolicy", description="Policy engine for libvirt domains.")
    p.add_argument("--version", action="version", version=f"virtpolicy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    solve = sub.add_parser("solve", help="complete a partial domain XML, or report the conflicting requirements")
    explain = sub.add_parser("explain", help="every minimal conflict and correction, or why each value was chosen")
    check = sub.add_parser("check", help="check an existing domain against its host and guest OS, never rewriting it")
    for cmd in (solve, explain, check):
        _input_options(cmd)
    for cmd in (solve, explain):
        state = cmd.add_mutually_exclusive_group()
        state.add_argument(
            "--complete",
            dest="complete",
            action="store_const",
            const=True,
            help="treat the domain as complete: check it, add nothing (default: docs/completeness.md's rule)",
        )
        state.add_argument(
            "--partial",
            dest="complete",
            action="store_const",
            const=False,
            help="treat the domain as partial: fill its gaps even if libvirt laid it out",
        )
    check.set_defaults(complete=True)
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument(
        "--max-conflicts", type=int, default=10, metavar="N", help="stop after N minimal conflicts (default 10)"
    )
    solve.add_argument(
        "--refresh",
        action="store_true",
        help="re-decide what earlier solves decided (not what the app wrote); show the diff",
    )
    solve.add_argument("--format", choices=("xml", "json"), default="xml")
    solve.add_argument("-o", "--output", type=Path, help="write the XML here instead of stdout")
    solve.add_argument("-q", "--quiet", action="store_true", help="no decision summary on stderr")
    explain.add_argument("--format", choices=("text", "json", "html"), default="text")
    explain.add_argument(
        "--max-conflicts", type=int, default=10, metavar="N", help="stop after N minimal conflicts (default 10)"
    )
    explain.add_argument("-o", "--output", type=Path, help="write the report here instead of stdout")

    device = sub.add_parser("device", help="devices of an existing domain")
    device_sub = device.add_subparsers(dest="device_command", required=True)
    add = device_sub.add_parser("add", help="the device XML with a slot this domain can hot-plug it into")
    _input_options(add)
    add.add_argument("device_xml", type=Path, help="the device element (e.g. <interface>, <disk>) to add")
    add.add_argument("--node", type=int, metavar="N", help="the guest NUMA node the device belongs to")
    add.add_argument(
        "--policy",
        choices=POLICIES,
        default="required",
        help="how strictly --node holds (Nova's PCI NUMA affinity policies; default required)",
    )

    profiles = sub.add_parser("profiles", help="list, show and check profiles")
    profiles_sub = profiles.add_subparsers(dest="profiles_command", required=True)
    listing = profiles_sub.add_parser("list", help="profiles on the search path")
    show = profiles_sub.add_parser("show", help="one profile's rules")
    show.add_argument("name")
    lint = profiles_sub.add_parser("check", help="lint profiles, and find pairs that can never be combined")
    lint.add_argument("files", nargs="*", type=Path, help="profile files (default: every profile on the path)")
    for p_ in (listing, show, lint):
        p_.add_argument("--profile-path", action="append", default=[], type=Path, metavar="DIR")
    lint.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)

    host = sub.add_parser("host", help="host bundles")
    host_sub = host.add_subparsers(dest="host_command", required=True)
    capture = host_sub.add_parser("capture", help="write a host bundle from a live libvirt")
    capture.add_argument("--connect", metavar="URI", required=True)
    capture.add_argument("directory", type=Path)
    return p


def _input_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "domain",
        nargs="?",
        help="domain XML file, or - for stdin (default: the embedded example "
        "examples/rhel6-on-q35.xml when stdin is a terminal)",
    )
    cmd.add_argument("--os", dest="os_id", help="guest OS short id or URI (default: the libosinfo metadata)")
    cmd.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB, help="osinfo-db path (%(default)s)")
    hosts = cmd.add_mutually_exclusive_group()
    hosts.add_argument("--host", type=Path, help="host bundle directory or a domcapabilities file")
    hosts.add_argument("--connect", metavar="URI", help="read the host from a live libvirt")
    cmd.add_argument(
        "--guest-support",
        choices=("strict", "lenient"),
        default="strict",
        help="lenient: guest-OS driver support becomes a soft preference",
    )
    cmd.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME[@VERSION]",
        help="apply a profile (repeatable; after those the domain's metadata selects)",
    )
    cmd.add_argument(
        "--profile-path",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="look for profiles here first (repeatable)",
    )


def _read_domain(arg: str | None) -> Domain:
    if arg is None:
        if sys.stdin.isatty():
            print(f"virtpolicy: no domain given; solving the embedded example {EMBEDDED_EXAMPLE.name}", file=sys.stderr)
            return Domain.from_file(EMBEDDED_EXAMPLE)
        arg = "-"
    if arg == "-":
        from virtpolicy.models.xmlsafe import read_stream

        return Domain.from_bytes(read_stream(sys.stdin.buffer, "<stdin>"), "<stdin>")
    return Domain.from_file(Path(arg))


def _write(path: Path, data: bytes) -> None:
    """-o FILE: a directory, a read-only or missing parent is the user's to fix: one line naming the path."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _host(args: argparse.Namespace) -> Host:
    if args.connect:
        import tempfile

        from virtpolicy.models.capture import live_host

        with tempfile.TemporaryDirectory(prefix="virtpolicy-host-") as tmp:
            return live_host(args.connect, Path(tmp))
    return load_host_bundle(args.host or EMBEDDED_BUNDLE)


def _guest(args: argparse.Namespace, domain: Domain) -> GuestOS:
    """The named OS; for a complete domain that names none, UNKNOWN_OS (guest-driver checks skipped)."""
    key = args.os_id or (domain.os_id.value if domain.os_id else None)
    if key is None and completeness(domain.root, domain.source, getattr(args, "complete", None)).complete:
        return UNKNOWN_OS
    if key is None:
        raise InputError(
            f"{domain.source}: no guest OS: add <libosinfo:os id='...'/> metadata or pass --os "
            "(--os generic for an OS osinfo-db does not know)"
        )
    return OsinfoDB(args.osinfo_db).lookup(key)


def _selected_profiles(args: argparse.Namespace, domain: Domain) -> list[SelectedProfile]:
    """The domain's metadata selections, then --profile ones.

    A domain is often written by someone other than the operator, so its selections are names on the
    search path only; a file is accepted from --profile alone (the operator's own choice).
    """
    from virtpolicy.models.domain import xpath_of
    from virtpolicy.rules.profile import find_profile

    lines: dict[str, int] = {}  # XPath of each selecting element -> its line, for file:line messages
    metadata = domain.root.find("metadata")
    for el in metadata.iterfind(".//{*}profile") if metadata is not None else ():
        lines.setdefault(xpath_of(el), el.sourceline or 0)
    selected = []
    for sel in domain.profile_selections():
        line = lines.get(sel.where)
        where = f"{domain.source}:{line}: {sel.where}" if line else f"{domain.source}: {sel.where}"
        profile = find_profile(sel.name, args.profile_path, sel.version, where)
        selected.append(SelectedProfile(profile, sel.priority, sel.where))
    for spec in args.profile:
        name, at, version = spec.rpartition("@")
        if not at or "/" in version:  # no @VERSION (a path may hold an '@' of its own)
            name, version = spec, ""
        profile = find_profile(name, args.profile_path, version or None, f"--profile {spec}", allow_path=True)
        selected.append(SelectedProfile(profile, 0, "--profile"))
    names = [s.profile.name for s in selected]
    return [s for i, s in enumerate(selected) if s.profile.name not in names[:i]]


def cmd_solve(args: argparse.Namespace) -> int:
    from virtpolicy.models.schema import validate_output
    from virtpolicy.solver.build import build
    from virtpolicy.solver.render import render, to_bytes
    from virtpolicy.solver.report import conflict_json, conflict_text, solution_json, solution_text
    from virtpolicy.solver.solve import Conflict, solve

    domain = _read_domain(args.domain)
    host = _host(args)
    guest = _guest(args, domain)
    profiles = _selected_profiles(args, domain)
    original = domain
    if args.refresh:
        from virtpolicy.solver.refresh import forget_engine_decisions

        domain = forget_engine_decisions(domain)
    start = time.perf_counter()
    built = build(
        domain,
        host,
        guest,
        args.guest_support,
        profiles,
        OsinfoDB(args.osinfo_db).device_names(),
        complete=False if args.refresh else args.complete,  # refresh re-decides: the domain is partial again
    )
    result = solve(built.problem)
    if isinstance(result, Conflict):
        if args.format == "json":
            print(json.dumps(conflict_json(built, result), indent=2, sort_keys=True))
        print(conflict_text(built, result), file=sys.stderr)
        print(
            "  'virtpolicy explain' with the same arguments lists every minimal conflict and the smallest "
            "changes that resolve them.",
            file=sys.stderr,
        )
        return EXIT_CONFLICT
    xml = to_bytes(render(built, result))
    validate_output(xml, str(args.output or "<stdout>"))
    elapsed = (time.perf_counter() - start) * 1000
    if args.refresh:
        from virtpolicy.solver.refresh import diff

        print(diff(original, xml) or "virtpolicy: --refresh: nothing would change", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(solution_json(built, result, xml.decode()), indent=2, sort_keys=True))
    elif args.output:
        _write(args.output, xml)
    else:
        sys.stdout.buffer.write(xml)
    if not args.quiet:
        print(solution_text(built, result, elapsed), file=sys.stderr)
    for warning in built.warnings_for(result):
        print(f"virtpolicy: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _build(args: argparse.Namespace, complete: bool | None) -> Build:
    """The problem for a domain on the command line: its host, guest OS and profiles, read once."""
    from virtpolicy.solver.build import build

    domain = _read_domain(args.domain)
    host = _host(args)
    guest = _guest(args, domain)
    profiles = _selected_profiles(args, domain)
    names = OsinfoDB(args.osinfo_db).device_names()
    return build(domain, host, guest, args.guest_support, profiles, names, complete=complete)


def cmd_explain(args: argparse.Namespace) -> int:
    from virtpolicy.solver.explain_report import build_report, to_html, to_text
    from virtpolicy.solver.solve import Conflict, solve

    built = _build(args, args.complete)
    result = solve(built.problem)
    report = build_report(built, result, max(1, args.max_conflicts))
    if args.format == "json":
        text = json.dumps(report, indent=2, sort_keys=True)
    elif args.format == "html":
        text = to_html(report)
    else:
        text = to_text(report, colour=None if args.output is None else False)
    if args.output:
        _write(args.output, (text + "\n").encode())
    else:
        print(text)
    return EXIT_CONFLICT if isinstance(result, Conflict) else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """An existing domain, as it is: 0 when it fits its host and guest, 2 with the minimal conflicts."""
    from virtpolicy.solver.check_domain import check_report, check_text
    from virtpolicy.solver.solve import Conflict, solve

    built = _build(args, True)
    result = solve(built.problem)
    report = check_report(built, result, max(1, args.max_conflicts))
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(check_text(report), file=sys.stdout if report["status"] == "fits" else sys.stderr)
    return EXIT_CONFLICT if isinstance(result, Conflict) else EXIT_OK


def cmd_device_add(args: argparse.Namespace) -> int:
    """Only the new device is decided; it takes a free slot the running domain already has."""
    from lxml import etree

    from virtpolicy.models.schema import validate_device
    from virtpolicy.models.xmlsafe import parse_file
    from virtpolicy.solver.hotplug import add_device
    from virtpolicy.solver.report import conflict_text

    domain = _read_domain(args.domain)
    device = parse_file(args.device_xml).getroot()
    validate_device(device, str(args.device_xml))
    result = add_device(
        domain,
        device,
        _host(args),
        _guest(args, domain),
        args.guest_support,
        _selected_profiles(args, domain),
        OsinfoDB(args.osinfo_db).device_names(),
        args.node,
        args.policy,
    )
    if isinstance(result, tuple):
        built, conflict = result
        print(conflict_text(built, conflict), file=sys.stderr)
        return EXIT_CONFLICT
    print(etree.tostring(result.device, encoding="unicode").strip())
    return EXIT_OK


def cmd_host(args: argparse.Namespace) -> int:
    from virtpolicy.models.capture import capture

    for path in capture(args.connect, args.directory):
        print(path)
    return EXIT_OK


def cmd_profiles(args: argparse.Namespace) -> int:
    from virtpolicy.rules.profile import available, find_profile, load_profile

    if args.profiles_command == "list":
        for name, path in sorted(available(args.profile_path).items()):
            try:
                profile = load_profile(path)
                print(f"{name:<24} {profile.version:<6} {profile.description}")
            except InputError as exc:
                print(f"{name:<24} {'?':<6} unusable: {exc}")
        return EXIT_OK
    if args.profiles_command == "show":
        from virtpolicy.solver.check import profile_summary

        profile = find_profile(args.name, args.profile_path, where="profiles show", allow_path=True)  # operator's
        print("\n".join(profile_summary(profile)))
        return EXIT_OK
    from virtpolicy.models.host import embedded_host
    from virtpolicy.solver.check import ProfileChecker

    files = args.files or sorted(available(args.profile_path).values())
    start = time.perf_counter()
    report = ProfileChecker(embedded_host(), OsinfoDB(args.osinfo_db)).check(files)
    for finding in report.findings:
        print(finding)
    elapsed = time.perf_counter() - start
    print(
        f"virtpolicy: checked {len(files)} profile(s), {len(report.incompatible)} incompatible pair(s), "
        f"{len(report.errors)} error(s) in {elapsed:.2f} s",
        file=sys.stderr,
    )
    return EXIT_INPUT if report.errors else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from virtpolicy.models.schema import OutputRejected

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (1, one line), --help and --version (0): a code, for in-process callers
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT
    try:
        if args.command == "solve":
            return cmd_solve(args)
        if args.command == "profiles":
            return cmd_profiles(args)
        if args.command == "explain":
            return cmd_explain(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "device":
            return cmd_device_add(args)
        return cmd_host(args)
    except InputError as exc:
        print(f"virtpolicy: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OutputRejected as exc:
        print(f"virtpolicy: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: say so in one line unless asked for the traceback
        if os.environ.get("VIRTPOLICY_DEBUG"):
            raise
        print(
            f"virtpolicy: internal error: {type(exc).__name__}: {exc} (VIRTPOLICY_DEBUG=1 shows more)", file=sys.stderr
        )
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
