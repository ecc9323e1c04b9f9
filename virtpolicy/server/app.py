"""The REST service: `create_app(settings)` -> a FastAPI application over one `virtpolicy.Engine`.

Every request goes through the public Engine API, in worker processes (`virtpolicy.server.pool`), so
the event loop only parses, routes and answers. JSON in and out; XML travels as strings; the answers
are exactly the documents the CLI prints with --format json. Errors are RFC 9457 problem details. The
server never reads a path a client sends: domains and devices arrive as text, host bundles are written
to a directory the server owns, and profiles are names on the server's own search path.

This module imports FastAPI only inside `create_app`, after it has started the workers' zygote: the
workers warm up while FastAPI loads (virtpolicy.server.api holds the HTTP side).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtpolicy.errors import InputError
from virtpolicy.inputs.guestos import DEFAULT_OSINFO_DB
from virtpolicy.inputs.xmlsafe import MAX_INPUT_BYTES
from virtpolicy.server.pool import Pool, Zygote

if TYPE_CHECKING:
    from fastapi import FastAPI

    from virtpolicy.engine import Engine

for _extra in ("fastapi", "uvicorn"):  # `virtpolicy serve` names the missing extra in one line
    if importlib.util.find_spec(_extra) is None:
        raise ImportError(f"No module named '{_extra}'", name=_extra)

QUEUE_ENV, JOB_QUEUE_ENV = "VIRTPOLICY_SERVE_QUEUE", "VIRTPOLICY_SERVE_JOB_QUEUE"


@dataclass
class Settings:
    """What `virtpolicy serve` configures; the defaults are the CLI's."""

    workers: int = 2
    token_file: Path | None = None
    timeout: float = 30.0  # seconds a request may run in a worker before it is stopped (503)
    max_body: int = MAX_INPUT_BYTES  # bytes; the CLI's bound on every read
    queue: int | None = None  # requests that may wait for a worker, beyond it 429 ($VIRTPOLICY_SERVE_QUEUE, 256)
    job_workers: int = 1  # worker processes for what-if and planning jobs (started on the first job)
    job_timeout: float = 600.0
    job_queue: int | None = None  # jobs queued or running, beyond it 429 ($VIRTPOLICY_SERVE_JOB_QUEUE, 16)
    jobs_kept: int = 64  # jobs remembered (the oldest finished ones are forgotten first)
    osinfo_db: Path = DEFAULT_OSINFO_DB
    profile_path: tuple[Path, ...] = ()
    fleet: Path | None = None  # a fleet directory or inventory (virtpolicy plan): its hosts, by name
    engine: Engine | None = None  # an Engine to serve (default: built from osinfo_db and profile_path)


def _bound(value: int | None, variable: str, default: int) -> int:
    if value is None:
        text = os.environ.get(variable, "").strip()
        if not text:
            return default
        if not text.isdigit():
            raise InputError(f"serve: {variable}={text[:32]!r}: give a whole number (0 or more)")
        value = int(text)
    if value < 0:
        raise InputError(f"serve: a queue bound of {value}: give 0 or more")
    return value


@dataclass
class HostEntry:
    fingerprint: str
    directory: Path | None  # the server-owned copy of an uploaded bundle
    uploaded: bool


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"  # queued | running | done | failed
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: int = 0  # progress: tasks done of total (cells, domains, host-class batches; 1 for the others)
    total: int = 0
    result: dict[str, Any] | None = None
    problem: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        end = self.finished or time.time()
        total = max(self.total, 1) if self.status == "done" else self.total
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": {"done": total if self.status == "done" else min(self.done, total), "total": total},
            "elapsed_s": round(end - self.started, 3) if self.started else 0.0,
            "result": self.result,
            "problem": self.problem,
        }


@dataclass
class ServerState:
    engine: Engine
    zygote: Zygote
    pool: Pool  # solves, explain, check, devices/add, profiles/check
    jobs_pool: Pool  # what-if and planning
    workdir: Path
    settings: Settings
    queue: int
    job_queue: int
    hosts: dict[str, HostEntry] = field(default_factory=dict)
    token: str | None = None
    uploads: itertools.count = field(default_factory=itertools.count)
    jobs: dict[str, Job] = field(default_factory=dict)
    job_ids: itertools.count = field(default_factory=itertools.count)

    def fingerprints(self) -> dict[str, str]:
        return {k: v.fingerprint for k, v in self.hosts.items()}

    def shutdown(self) -> None:
        """Stop every worker and the zygote (a later request starts them again)."""
        self.pool.shutdown()
        self.jobs_pool.shutdown()
        self.zygote.shutdown()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    queue = _bound(settings.queue, QUEUE_ENV, 256)
    job_queue = _bound(settings.job_queue, JOB_QUEUE_ENV, 16)
    from virtpolicy.engine import Engine
    from virtpolicy.plan.fleet import fingerprint

    known: dict[str, str] = {}  # host id -> fingerprint, when the fleet already computed it
    hosts: dict[str, Any] | None = None
    if settings.fleet is not None:
        from virtpolicy.plan.fleet import load_fleet

        fleet = load_fleet(settings.fleet)
        hosts = {h.name: fleet.classes[h.host_class] for h in fleet.hosts}
        known = {h.name: h.host_class for h in fleet.hosts}
        if not hosts:
            raise InputError(f"{settings.fleet}: the fleet has no hosts")
    engine = settings.engine or Engine(hosts, osinfo_db=settings.osinfo_db, profile_path=settings.profile_path)
    token = _read_token(settings.token_file) if settings.token_file else None
    workdir = Path(tempfile.mkdtemp(prefix="virtpolicy-server-"))
    entries = {
        host_id: HostEntry(known.get(host_id) or _fingerprint_of(host, fingerprint), None, False)
        for host_id, host in engine.hosts.items()
    }
    zygote = Zygote(engine, workdir, lambda: {k: v.fingerprint for k, v in entries.items()})
    state = ServerState(
        engine,
        zygote,
        Pool(zygote, settings.workers, settings.timeout, queue),
        Pool(zygote, settings.job_workers, settings.job_timeout, job_queue),
        workdir,
        settings,
        queue,
        job_queue,
        hosts=entries,
        token=token,
    )
    zygote.start()
    state.pool.fill()  # the zygote forks the workers as soon as it is warm, while FastAPI loads here

    def cleanup() -> None:
        state.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    finalizer = weakref.finalize(state, cleanup)
    try:
        from virtpolicy.server.api import build_app
    except ImportError as exc:
        finalizer()
        raise InputError(
            f"serve: {exc.name or 'fastapi'} is not installed (pip install 'virtpolicy[server]')"
        ) from None
    return build_app(state, finalizer)


def _fingerprint_of(host: Any, fingerprint: Any) -> str:
    """The bundle's fingerprint (virtpolicy.plan.fleet); a digest of the loaded host when it has no files."""
    try:
        return fingerprint(Path(host.source))
    except (OSError, InputError):
        import pickle

        return hashlib.sha256(pickle.dumps(host)).hexdigest()[:16]


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the token file: {getattr(exc, 'strerror', None) or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise InputError(f"{path}: the token file must hold one token (no blanks)")
    return token
