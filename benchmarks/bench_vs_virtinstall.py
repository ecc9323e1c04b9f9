"""Whole-process wall time, virtpolicy versus virt-install, for the same VM intent.

What a user (or a provisioning script shelling out) waits for: interpreter start, imports, loading the
host and osinfo, deciding, writing XML. virt-install is run with --print-xml --dry-run against the
libvirt test driver (test:///default), which lives inside the client library: no daemon, nothing to
start, the same on every machine. qemu:///system is tried only when the test driver fails, because it
needs a running libvirtd and its timing then includes the daemon's RPC round trips.

Both tools run with cached bytecode, as any installed package does: virt-install's Debian package
ships .pyc files, while an editable virtpolicy checkout under PYTHONDONTWRITEBYTECODE=1 (set in some
CI and container images) would recompile every module on every run and lose ~50 ms for a reason
unrelated to the engine. So every timed command gets PYTHONPYCACHEPREFIX=<temp dir> with bytecode
writing on: the warm-up runs fill the cache, nothing is written into the source tree. virtpolicy is
also timed once in the inherited environment, to show what that costs here.

Timing uses hyperfine when installed (warm-up runs, then the median of N), else time.perf_counter
around subprocess.run. Afterwards it breaks virtpolicy's own process time down (interpreter start,
imports, one-time loads, solve) so it is clear what dominates.

Run: .venv/bin/python benchmarks/bench_vs_virtinstall.py [--runs N] [--connect URI]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _benchutil import REPO, TYPICAL_XML, emit_json, environment, table

TARGET_SPEEDUP = 2.0
URIS = ("test:///default", "qemu:///system")
VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")

# the virt-install side of "the same intent" as benchmarks/typical.xml
VIRT_INSTALL_ARGS = [
    "--print-xml",
    "--dry-run",
    "--osinfo",
    "fedora37",
    "--name",
    "bench",
    "--memory",
    "2048",
    "--vcpus",
    "2",
    "--disk",
    "size=8",
    "--network",
    "network=default",
    "--graphics",
    "spice",
]

# Runs in a fresh interpreter: where virtpolicy's process time goes, phase by phase, the way
# `virtpolicy solve FILE -q` does it (lazy solver imports included).
PHASES_SNIPPET = r"""
import json, sys, time
t = [time.perf_counter()]
import virtpolicy.cli
t.append(time.perf_counter())
from virtpolicy.sources.build import build
from virtpolicy.outputs.render import render, to_bytes
from virtpolicy.outputs.report import solution_text
from virtpolicy.core.solve import solve
t.append(time.perf_counter())
from pathlib import Path
from virtpolicy.inputs.domain import Domain
from virtpolicy.inputs.guestos import OsinfoDB
from virtpolicy.inputs.host import embedded_host
domain = Domain.from_file(Path(sys.argv[1]))
host = embedded_host()
t.append(time.perf_counter())
guest = OsinfoDB().lookup(domain.os_id.value)
t.append(time.perf_counter())
built = build(domain, host, guest)
solution = solve(built.problem)
xml = to_bytes(render(built, solution))
t.append(time.perf_counter())
names = ["import virtpolicy.cli", "import solver modules", "parse + load host bundle",
         "osinfo index + lookup", "build + solve + render"]
print(json.dumps({n: (b - a) * 1000 for n, a, b in zip(names, t, t[1:])}))
"""


Env = dict[str, str]


def cached_bytecode_env(pycache: Path) -> Env:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def run_ok(cmd: list[str], env: Env) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)


def pick_uri(virt_install: str, forced: str | None, env: Env) -> tuple[str | None, dict[str, str]]:
    """The first URI virt-install can use here, and why the others failed."""
    tried: dict[str, str] = {}
    for uri in [forced] if forced else URIS:
        proc = run_ok([virt_install, "--connect", uri, *VIRT_INSTALL_ARGS], env)
        if proc.returncode == 0 and "<domain" in proc.stdout:
            tried[uri] = "ok"
            return uri, tried
        tried[uri] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return None, tried


Timings = dict[str, dict[str, float]]


def stats(samples: dict[str, list[float]]) -> Timings:
    return {
        name: {
            "median_s": statistics.median(v),
            "mean_s": statistics.fmean(v),
            "min_s": min(v),
            "stddev_s": statistics.stdev(v) if len(v) > 1 else 0.0,
            "runs": len(v),
        }
        for name, v in samples.items()
    }


def time_hyperfine(commands: dict[str, list[str]], runs: int, warmup: int, env: Env, rounds: int) -> Timings:
    """hyperfine in `rounds` blocks that alternate the commands.

    hyperfine runs all of one command before the next; on a shared machine the load drifts between
    them and the comparison picks that up. Blocks of runs, commands alternating, spread the drift over
    all of them; the per-run times of the blocks are merged before taking the median.
    """
    samples: dict[str, list[float]] = {name: [] for name in commands}
    per_round = -(-runs // rounds)
    with tempfile.TemporaryDirectory(prefix="bench-hyperfine-") as tmp:
        out = Path(tmp) / "hf.json"
        for i in range(rounds):
            cmd = ["hyperfine", "--shell=none", "--style", "none", "--runs", str(per_round)]
            cmd += ["--warmup", str(warmup if i == 0 else 1), "--export-json", str(out)]
            for name, argv in commands.items():
                cmd += ["--command-name", name, shlex.join(argv)]
            if subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=False).returncode != 0:
                sys.exit(f"bench_vs_virtinstall: a command failed while timing: {first_failure(commands, env)}")
            for r in json.loads(out.read_text())["results"]:
                samples[r["command"]].extend(r["times"])
    return stats(samples)


def first_failure(commands: dict[str, list[str]], env: Env) -> str:
    """Which command failed, and its last stderr line: a timing of a failing run means nothing."""
    for name, argv in commands.items():
        proc = run_ok(argv, env)
        if proc.returncode != 0:
            return f"{name}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"
    return "none on a re-run (an intermittent failure; run again)"


def time_loop(commands: dict[str, list[str]], runs: int, warmup: int, env: Env, rounds: int) -> Timings:
    """perf_counter around subprocess.run, commands round-robin (see time_hyperfine for why)."""
    del rounds  # every run alternates already
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(warmup + runs):
        for name, argv in commands.items():
            t0 = time.perf_counter()
            proc = subprocess.run(
                argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False
            )
            if proc.returncode != 0:
                sys.exit(f"bench_vs_virtinstall: {name} failed while timing: {proc.stderr.decode().strip()}")
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return stats(samples)


def phase_breakdown(repeats: int, env: Env) -> dict[str, float]:
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        proc = run_ok([PYTHON, "-c", PHASES_SNIPPET, str(TYPICAL_XML)], env)
        if proc.returncode != 0:
            return {}
        for name, ms in json.loads(proc.stdout).items():
            samples.setdefault(name, []).append(ms)
    return {name: round(statistics.median(v), 2) for name, v in samples.items()}


IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")


def import_profile(modules: str, repeats: int, env: Env) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Top imports by self time, and direct imports of the root by cumulative time (ms, medians)."""
    self_us: dict[str, list[int]] = {}
    top_us: dict[str, list[int]] = {}
    for _ in range(repeats):
        proc = run_ok([PYTHON, "-X", "importtime", "-c", f"import {modules}"], env)
        for line in proc.stderr.splitlines():
            m = IMPORTTIME.match(line)
            if not m:
                continue
            own, cumulative, indent, name = int(m[1]), int(m[2]), len(m[3]), m[4]
            self_us.setdefault(name, []).append(own)
            if indent <= 2:  # imported by the -c statement itself, or one level under it
                top_us.setdefault(name, []).append(cumulative)

    def ranked(table_: dict[str, list[int]], n: int) -> list[tuple[str, float]]:
        med = {k: statistics.median(v) / 1000 for k, v in table_.items()}
        return sorted(((k, round(v, 2)) for k, v in med.items()), key=lambda kv: -kv[1])[:n]

    return ranked(self_us, 8), ranked(top_us, 10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="timed runs per command (default %(default)s, at least 15)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4, help="hyperfine blocks, commands alternating (default 4)")
    ap.add_argument("--connect", help=f"virt-install URI (default: the first of {', '.join(URIS)} that works)")
    ap.add_argument("--no-hyperfine", action="store_true", help="time with perf_counter even if hyperfine exists")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pycache-") as tmp:
        return run(args, cached_bytecode_env(Path(tmp)))


def run(args: argparse.Namespace, env: Env) -> int:
    runs = max(args.runs, 15)
    inherited = dict(os.environ)
    no_bytecode = bool(inherited.get("PYTHONDONTWRITEBYTECODE"))

    virtpolicy = str(VENV_BIN / "virtpolicy") if (VENV_BIN / "virtpolicy").exists() else shutil.which("virtpolicy")
    virt_install = shutil.which("virt-install")
    if virtpolicy is None:
        sys.exit("bench_vs_virtinstall: no virtpolicy executable next to this python or on PATH")
    vp_cmd = [virtpolicy, "solve", str(TYPICAL_XML.relative_to(REPO)), "-q"]
    check = run_ok(vp_cmd, env)
    if check.returncode != 0:
        sys.exit(f"bench_vs_virtinstall: {shlex.join(vp_cmd)} exited {check.returncode}: {check.stderr.strip()}")

    uri, tried = (None, {"virt-install": "not installed"})
    if virt_install:
        uri, tried = pick_uri(virt_install, args.connect, env)
    vi_cmd = [virt_install or "virt-install", "--connect", uri or "?", *VIRT_INSTALL_ARGS]

    commands: dict[str, list[str]] = {"virtpolicy solve": vp_cmd}
    if uri:
        commands["virt-install"] = vi_cmd
    commands["virtpolicy --version"] = [virtpolicy, "--version"]
    commands["python -c pass"] = [PYTHON, "-c", "pass"]

    # the same solve as run in the inherited environment: /usr/bin/env restores what differs
    restore = [f"{k}={v}" for k, v in inherited.items() if env.get(k) != v]
    unset = [arg for k in env if k not in inherited for arg in ("-u", k)]
    asis_name = "virtpolicy solve (inherited env" + (", no bytecode cache)" if no_bytecode else ")")
    commands[asis_name] = ["env", *unset, *restore, *vp_cmd]

    hyperfine = shutil.which("hyperfine") if not args.no_hyperfine else None
    timer = time_hyperfine if hyperfine else time_loop
    results = timer(commands, runs, args.warmup, env, args.rounds)
    vp = results["virtpolicy solve"]["median_s"]
    vi = results["virt-install"]["median_s"] if uri else None
    speedup = vi / vp if vi else None

    phases = phase_breakdown(7, env)
    phases_asis = phase_breakdown(7, inherited)
    self_top, cli_top = import_profile("virtpolicy.cli", 5, env)
    _, solve_top = import_profile(
        "virtpolicy.cli, virtpolicy.sources.build, virtpolicy.core.solve, "
        "virtpolicy.outputs.render, virtpolicy.outputs.report",
        5,
        env,
    )

    how = f"hyperfine, {args.rounds} alternating blocks" if hyperfine else "perf_counter, round-robin"
    print(f"whole-process wall time ({how}; {runs}+ runs per command after warm-up)")
    print(f"virt-install URI: {uri or 'none worked'}  (tried: {'; '.join(f'{k}: {v}' for k, v in tried.items())})")
    print("bytecode: cached (PYTHONPYCACHEPREFIX in a temp dir) unless the row says inherited env")
    print()
    print(
        table(
            ["command", "runs", "median ms", "mean ms", "min ms", "stddev ms"],
            [
                [
                    name,
                    int(r["runs"]),
                    r["median_s"] * 1000,
                    r["mean_s"] * 1000,
                    r["min_s"] * 1000,
                    r["stddev_s"] * 1000,
                ]
                for name, r in results.items()
            ],
        )
    )
    print()
    if speedup:
        verdict = "meets" if speedup >= TARGET_SPEEDUP else "MISSES"
        print(f"speed-up virt-install / virtpolicy (medians): {speedup:.2f}x ({verdict} target >= {TARGET_SPEEDUP:g}x)")
    else:
        print("speed-up: n/a (virt-install could not run here)")
    print()
    print("where virtpolicy's process time goes (fresh interpreter, medians of 7 runs; interpreter start")
    print("is the 'python -c pass' row above):")
    print(
        table(
            ["phase", "cached ms", "inherited env ms"],
            [[k, v, phases_asis.get(k, float("nan"))] for k, v in phases.items()],
        )
    )
    print()
    print("python -X importtime -c 'import virtpolicy.cli' (cached bytecode, medians of 5):")
    print(table(["module (top level and direct imports)", "cumulative ms"], cli_top))
    print()
    print(table(["module (any depth)", "self ms"], self_top))
    print()
    print("adding the solver modules 'virtpolicy solve' imports lazily:")
    print(table(["module (top level and direct imports)", "cumulative ms"], solve_top))
    print()
    print("commands (cwd: repository root):")
    for name, argv in commands.items():
        print(f"  {name}: {shlex.join(argv)}")
    emit_json(
        {
            "benchmark": "bench_vs_virtinstall",
            "timer": "hyperfine" if hyperfine else "perf_counter",
            "virt_install_uri": uri,
            "uris_tried": tried,
            "target_speedup": TARGET_SPEEDUP,
            "speedup": round(speedup, 3) if speedup else None,
            "meets_target": bool(speedup and speedup >= TARGET_SPEEDUP),
            "inherited_env_dont_write_bytecode": no_bytecode,
            "results_ms": {
                name: {k.replace("_s", "_ms"): round(v * 1000, 2) for k, v in r.items() if k != "runs"}
                | {"runs": int(r["runs"])}
                for name, r in results.items()
            },
            "virtpolicy_phases_ms": phases,
            "virtpolicy_phases_inherited_env_ms": phases_asis,
            "import_cli_top_cumulative_ms": dict(cli_top),
            "import_top_self_ms": dict(self_top),
            "import_solve_path_top_cumulative_ms": dict(solve_top),
            "commands": {name: shlex.join(argv) for name, argv in commands.items()},
            "cpus": os.cpu_count(),
            "env": environment(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
