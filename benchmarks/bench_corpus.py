"""Fidelity on libvirt's own test-suite domains (issue 9): does a complete domain come back unchanged?

Every `tests/qemuxml2xmloutdata/*.x86_64-latest.xml` of libvirt 9.0 (fetched by
scripts/fetch-libvirt-corpus.sh; `--all` adds every other x86 file of that directory) is solved
against the host bundle of the QEMU 7.2 test host (tests/corpus.py) and classified:

- unchanged: output equals input apart from the engine's record and the machine alias made canonical
  (tests/corpus.py normalise(): C14N, whitespace-only text dropped);
- changed: a short unified diff and the element-level causes (what was added, removed or altered);
- conflict: exit 2, the minimal set from stderr;
- input-error: exit 1, the one-line message;
- internal-error: stderr says "internal error" (or holds a Python traceback);
- timeout: no answer within --timeout seconds.

Each file runs in its own subprocess (`python -m virtpolicy.cli solve FILE --host BUNDLE ...`), so a hang
or a memory blow-up stays one timeout and cannot take the run down; --jobs of them run at once. The guest
OS: libvirt's test domains carry no libosinfo metadata, and without it the engine exits 1, so the default
is `--os generic --guest-support lenient` (no osinfo driver list, driver support a preference only):
the check is against the host and the libvirt/QEMU facts, which is what a corpus of OS-less domains can
test. `--os linux2022` (or any id) with `--guest-support strict` checks against a real guest instead, and
`--os none` passes no OS at all (the engine's own no-OS mode, where it has one).

Every exit-0 output is validated with libvirt's RelaxNG schema (`/usr/share/libvirt/schemas/domain.rng`),
and so is every input (for context: a rejected input explains a rejected output).

Run: .venv/bin/python benchmarks/bench_corpus.py [--all] [--json FILE] [--jobs 2] [--timeout 20]
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lxml import etree

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# The engine next to this script, not whatever the venv's editable install points at: a run from a
# snapshot (`git archive HEAD | tar -x -C DIR`, then DIR/benchmarks/bench_corpus.py with
# VIRTPOLICY_LIBVIRT_CORPUS set) measures one commit while others edit the working tree.
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import corpus  # noqa: E402  (test-support module, next to the tests)

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
CATEGORIES = ("unchanged", "changed", "conflict", "input-error", "internal-error", "timeout", "other")
SLOW_S = 10.0
# Attributes that name an element among its siblings in a cause ("devices/input[@type=tablet]"); values
# an engine may fill in (a disk's model, a bus) are left out so that a changed element pairs up as "~".
LABEL_ATTRS = ("type", "device", "name")


@dataclass
class Result:
    file: str
    category: str
    exit: int | None
    seconds: float
    message: str = ""  # input/internal error line, or the conflict's member lines
    diff: str = ""
    causes: list[str] = field(default_factory=list)
    output_schema_error: str | None = None  # exit 0 only: None = valid
    input_schema_error: str | None = None
    slow: bool = False


def _label(el: etree._Element) -> str:
    """An element named by its tag and the attributes that tell siblings apart (type, model, ...)."""
    tag = etree.QName(el).localname if isinstance(el.tag, str) else "#comment"
    attrs = (*LABEL_ATTRS, "model") if tag == "controller" else LABEL_ATTRS
    return tag + "".join(f"[@{a}={el.get(a)}]" for a in attrs if el.get(a) is not None)


def _path(el: etree._Element) -> str:
    parts = []
    node: etree._Element | None = el
    while node is not None and node.getparent() is not None:
        parts.append(_label(node))
        node = node.getparent()
    return "/".join(reversed(parts)) or "domain"


def _own(el: etree._Element) -> tuple[str, tuple[tuple[str, str], ...], str]:
    return (str(el.tag), tuple(sorted(el.attrib.items())), (el.text or "").strip())


def _unmatched(a: list[etree._Element], b: Iterable[etree._Element]) -> list[etree._Element]:
    """Elements of `a` with no equal counterpart (same path, attributes, text) in `b`, as a multiset."""
    pool = Counter((_path(e), _own(e)) for e in b)
    out = []
    for e in a:
        key = (_path(e), _own(e))
        if pool[key]:
            pool[key] -= 1
        else:
            out.append(e)
    return out


def causes(before: bytes, after: bytes) -> list[str]:
    """Element-level differences between two normalised domains, topmost first, as groupable phrases.

    "+ devices/input[@type=tablet]" (added), "- features" (removed), "~ devices/video/address (+bus,+slot)"
    (an element with other attributes). A whole added subtree is named once, by its root.
    """
    old = [e for e in etree.fromstring(before).iter() if isinstance(e.tag, str)]
    new = [e for e in etree.fromstring(after).iter() if isinstance(e.tag, str)]
    added = _unmatched(new, old)
    removed = _unmatched(old, new)
    added_set, removed_set = set(added), set(removed)
    added = [e for e in added if e.getparent() not in added_set]
    removed = [e for e in removed if e.getparent() not in removed_set]
    out: list[str] = []
    by_path_removed: dict[str, list[etree._Element]] = {}
    for e in removed:
        by_path_removed.setdefault(_path(e), []).append(e)
    for e in added:
        path = _path(e)
        if by_path_removed.get(path):
            was = by_path_removed[path].pop(0)
            changed = sorted(
                {f"+{k}" for k in e.attrib if k not in was.attrib}
                | {f"-{k}" for k in was.attrib if k not in e.attrib}
                | {f"{k}={was.get(k)}->{e.get(k)}" for k in e.attrib if k in was.attrib and e.get(k) != was.get(k)}
            )
            if (e.text or "").strip() != (was.text or "").strip():
                changed.append(f"text {(was.text or '').strip()!r}->{(e.text or '').strip()!r}")
            out.append(f"~ {path} ({', '.join(changed)})")
        else:
            out.append(f"+ {path}")
    for path, rest in by_path_removed.items():
        out.extend(f"- {path}" for _ in rest)
    return out


def _pretty(data: bytes) -> list[str]:
    root = etree.fromstring(data)
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode").splitlines()


def short_diff(before: bytes, after: bytes, limit: int = 40) -> str:
    lines = list(difflib.unified_diff(_pretty(before), _pretty(after), "input", "output", n=1, lineterm=""))
    if len(lines) > limit:
        lines = [*lines[:limit], f"... ({len(lines) - limit} more lines)"]
    return "\n".join(lines)


def _schema_error(schema: etree.RelaxNG | None, data: bytes) -> str | None:
    if schema is None:
        return None
    try:
        doc = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        return f"not XML: {exc}"
    if schema.validate(doc):
        return None
    err = schema.error_log.last_error
    return f"line {err.line}: {err.message}" if err else "rejected"


def _conflict_members(stderr: str) -> str:
    return "\n".join(line.strip() for line in stderr.splitlines() if line.strip().startswith("- ")) or stderr.strip()


def run_one(path: Path, bundle: Path, cmd_extra: list[str], timeout: float) -> tuple[Result, bytes | None]:
    """One file through `virtpolicy solve` in its own process, classified; the exit-0 output for validation."""
    cmd = [sys.executable, "-m", "virtpolicy.cli", "solve", str(path), "--host", str(bundle), "-q", *cmd_extra]
    data = path.read_bytes()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return Result(path.name, "timeout", None, round(time.perf_counter() - start, 3), f"> {timeout} s"), None
    seconds = round(time.perf_counter() - start, 3)
    stderr = proc.stderr.decode(errors="replace")
    res = Result(path.name, "other", proc.returncode, seconds, slow=seconds > SLOW_S)
    if "internal error" in stderr or "Traceback (most recent call last)" in stderr:
        res.category, res.message = "internal-error", stderr.strip().splitlines()[-1]
    elif proc.returncode == 0:
        try:
            before, after = corpus.normalise(data), corpus.normalise(proc.stdout)
        except etree.XMLSyntaxError as exc:
            res.message = f"output is not XML: {exc}"
            return res, proc.stdout
        if before == after:
            res.category = "unchanged"
        else:
            res.category = "changed"
            res.diff = short_diff(before, after)
            res.causes = causes(before, after)
    elif proc.returncode == 2:
        res.category, res.message = "conflict", _conflict_members(stderr)
    elif proc.returncode == 1:
        res.category, res.message = "input-error", stderr.strip()
    else:
        res.message = stderr.strip()[-2000:]
    return res, proc.stdout if proc.returncode == 0 else None


def _cause_key(cause: str) -> str:
    """A cause without the values that differ from file to file (attribute values in ~ lines)."""
    if cause.startswith("~ ") and " (" in cause:
        path, detail = cause[2:].split(" (", 1)
        attrs = sorted({part.split("=")[0] for part in detail.rstrip(")").split(", ")})
        return f"~ {path} ({', '.join(attrs)})"
    return cause


def _line_key(line: str) -> str:
    """A conflict member or error line without what differs per file: the file name, line and indexes."""
    line = re.sub(r"^virtpolicy: (error|internal error): \S+?\.xml(:\d+)?: ", r"\1: ", line)
    line = re.sub(r"\d+(\.\d+)? MiB", "N MiB", line)
    return re.sub(r"\[\d+\]", "[n]", line)


def summary(results: list[Result]) -> str:
    """The counts per category, then the recurring causes and conflict members with two example files each."""
    counts = Counter(r.category for r in results)
    rows = [f"{'category':<16}{'files':>6}"]
    rows += [f"{c:<16}{counts.get(c, 0):>6}" for c in CATEGORIES if counts.get(c, 0)]
    rows.append(f"{'total':<16}{len(results):>6}")
    ok = [r for r in results if r.exit == 0]
    rejected = [r for r in ok if r.output_schema_error]
    rows.append(f"exit-0 outputs rejected by domain.rng: {len(rejected)} of {len(ok)}")
    bad_inputs = [r for r in results if r.input_schema_error]
    rows.append(f"inputs rejected by domain.rng: {len(bad_inputs)}")
    rows.append(f"slower than {SLOW_S:.0f} s: {sum(r.slow for r in results)}")
    groups: dict[str, list[str]] = {}
    for r in results:
        for key in sorted({_cause_key(c) for c in r.causes}):
            groups.setdefault(key, []).append(r.file)
    if groups:
        rows.append("\nchanges (files, cause, examples):")
        for key, files in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:40]:
            rows.append(f"{len(files):>5}  {key}  e.g. {', '.join(files[:2])}")
    conflicts: dict[str, list[str]] = {}
    for r in results:
        if r.category in ("conflict", "input-error", "internal-error", "timeout"):
            for line in r.message.splitlines() or [r.category]:
                seen = conflicts.setdefault(f"{r.category}: {_line_key(line)[:200]}", [])
                if r.file not in seen:
                    seen.append(r.file)
    if conflicts:
        rows.append("\nconflict members and errors (files, line, examples):")
        for key, files in sorted(conflicts.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:40]:
            rows.append(f"{len(files):>5}  {key}  e.g. {', '.join(files[:2])}")
    if rejected:
        rows.append("\nschema rejects of outputs:")
        rows += [f"  {r.file}: {r.output_schema_error}" for r in rejected]
    return "\n".join(rows)


def engine_commit() -> str:
    """The commit measured: REPO/COMMIT in a snapshot (written next to `git archive`), else git's HEAD."""
    stamp = REPO / "COMMIT"
    if stamp.is_file():
        return stamp.read_text().strip()
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "virtpolicy"], capture_output=True)
    return proc.stdout.strip() + (" (virtpolicy/ modified)" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every x86 file of qemuxml2xmloutdata, not only -latest")
    ap.add_argument("--json", type=Path, help="write per-file results here")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument(
        "--os", dest="os_id", default="generic", help="guest OS passed to solve (%(default)s; 'none': no --os)"
    )
    ap.add_argument("--guest-support", default="lenient", choices=("strict", "lenient"))
    ap.add_argument("--host", type=Path, help="host bundle (default: assembled from the corpus' QEMU 7.2 data)")
    ap.add_argument("files", nargs="*", type=Path, help="only these files (default: the corpus)")
    args = ap.parse_args(argv)
    if corpus.corpus_dir() is None:
        print("bench_corpus: libvirt corpus not fetched: run scripts/fetch-libvirt-corpus.sh", file=sys.stderr)
        return 1
    files = sorted(args.files) or (corpus.x86_64_files() if args.all else corpus.latest_x86_64_files())
    schema = etree.RelaxNG(etree.parse(str(SCHEMA))) if SCHEMA.exists() else None
    if schema is None:
        print(f"bench_corpus: {SCHEMA} missing: outputs not validated", file=sys.stderr)
    extra = ["--os", args.os_id] if args.os_id != "none" else []
    if args.guest_support == "lenient":
        extra += ["--guest-support", "lenient"]
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        bundle = args.host or corpus.corpus_host_bundle(Path(tmp))
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(lambda p: run_one(p, bundle, extra, args.timeout), files))
        wall = time.perf_counter() - start
    # validation here, in the main thread: one RelaxNG object is not meant to be shared between threads
    results = [r for r, _ in runs]
    for (r, out), path in zip(runs, files, strict=True):
        r.input_schema_error = _schema_error(schema, path.read_bytes())
        if out is not None:
            r.output_schema_error = _schema_error(schema, out)
    print(summary(results))
    print(f"\n{len(files)} files in {wall:.1f} s ({args.jobs} jobs), solve {' '.join(extra)}; {engine_commit()}")
    if args.json:
        payload = {
            "corpus": str(corpus.corpus_dir()),
            "engine_commit": engine_commit(),
            "options": {"os": args.os_id, "guest_support": args.guest_support, "all": args.all},
            "counts": dict(Counter(r.category for r in results)),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
