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
from typing import TYPE_CHECKING, Any, NoReturn

from virtpolicy import __version__
from virtpolicy.errors import InputError, OutputRejected
from virtpolicy.inputs.guestos import DEFAULT_OSINFO_DB
from virtpolicy.knowledge.pci import POLICIES

if TYPE_CHECKING:
    from virtpolicy.engine import Engine

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
    add.add_argument("--format", choices=("xml", "json"), default="xml")
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

    whatif = sub.add_parser("whatif", help="what-if analysis over profile combinations, guest OSes and hosts")
    whatif_sub = whatif.add_subparsers(dest="whatif_command", required=True)
    combos = whatif_sub.add_parser(
        "combinations", help="profile sets that can never be selected together, and what each profile changes"
    )
    combos.add_argument("domain", nargs="?", help="domain template (default: a typical partial domain)")
    combos.add_argument("--profile", action="append", default=[], metavar="NAME", help="an optional profile")
    combos.add_argument("--library", action="store_true", help="every profile on the search path (the default)")
    combos.add_argument("--os", dest="oses", action="append", default=[], metavar="ID", help="guest OS (repeatable)")
    combos.add_argument("--host", dest="hosts", action="append", default=[], type=Path, metavar="DIR")
    combos.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)
    combos.add_argument("--profile-path", action="append", default=[], type=Path, metavar="DIR")
    combos.add_argument("--guest-support", choices=("strict", "lenient"), default="strict")
    combos.add_argument("--format", choices=("text", "json", "html"), default="text")
    combos.add_argument("-o", "--output", type=Path, help="write the report here instead of stdout")
    combos.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (default: one per CPU)")

    compare = whatif_sub.add_parser(
        "compare", help="what existing domains would decide differently after a host, profile or OS change"
    )
    compare.add_argument("domains", nargs="+", type=Path, help="domain XML files (templates or complete domains)")
    for side in ("before", "after"):
        compare.add_argument(f"--{side}-host", type=Path, metavar="DIR", help=f"the host bundle {side}")
        compare.add_argument(
            f"--{side}-profile-path", action="append", default=[], type=Path, metavar="DIR", help=f"profiles {side}"
        )
        compare.add_argument(f"--{side}-os", metavar="ID", help=f"the guest OS {side} (default: the metadata)")
    compare.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)
    compare.add_argument("--format", choices=("text", "json"), default="text")
    compare.add_argument("-o", "--output", type=Path, help="write the report here instead of stdout")
    compare.add_argument("--workers", type=int, default=0, metavar="N", help="worker processes (default: one per CPU)")

    plan = sub.add_parser("plan", help="cluster planning over a fleet of hosts")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    plan_hosts = plan_sub.add_parser("hosts", help="on which hosts of a fleet a domain runs, and why not elsewhere")
    plan_hosts.add_argument("domain", help="domain XML file, or - for stdin")
    plan_hosts.add_argument("--fleet", type=Path, required=True, help="a directory of host bundles or an inventory")
    plan_hosts.add_argument("--profile", action="append", default=[], metavar="NAME[@VERSION]")
    plan_hosts.add_argument("--profile-path", action="append", default=[], type=Path, metavar="DIR")
    plan_hosts.add_argument("--os", dest="os_id", help="guest OS short id or URI (default: the libosinfo metadata)")
    plan_hosts.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)
    plan_hosts.add_argument("--guest-support", choices=("strict", "lenient"), default="strict")
    plan_hosts.add_argument("--format", choices=("text", "json", "html"), default="text")
    plan_hosts.add_argument("-o", "--output", type=Path, help="write the report here instead of stdout")
    plan_hosts.add_argument(
        "--workers", type=int, default=0, metavar="N", help="worker processes (default: one per CPU)"
    )
    plan_hosts.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask cluster (tcp://host:8786)")

    plan_common = plan_sub.add_parser("common", help="one complete domain that runs on every host of a fleet")
    plan_common.add_argument("domain", help="domain XML file, or - for stdin")
    plan_common.add_argument("--fleet", type=Path, required=True, help="a directory of host bundles or an inventory")
    plan_common.add_argument("--profile", action="append", default=[], metavar="NAME[@VERSION]")
    plan_common.add_argument("--profile-path", action="append", default=[], type=Path, metavar="DIR")
    plan_common.add_argument("--os", dest="os_id", help="guest OS short id or URI (default: the libosinfo metadata)")
    plan_common.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)
    plan_common.add_argument("--guest-support", choices=("strict", "lenient"), default="strict")
    plan_common.add_argument("--format", choices=("xml", "json"), default="xml")
    plan_common.add_argument(
        "--min-hosts", type=int, metavar="K", help="plan for the best set of at least K hosts (default: all of them)"
    )

    migrate = plan_sub.add_parser("migrate", help="can this running domain live-migrate there, and why not")
    migrate.add_argument("domain", help="the running domain's XML (virsh dumpxml), or - for stdin")
    migrate.add_argument("--from", dest="source", type=Path, metavar="HOST", help="the host bundle it runs on")
    targets = migrate.add_mutually_exclusive_group(required=True)
    targets.add_argument("--to", type=Path, metavar="HOST", help="one destination host bundle")
    targets.add_argument("--fleet", type=Path, help="every host of a fleet as a destination")
    migrate.add_argument("--os", dest="os_id", help="guest OS short id or URI (default: the libosinfo metadata)")
    migrate.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)
    migrate.add_argument("--format", choices=("text", "json"), default="text")

    capacity = plan_sub.add_parser("capacity", help="how many instances of each template fit, per host and fleet")
    capacity.add_argument("templates", nargs="+", type=Path, help="domain templates")
    capacity.add_argument("--fleet", type=Path, required=True, help="a directory of host bundles or an inventory")
    capacity.add_argument("--os", dest="os_id", help="guest OS short id or URI (default: the libosinfo metadata)")
    capacity.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB)
    capacity.add_argument("--cpu-ratio", type=float, default=1.0, help="vCPUs per host CPU (Nova's ratio; 1.0)")
    capacity.add_argument("--ram-ratio", type=float, default=1.0, help="guest memory per host memory (1.0)")
    capacity.add_argument("--format", choices=("text", "json"), default="text")
    capacity.add_argument("--usage", type=Path, metavar="FILE", help='current use: [host."NAME"] cpus, memory_mib')

    host = sub.add_parser("host", help="host bundles")
    host_sub = host.add_subparsers(dest="host_command", required=True)
    capture = host_sub.add_parser("capture", help="write a host bundle from a live libvirt")
    capture.add_argument(
        "--connect",
        metavar="URI",
        action="append",
        help="a libvirt URI (default qemu:///system; repeatable: one bundle per host, in DIR/<host name>)",
    )
    capture.add_argument(
        "--arch",
        action="append",
        default=[],
        help="only this guest architecture (repeatable): its capabilities and the domcaps of its machines",
    )
    capture.add_argument(
        "--virttype", action="append", default=[], help="only this virt type (repeatable): qemu (TCG), kvm, ..."
    )
    capture.add_argument("directory", type=Path)

    serve = sub.add_parser("serve", help="the REST service (docs/rest.md; pip install 'virtpolicy[server]')")
    serve.add_argument("--host", dest="bind", metavar="ADDRESS", default="127.0.0.1", help="bind address (%(default)s)")
    serve.add_argument("--port", type=int, default=8007, help="TCP port (%(default)s)")
    serve.add_argument("--workers", type=int, default=2, help="solver worker processes (%(default)s)")
    serve.add_argument("--token-file", type=Path, metavar="F", help="every request needs Authorization: Bearer <F>")
    serve.add_argument("--timeout", type=float, default=30.0, help="seconds a request may run (%(default)s)")
    serve.add_argument("--osinfo-db", type=Path, default=DEFAULT_OSINFO_DB, help="osinfo-db path (%(default)s)")
    serve.add_argument("--profile-path", action="append", default=[], type=Path, metavar="DIR")
    serve.add_argument("--fleet", type=Path, metavar="F", help="load a fleet's hosts (directory or inventory .toml)")
    serve.add_argument("--queue", type=int, metavar="N", help="requests that may wait for a worker; beyond, 429 (256)")
    serve.add_argument("--job-queue", type=int, metavar="N", help="jobs queued or running; beyond, 429 (16)")
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


def _domain_bytes(arg: str | None) -> tuple[bytes, str]:
    """The domain argument as (bytes, name): a file, '-' for stdin, or the embedded example."""
    from virtpolicy.inputs.xmlsafe import read_file, read_stream

    if arg is None:
        if sys.stdin.isatty():
            print(f"virtpolicy: no domain given; solving the embedded example {EMBEDDED_EXAMPLE.name}", file=sys.stderr)
            return read_file(EMBEDDED_EXAMPLE), str(EMBEDDED_EXAMPLE)
        arg = "-"
    if arg == "-":
        return read_stream(sys.stdin.buffer, "<stdin>"), "<stdin>"
    return read_file(Path(arg)), str(Path(arg))


def _write(path: Path, data: bytes) -> None:
    """-o FILE: a directory, a read-only or missing parent is the user's to fix: one line naming the path."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise InputError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _engine(args: argparse.Namespace) -> Engine:
    """The one engine this command runs on: its host (a bundle or a live libvirt), osinfo-db and profiles."""
    from virtpolicy.engine import Engine

    options = {"osinfo_db": args.osinfo_db, "profile_path": args.profile_path}
    if getattr(args, "connect", None):
        return Engine.from_connection(args.connect, **options)
    return Engine(getattr(args, "host", None), **options)


def _request(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every domain command passes to the engine."""
    data, source = _domain_bytes(args.domain)
    return {
        "domain": data,
        "source": source,
        "profiles": args.profile,
        "os": args.os_id,
        "guest_support": args.guest_support,
    }


CONFLICT_HINT = (
    "  'virtpolicy explain' with the same arguments lists every minimal conflict and the smallest "
    "changes that resolve them."
)


def cmd_solve(args: argparse.Namespace) -> int:
    engine = _engine(args)
    result = engine.solve(
        **_request(args), refresh=args.refresh, complete=args.complete, output_name=str(args.output or "<stdout>")
    )
    if not result.feasible:
        if args.format == "json":
            print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        print(result.summary(), file=sys.stderr)
        print(CONFLICT_HINT, file=sys.stderr)
        return EXIT_CONFLICT
    if args.refresh:
        print(result.diff or "virtpolicy: --refresh: nothing would change", file=sys.stderr)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    elif args.output:
        _write(args.output, result.xml_bytes or b"")
    else:
        sys.stdout.buffer.write(result.xml_bytes or b"")
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    _print_warnings(result.warnings)
    return EXIT_OK


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"virtpolicy: warning: {warning}", file=sys.stderr)


def cmd_explain(args: argparse.Namespace) -> int:
    engine = _engine(args)
    report = engine.explain(**_request(args), complete=args.complete, max_conflicts=max(1, args.max_conflicts))
    if args.format == "json":
        text = json.dumps(report.to_dict(), indent=2, sort_keys=True)
    elif args.format == "html":
        text = report.to_html()
    else:
        text = report.to_text(colour=None if args.output is None else False)
    if args.output:
        _write(args.output, (text + "\n").encode())
    else:
        print(text)
    return EXIT_OK if report.feasible else EXIT_CONFLICT


def cmd_check(args: argparse.Namespace) -> int:
    """An existing domain, as it is: 0 when it fits its host and guest, 2 with the minimal conflicts."""
    engine = _engine(args)
    result = engine.check(**_request(args), max_conflicts=max(1, args.max_conflicts))
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(result.summary(), file=sys.stdout if result.feasible else sys.stderr)
    return EXIT_OK if result.feasible else EXIT_CONFLICT


def cmd_device_add(args: argparse.Namespace) -> int:
    """Only the new device is decided; it takes a free slot the running domain already has."""
    from virtpolicy.inputs.xmlsafe import read_file

    engine = _engine(args)
    result = engine.add_device(
        **_request(args),
        device=read_file(args.device_xml),
        device_source=str(args.device_xml),
        node=args.node,
        policy=args.policy,
    )
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    if not result.feasible:
        print(result.summary(), file=sys.stderr)
        return EXIT_CONFLICT
    if args.format != "json":
        print(result.device_xml)
    _print_warnings(result.warnings)
    return EXIT_OK


WHATIF_OSES = ("fedora37", "rhel6.10", "win10")  # a modern Linux, an old Linux, a Windows guest


def cmd_whatif(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: use 0 (one per CPU) or more")
    if args.whatif_command == "compare":
        return cmd_whatif_compare(args)
    from virtpolicy.engine import Engine
    from virtpolicy.whatif.report import analyse_combinations, to_text

    hosts: dict[str, Path] = {}
    for path in args.hosts:
        key = path.resolve().name or str(path)
        while key in hosts:
            key += "'"
        hosts[key] = path
    engine = Engine(hosts or None, osinfo_db=args.osinfo_db, profile_path=args.profile_path)
    profiles = args.profile or sorted(engine.profiles())
    domain = (Path(args.domain) if args.domain != "-" else _domain_bytes("-")[0]) if args.domain else None
    oses = args.oses or list(WHATIF_OSES)
    report = analyse_combinations(
        engine, profiles, oses, domain, list(hosts) or None, args.guest_support, workers=args.workers
    )
    if args.format == "json":
        text = json.dumps(report.to_dict(), indent=2, sort_keys=True)
    elif args.format == "html":
        from virtpolicy.whatif.html import to_html

        text = to_html(report.to_dict())
    else:
        text = to_text(report)
    if args.output:
        _write(args.output, (text + "\n").encode())
    else:
        print(text)
    return EXIT_OK


def cmd_whatif_compare(args: argparse.Namespace) -> int:
    from virtpolicy.engine import Engine
    from virtpolicy.inputs.xmlsafe import read_file
    from virtpolicy.whatif.compare import Side, compare_domains, to_text

    if not (args.before_host or args.after_host or args.before_profile_path or args.after_profile_path) and not (
        args.before_os or args.after_os
    ):
        raise InputError(
            "whatif compare: name what changes: --before-host/--after-host, "
            "--before-profile-path/--after-profile-path or --before-os/--after-os"
        )
    engines = tuple(
        Engine(host, osinfo_db=args.osinfo_db, profile_path=paths)
        for host, paths in ((args.before_host, args.before_profile_path), (args.after_host, args.after_profile_path))
    )

    def label(host: Path | None, paths: list[Path], os_id: str | None) -> str:
        parts = [f"host {host.name}" if host else "", f"profiles {':'.join(map(str, paths))}" if paths else ""]
        parts.append(f"os {os_id}" if os_id else "")
        return ", ".join(p for p in parts if p) or "as given"

    sides = (
        Side(label(args.before_host, args.before_profile_path, args.before_os), args.before_os),
        Side(label(args.after_host, args.after_profile_path, args.after_os), args.after_os),
    )
    domains = [(read_file(path), str(path)) for path in args.domains]
    report = compare_domains(engines[0], engines[1], domains, sides, workers=args.workers)
    text = json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.format == "json" else to_text(report)
    if args.output:
        _write(args.output, (text + "\n").encode())
    else:
        print(text)
    bad = [c for c in report.changes if c.error]  # reported with the rest; still bad input: exit 1
    for change in bad:
        print(f"virtpolicy: error: {change.error}", file=sys.stderr)
    return EXIT_INPUT if bad else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from virtpolicy.plan.fleet import load_fleet
    from virtpolicy.plan.hosts import engine_for, plan_hosts, to_text

    if args.plan_command == "common":
        return cmd_plan_common(args)
    if args.plan_command == "migrate":
        return cmd_plan_migrate(args)
    if args.plan_command == "capacity":
        return cmd_plan_capacity(args)
    if args.workers < 0:
        raise InputError(f"--workers {args.workers}: use 0 (one per CPU) or more")
    fleet = load_fleet(args.fleet)
    engine = engine_for(fleet, osinfo_db=args.osinfo_db, profile_path=args.profile_path)
    data, source = _domain_bytes(args.domain)
    engine.build(data, profiles=args.profile, os=args.os_id, guest_support=args.guest_support, source=source)
    client = None
    if args.scheduler:
        from virtpolicy.whatif.runner import dask_client

        client = dask_client(args.scheduler)
    try:
        plan = plan_hosts(
            engine, fleet, data, source, args.profile, args.os_id, args.guest_support, args.workers, client=client
        )
    finally:
        if client is not None:
            client.close()
    if args.format == "json":
        text = json.dumps(plan.to_dict(), indent=2, sort_keys=True)
    elif args.format == "html":
        from virtpolicy.plan.html import to_html

        text = to_html(plan.to_dict())
    else:
        text = to_text(plan)
    if args.output:
        _write(args.output, (text + "\n").encode())
    else:
        print(text)
    return EXIT_OK if plan.runs_anywhere else EXIT_CONFLICT


def cmd_plan_common(args: argparse.Namespace) -> int:
    from virtpolicy.plan.common import plan_common
    from virtpolicy.plan.fleet import classes_of, load_fleet
    from virtpolicy.plan.hosts import engine_for

    fleet = load_fleet(args.fleet)
    engine = engine_for(fleet, osinfo_db=args.osinfo_db, profile_path=args.profile_path)
    data, source = _domain_bytes(args.domain)
    classes = classes_of(fleet.hosts)
    choice = None
    if args.min_hosts is not None:
        from virtpolicy.plan.common import choose_classes

        if args.min_hosts < 1:
            raise InputError(f"--min-hosts {args.min_hosts}: use 1 or more")
        choice = choose_classes(fleet.classes, {c: len(fleet.members(c)) for c in classes}, args.min_hosts)
        if choice is None:
            print(f"virtpolicy: plan common: the fleet has only {len(fleet.hosts)} host(s), fewer than "
                  f"--min-hosts {args.min_hosts}", file=sys.stderr)  # fmt: skip
            return EXIT_CONFLICT
        classes = list(choice.chosen)
    names = {c: names_of(fleet, c) for c in classes}
    plan = plan_common(engine, classes, data, source, args.profile, args.os_id, args.guest_support, names=names)
    report = plan.to_dict()
    if choice is not None:
        report["left_out"] = [
            {"class": c, "hosts": names_of(fleet, c), "would_lose": list(choice.cost_of[c])} for c in choice.left_out
        ]
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    elif plan.feasible:
        sys.stdout.write(report["xml"])
    if not plan.result.feasible:
        print(plan.result.summary(), file=sys.stderr)
        return EXIT_CONFLICT
    print(
        f"virtpolicy: plan common: one domain for {sum(len(fleet.members(c)) for c in classes)} of "
        f"{len(fleet.hosts)} host(s) in {len(classes)} class(es): "
        f"machine {report['machine']}, {_cpu_summary(plan)}",
        file=sys.stderr,
    )
    choice_cpu = plan.cpu_choice
    if choice_cpu is not None and choice_cpu.cpu is not None and choice_cpu.reason:
        print(f"  cpu: {choice_cpu.reason}", file=sys.stderr)
    if choice_cpu is not None and choice_cpu.agrees is False:
        print(f"  cpu: the engine's cpu_map baseline differs from libvirt's: only the engine's provides "
              f"{', '.join(choice_cpu.only_engine) or '-'}; only libvirt's {', '.join(choice_cpu.only_libvirt) or '-'}",
              file=sys.stderr)  # fmt: skip
    for verdict in plan.kernel:
        if verdict.status in ("pinned-off", "unpinnable"):
            state = "pinned off" if verdict.status == "pinned-off" else "NOT pinned off"
            print(f"  kernel feature {verdict.feature.id}: {state}: {verdict.message}", file=sys.stderr)
    for c, fits in plan.fits.items():
        print(f"  {'fits' if fits else 'DOES NOT FIT'} class {c}: {names[c]}", file=sys.stderr)
    for row in report.get("left_out", ()):
        lost = ", ".join(row["would_lose"][:5]) + (" ..." if len(row["would_lose"]) > 5 else "")
        print(f"  left out class {row['class']} ({row['hosts']}): keeping it would lose {lost}", file=sys.stderr)
    return EXIT_OK if plan.feasible else EXIT_CONFLICT


def _cpu_summary(plan: Any) -> str:
    choice = plan.cpu_choice
    if choice is None or choice.cpu is None:
        why = f" ({choice.reason})" if choice is not None and choice.reason else ""
        return f"CPU as the template says{why}"
    cpu = choice.cpu
    disabled = f" - {len(cpu.disabled)} disabled" if cpu.disabled else ""
    return f"custom CPU {cpu.model} + {len(cpu.features)} feature(s){disabled} ({choice.method})"


def names_of(fleet: Any, host_class: str) -> str:
    return ", ".join(h.name for h in fleet.members(host_class))


def cmd_plan_migrate(args: argparse.Namespace) -> int:
    from virtpolicy.engine import Engine
    from virtpolicy.inputs.host import load_host_bundle
    from virtpolicy.plan.fleet import Fleet, fingerprint, load_fleet
    from virtpolicy.plan.migrate import plan_migrate, to_dict

    if args.fleet:
        fleet = load_fleet(args.fleet)
    else:
        fleet = Fleet()
        fleet.add(args.to.name, load_host_bundle(args.to), fingerprint(args.to), {}, str(args.to))
    destinations = list(fleet.classes)
    source = None
    if args.source:
        source = fingerprint(args.source)
        if source not in fleet.classes:
            fleet.classes[source] = load_host_bundle(args.source)
    names = {c: ", ".join(h.name for h in fleet.members(c)) for c in fleet.classes}
    if args.source:
        names.setdefault(source, args.source.name)  # type: ignore[arg-type]
        names[source] = names[source] or args.source.name  # type: ignore[index]
    engine = Engine(dict(fleet.classes), osinfo_db=args.osinfo_db)
    data, name = _domain_bytes(args.domain)
    verdicts = plan_migrate(engine, data, name, destinations, source, args.os_id)
    report = to_dict(name, names.get(source or ""), verdicts, names)
    if args.format == "json":
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"virtpolicy plan migrate: '{name}' can migrate to {len(report['can_migrate_to'])} of {len(verdicts)} "
              "destination class(es)")  # fmt: skip
        for v in verdicts:
            print(f"  {'yes' if v.ok else 'no '} {names[v.host_class]} (class {v.host_class})")
            for reason in v.reasons:
                print(f"      {reason['check']}: {reason['message']}")
            for warning in v.warnings:
                print(f"      warning: {warning['check']}: {warning['message']}")
    return EXIT_OK if report["can_migrate_to"] else EXIT_CONFLICT


def cmd_plan_capacity(args: argparse.Namespace) -> int:
    from virtpolicy.inputs.xmlsafe import read_file
    from virtpolicy.plan.capacity import plan_capacity, to_text
    from virtpolicy.plan.fleet import load_fleet
    from virtpolicy.plan.hosts import engine_for

    fleet = load_fleet(args.fleet)
    engine = engine_for(fleet, osinfo_db=args.osinfo_db)
    templates = [(read_file(path), str(path)) for path in args.templates]
    usage = None
    if args.usage:
        from virtpolicy.plan.capacity import read_usage

        usage = read_usage(args.usage, fleet)
    plan = plan_capacity(engine, fleet, templates, args.os_id, args.cpu_ratio, args.ram_ratio, usage)
    print(json.dumps(plan.to_dict(), indent=2, sort_keys=True) if args.format == "json" else to_text(plan))
    return EXIT_OK


def cmd_host(args: argparse.Namespace) -> int:
    from virtpolicy.inputs.capture import bundle_name, capture

    uris = args.connect or ["qemu:///system"]
    if len(uris) == 1:
        for path in capture(uris[0], args.directory, args.arch, args.virttype):
            print(path)
        return EXIT_OK
    names: list[str] = []
    for uri in uris:
        name = bundle_name(uri)
        while name in names:
            name += "-2"
        names.append(name)
        for path in capture(uri, args.directory / name, args.arch, args.virttype):
            print(path)
    return EXIT_OK


def cmd_profiles(args: argparse.Namespace) -> int:
    from virtpolicy.profiles.library import load_profile

    if args.profiles_command == "list":
        from virtpolicy.profiles.library import available

        for name, path in sorted(available(args.profile_path).items()):
            try:
                profile = load_profile(path)
                print(f"{name:<24} {profile.version:<6} {profile.description}")
            except InputError as exc:
                print(f"{name:<24} {'?':<6} unusable: {exc}")
        return EXIT_OK
    if args.profiles_command == "show":
        from virtpolicy.profiles.library import find_profile
        from virtpolicy.profiles.lint import profile_summary

        profile = find_profile(args.name, args.profile_path, where="profiles show", allow_path=True)  # operator's
        print("\n".join(profile_summary(profile)))
        return EXIT_OK
    engine = _engine(args)
    start = time.perf_counter()
    report = engine.check_profiles(args.files or None)
    for finding in report.findings:
        print(finding)
    elapsed = time.perf_counter() - start
    print(
        f"virtpolicy: checked {len(args.files) if args.files else len(engine.profiles())} profile(s), "
        f"{len(report.incompatible)} incompatible pair(s), {len(report.errors)} error(s) in {elapsed:.2f} s",
        file=sys.stderr,
    )
    return EXIT_INPUT if report.errors else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """The REST service on uvicorn; FastAPI is an optional extra, imported only here."""
    try:
        import uvicorn

        from virtpolicy.server.app import Settings, create_app
    except ImportError as exc:
        missing = exc.name or "fastapi"
        raise InputError(f"serve: {missing} is not installed (pip install 'virtpolicy[server]')") from None
    if not 0 < args.port < 65536 or args.workers < 1 or args.timeout <= 0:
        raise InputError("serve: --port is 1-65535, --workers at least 1, --timeout above 0")
    if (args.queue is not None and args.queue < 0) or (args.job_queue is not None and args.job_queue < 1):
        raise InputError("serve: --queue is at least 0, --job-queue at least 1")
    settings = Settings(
        workers=args.workers,
        token_file=args.token_file,
        timeout=args.timeout,
        osinfo_db=args.osinfo_db,
        profile_path=tuple(args.profile_path),
        fleet=args.fleet,
        queue=args.queue,
        job_queue=args.job_queue,
    )
    uvicorn.run(create_app(settings), host=args.bind, port=args.port, log_level="warning")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
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
        if args.command == "whatif":
            return cmd_whatif(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_host(args)
    except (InputError, OutputRejected) as exc:
        print(f"virtpolicy: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `virtpolicy ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a bug: say so in one line unless asked for the traceback
        if os.environ.get("VIRTPOLICY_DEBUG"):
            raise
        print(
            f"virtpolicy: internal error: {type(exc).__name__}: {exc} (VIRTPOLICY_DEBUG=1 shows more)", file=sys.stderr
        )
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
