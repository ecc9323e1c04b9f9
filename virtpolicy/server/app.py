"""The REST service: `create_app(settings)` -> a FastAPI application over one `virtpolicy.Engine`.

Every request goes through the public Engine API, in worker processes (`virtpolicy.server.pool`), so
the event loop only parses, routes and answers. JSON in and out; XML travels as strings; the answers
are exactly the documents the CLI prints with --format json. Errors are RFC 9457 problem details. The
server never reads a path a client sends: domains and devices arrive as text, host bundles are written
to a directory the server owns, and profiles are names on the server's own search path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from virtpolicy import __version__
from virtpolicy.errors import InputError
from virtpolicy.inputs.guestos import DEFAULT_OSINFO_DB
from virtpolicy.inputs.xmlsafe import MAX_INPUT_BYTES
from virtpolicy.server import models
from virtpolicy.server.pool import EnginePool, Saturated, TimedOut, WorkerLost

if TYPE_CHECKING:
    from virtpolicy.engine import Engine

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "urn:virtpolicy:problem:"


@dataclass
class Settings:
    """What `virtpolicy serve` configures; the defaults are the CLI's."""

    workers: int = 2
    token_file: Path | None = None
    timeout: float = 30.0  # seconds a request may run in a worker before it is stopped (503)
    max_body: int = MAX_INPUT_BYTES  # bytes; the CLI's bound on every read
    queue: int = 256  # requests in flight or waiting for a worker before 503
    job_workers: int = 1  # worker processes for what-if and planning jobs (started on the first job)
    job_timeout: float = 600.0
    osinfo_db: Path = DEFAULT_OSINFO_DB
    profile_path: tuple[Path, ...] = ()
    fleet: Path | None = None  # a fleet directory or inventory (virtpolicy plan): its hosts, by name
    engine: Engine | None = None  # an Engine to serve (default: built from osinfo_db and profile_path)


class Problem(Exception):
    """Raised by a handler: answered as application/problem+json."""

    def __init__(
        self, status: int, kind: str, detail: str | None = None, headers: dict[str, str] | None = None, **members: Any
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers
        self.members = members


def problem_response(
    status: int, kind: str | None, detail: str | None, headers: dict[str, str] | None = None, **members: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + kind if kind else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update({k: v for k, v in members.items() if v is not None})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


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
    result: dict[str, Any] | None = None
    problem: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        end = self.finished or time.time()
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "progress": {"done": 1 if self.finished else 0, "total": 1},
            "elapsed_s": round(end - self.started, 3) if self.started else 0.0,
            "result": self.result,
            "problem": self.problem,
        }


MAX_JOBS = 64  # jobs kept; the oldest finished ones are forgotten first


@dataclass
class ServerState:
    engine: Engine
    pool: EnginePool
    workdir: Path
    hosts: dict[str, HostEntry] = field(default_factory=dict)
    token: str | None = None
    uploads: itertools.count = field(default_factory=itertools.count)

    jobs_pool: EnginePool | None = None  # type: ignore[assignment]
    jobs: dict[str, Job] = field(default_factory=dict)
    job_ids: itertools.count = field(default_factory=itertools.count)

    def fingerprints(self) -> dict[str, str]:
        return {k: v.fingerprint for k, v in self.hosts.items()}

    def add_job(self, job: Job) -> None:
        running = sum(1 for j in self.jobs.values() if j.finished is None)
        if running >= MAX_JOBS:
            raise Problem(503, "saturated", f"{running} jobs are running or queued; retry later", {"Retry-After": "5"})
        while len(self.jobs) >= MAX_JOBS:
            oldest = next((k for k, j in self.jobs.items() if j.finished is not None), None)
            if oldest is None:
                break
            del self.jobs[oldest]
        self.jobs[job.id] = job


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
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
    state = ServerState(engine, EnginePool(engine, settings.workers, settings.timeout, settings.queue), workdir)
    state.jobs_pool = EnginePool(engine, settings.job_workers, settings.job_timeout, MAX_JOBS)
    state.token = token
    for host_id, host in engine.hosts.items():
        state.hosts[host_id] = HostEntry(known.get(host_id) or _fingerprint_of(host, fingerprint), None, False)

    def cleanup() -> None:
        state.pool.shutdown()
        state.jobs_pool.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    finalizer = weakref.finalize(state, cleanup)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.pool.start_soon(state.fingerprints())
        try:
            yield
        finally:
            finalizer()

    app = FastAPI(
        title="virtpolicy",
        version=__version__,
        summary="A policy engine for libvirt domains",
        description="The CLI's commands as JSON endpoints; errors are RFC 9457 problem details (docs/rest.md).",
        lifespan=lifespan,
    )
    app.state.virtpolicy = state
    _install_errors(app)
    app.add_middleware(_BodyLimit, limit=settings.max_body)
    if token is not None:
        app.add_middleware(_BearerAuth, token=token)
    _routes(app, state)
    _openapi(app, with_auth=token is not None)
    return app


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


# --- middleware -------------------------------------------------------------------------------------
async def _send_problem(send: Any, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _BodyLimit:
    """413 for a body over the limit, whether announced by Content-Length or not; the body is read whole
    (bounded) before the application sees it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = problem_response(413, "too-large", f"the request body is over the limit of {self.limit} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.strip().isdigit():
                    await _send_problem(send, problem_response(400, "bad-input", "Content-Length is not a number"))
                    return
                if int(value) > self.limit:
                    await _send_problem(send, too_large)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _send_problem(send, too_large)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _BearerAuth:
    """Every request but /healthz carries `Authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/healthz":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):
            detail = "a bearer token is required" if not given else "the bearer token is not valid"
            response = problem_response(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})
            await _send_problem(send, response)
            return
        await self.app(scope, receive, send)


# --- errors -----------------------------------------------------------------------------------------
def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.kind, exc.detail, exc.headers, **exc.members)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        location = ".".join(str(p) for p in first.get("loc", ())) or None
        detail = f"{location}: {first.get('msg', 'invalid request')}" if location else first.get("msg")
        return problem_response(400, "bad-input", detail, location=location, input="request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else None
        return problem_response(exc.status_code, None, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, _exc: Exception) -> JSONResponse:
        return problem_response(500, "internal", "virtpolicy failed on this request (a bug; the server log has more)")


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Problem(
            400, "bad-input", f"{where}: not UTF-8 text ({exc.reason})", location=where, input=where
        ) from None


def _problem_body(problem: Problem) -> dict[str, Any]:
    return json.loads(problem_response(problem.status, problem.kind, problem.detail, **problem.members).body)


def _input_problem(data: dict[str, Any]) -> Problem:
    return Problem(400, "bad-input", data["detail"], location=data["location"], input=data["input"], line=data["line"])


# --- routes -----------------------------------------------------------------------------------------
_DOMAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the CLI's --format json document (docs/json-schema.md, docs/explain-schema.md)"},
    400: {"model": models.Problem, "description": "bad input: malformed or hostile XML, unknown OS, bad member"},
    404: {"model": models.Problem, "description": "the request names a host or profile that is not loaded"},
    422: {"model": models.ConflictProblem, "description": "the requirements conflict"},
    503: {"model": models.Problem, "description": "saturated, or the request ran past its time bound"},
}
_DOCUMENT = {"type": "object", "additionalProperties": True, "required": ["schema", "status"]}


def _routes(app: FastAPI, state: ServerState) -> None:
    from virtpolicy.engine import _parse_profile_spec
    from virtpolicy.profiles.library import check_name, looks_like_path

    engine = state.engine

    def known_host(host_id: str, where: str) -> str:
        if host_id not in state.hosts:
            raise Problem(404, "unknown-host", f"{where}: no host '{host_id}' is loaded", location=where, input=where)
        return host_id

    def known_profiles(specs: list[str], member: str = "profiles") -> list[str]:
        library = engine.profiles()
        for i, spec in enumerate(specs):
            name, _version = _parse_profile_spec(spec)
            where = f"{member}[{i}]"
            try:
                if looks_like_path(name):
                    raise InputError(f"{where}: '{spec[:64]}': give a profile name; the server reads no client paths")
                check_name(name, where)
            except InputError as exc:
                raise Problem(400, "bad-input", str(exc), location=where, input=member) from None
            if name not in library:
                raise Problem(404, "unknown-profile", f"{where}: unknown profile '{name}'", location=where)
        return list(specs)

    def request_kwargs(body: models.DomainRequest) -> tuple[dict[str, Any], list[str]]:
        host_id = known_host(body.host if body.host is not None else next(iter(engine.hosts)), "host")
        kwargs = {
            "domain": _utf8(body.domain, "domain"),
            "source": "domain",
            "profiles": known_profiles(body.profiles),
            "os": body.os,
            "guest_support": body.guest_support,
            "host": host_id,
        }
        return kwargs, [host_id]

    async def run(pool: EnginePool, command: str, kwargs: dict[str, Any], host_ids: list[str]) -> tuple[str, Any]:
        hosts = engine.hosts
        wanted = {h: (state.hosts[h].fingerprint, hosts[h]) for h in host_ids if h in hosts and h in state.hosts}
        try:
            return await pool.run(command, kwargs, pool.uploads_for(wanted), state.fingerprints())
        except Saturated:
            raise Problem(503, "saturated", "every worker is busy; retry later", {"Retry-After": "1"}) from None
        except TimedOut:
            raise Problem(
                503, "timeout", f"the request ran past the time bound of {pool.timeout:g} s and was stopped"
            ) from None
        except WorkerLost:
            raise Problem(503, "worker-lost", "the worker process died under this request; it was replaced") from None

    async def dispatch(command: str, kwargs: dict[str, Any], host_ids: list[str]) -> JSONResponse:
        status, data = await run(state.pool, command, kwargs, host_ids)
        if status == "ok":
            return JSONResponse(data)
        if status == "conflict":
            raise Problem(
                422,
                "conflict",
                "the requirements cannot all hold: `conflicts` holds the minimal sets, `corrections` the smallest "
                "changes that resolve them",
                conflicts=data["conflicts"],
                background=data["background"],
                corrections=data["corrections"],
                result=data["document"],
            )
        if status == "input":
            raise _input_problem(data)
        if status == "rejected":
            raise Problem(500, "output-rejected", "the engine produced XML libvirt's schema rejects (a bug)")
        raise Problem(500, "internal", "virtpolicy failed on this request (a bug; the server log has more)")

    doc200 = {
        **_DOMAIN_RESPONSES,
        200: {**_DOMAIN_RESPONSES[200], "content": {"application/json": {"schema": _DOCUMENT}}},
    }

    @app.post("/v1/solve", responses=doc200, tags=["domains"], summary="complete a partial domain (virtpolicy solve)")
    async def solve(body: models.SolveRequest) -> JSONResponse:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(complete=body.complete, refresh=body.refresh)
        return await dispatch("solve", kwargs, hosts)

    @app.post(
        "/v1/explain", responses=doc200, tags=["domains"], summary="every minimal conflict and correction, or why"
    )
    async def explain(body: models.ExplainRequest) -> JSONResponse:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(complete=body.complete, max_conflicts=body.max_conflicts)
        return await dispatch("explain", kwargs, hosts)

    @app.post("/v1/check", responses=doc200, tags=["domains"], summary="check an existing domain, never rewriting it")
    async def check(body: models.CheckRequest) -> JSONResponse:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(max_conflicts=body.max_conflicts)
        return await dispatch("check", kwargs, hosts)

    @app.post(
        "/v1/devices/add", responses=doc200, tags=["domains"], summary="a device with a slot the domain can hot-plug"
    )
    async def devices_add(body: models.DeviceRequest) -> JSONResponse:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(device=_utf8(body.device, "device"), device_source="device", node=body.node, policy=body.policy)
        return await dispatch("add_device", kwargs, hosts)

    # --- profiles ---------------------------------------------------------------------------------
    @app.get("/v1/profiles", tags=["profiles"], summary="profiles on the server's search path")
    async def list_profiles() -> list[models.ProfileInfo]:
        out = []
        for name in sorted(engine.profiles()):
            try:
                p = engine.profile(name)
                out.append(models.ProfileInfo(name=name, version=p.version, description=p.description, digest=p.digest))
            except InputError as exc:
                out.append(models.ProfileInfo(name=name, error=str(exc)))
        return out

    @app.get(
        "/v1/profiles/{name}",
        tags=["profiles"],
        summary="one profile (virtpolicy profiles show)",
        responses={404: {"model": models.Problem, "description": "no such profile"}},
    )
    async def show_profile(name: str = PathParam(max_length=255)) -> models.ProfileDetail:
        from virtpolicy.profiles.lint import profile_summary

        if looks_like_path(name) or name not in engine.profiles():
            raise Problem(404, "unknown-profile", f"unknown profile '{name[:64]}'", location="name")
        try:
            p = engine.profile(name)
        except InputError as exc:
            raise Problem(400, "bad-input", str(exc), location=exc.location, input=exc.input, line=exc.line) from None
        return models.ProfileDetail(
            name=p.name,
            version=p.version,
            description=p.description,
            digest=p.digest,
            use_when=p.use_when,
            rules=len(p.rules),
            summary=profile_summary(p),
        )

    @app.post(
        "/v1/profiles/check",
        tags=["profiles"],
        summary="lint profiles sent as text (virtpolicy profiles check FILE...)",
        responses={
            200: {
                "description": "the lint document: findings (file:line), pairs that can never be combined",
                "content": {"application/json": {"schema": _DOCUMENT}},
            },
            503: {"model": models.Problem, "description": "saturated, or the request ran past its time bound"},
        },
    )
    async def check_profiles(body: models.ProfileCheckRequest) -> JSONResponse:
        files = {name: _utf8(text, f"profiles.{name}") for name, text in body.profiles.items()}
        directory = state.workdir / f"lint-{next(state.uploads)}"
        directory.mkdir()
        try:
            for name, data in files.items():
                (directory / name).write_bytes(data)
            answer = await dispatch("check_profiles", {"files": [directory / n for n in sorted(files)]}, [])
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        shown = answer.body.decode().replace(json.dumps(str(directory) + "/")[1:-1], "")  # the client's names
        return JSONResponse(json.loads(shown))

    # --- hosts ------------------------------------------------------------------------------------
    def host_info(host_id: str) -> models.HostInfo:
        entry = state.hosts[host_id]
        return models.HostInfo(
            id=host_id, fingerprint=entry.fingerprint, arch=engine.hosts[host_id].arch, uploaded=entry.uploaded
        )

    @app.get("/v1/hosts", tags=["hosts"], summary="the loaded hosts")
    async def list_hosts() -> list[models.HostInfo]:
        return [host_info(h) for h in engine.hosts]

    host_id_param = PathParam(pattern=models.HOST_ID, description="the id requests name the host by")

    @app.put(
        "/v1/hosts/{host_id}",
        tags=["hosts"],
        summary="upload a host bundle; returns its fingerprint",
        responses={
            201: {"model": models.HostInfo, "description": "loaded under a new id"},
            400: {"model": models.Problem, "description": "the bundle cannot be read"},
        },
    )
    async def put_host(body: models.HostBundle, host_id: str = host_id_param) -> JSONResponse:
        from virtpolicy.inputs.hostdevices import NODEDEV_FILE
        from virtpolicy.plan.fleet import fingerprint

        domcaps = body.domcapabilities
        named = domcaps if isinstance(domcaps, dict) else {f"domcaps-{i:02d}.xml": t for i, t in enumerate(domcaps)}
        files = {"capabilities.xml": _utf8(body.capabilities, "capabilities")}
        files.update({name: _utf8(text, f"domcapabilities.{name}") for name, text in named.items()})
        if body.nodedev is not None:
            files[NODEDEV_FILE] = _utf8(body.nodedev, "nodedev")
        directory = state.workdir / f"host-{next(state.uploads)}"
        directory.mkdir()
        for name, data in files.items():
            (directory / name).write_bytes(data)

        def load() -> str:
            digest = fingerprint(directory)  # parses every file (hostile XML refused) before the engine sees it
            engine.add_host(host_id, directory)
            return digest

        try:
            digest = await asyncio.to_thread(load)
        except InputError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            shown = f"host {host_id}"

            def hide(text: str | None) -> str | None:
                return text.replace(str(directory), shown) if text else text

            raise Problem(
                400, "bad-input", hide(str(exc)), location=hide(exc.location), input=hide(exc.input), line=exc.line
            ) from None
        old = state.hosts.get(host_id)
        state.hosts[host_id] = HostEntry(digest, directory, True)
        if old is not None and old.directory is not None:
            shutil.rmtree(old.directory, ignore_errors=True)
        return JSONResponse(
            host_info(host_id).model_dump(),
            status_code=200 if old is not None else 201,
            headers={"Location": f"/v1/hosts/{host_id}"},
        )

    @app.delete(
        "/v1/hosts/{host_id}",
        tags=["hosts"],
        summary="forget a host",
        status_code=204,
        responses={
            404: {"model": models.Problem, "description": "no such host"},
            409: {"model": models.Problem, "description": "the only host; the server needs one"},
        },
    )
    async def delete_host(host_id: str = host_id_param) -> None:
        if host_id not in state.hosts:
            raise Problem(404, "unknown-host", f"no host '{host_id}' is loaded", location="host_id")
        if len(state.hosts) == 1:
            raise Problem(409, "last-host", f"'{host_id}' is the only host; the server needs one")
        engine.remove_host(host_id)
        entry = state.hosts.pop(host_id)
        if entry.directory is not None:
            shutil.rmtree(entry.directory, ignore_errors=True)

    # --- jobs: what-if and planning ---------------------------------------------------------------
    tasks: set[asyncio.Task] = set()

    def start_job(kind: str, command: str, kwargs: dict[str, Any], host_ids: list[str]) -> JSONResponse:
        job = Job(f"{next(state.job_ids):06d}-{secrets.token_hex(4)}", kind)
        state.add_job(job)

        async def work() -> None:
            job.status, job.started = "running", time.time()
            try:
                status, data = await run(state.jobs_pool, command, kwargs, host_ids)
                if status == "ok":
                    job.status, job.result = "done", data
                elif status == "input":
                    job.status, job.problem = "failed", _problem_body(_input_problem(data))
                else:
                    job.status = "failed"
                    job.problem = _problem_body(Problem(500, "internal", "virtpolicy failed on this job (a bug)"))
            except Problem as exc:
                job.status, job.problem = "failed", _problem_body(exc)
            job.finished = time.time()

        task = asyncio.get_running_loop().create_task(work())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    job_responses: dict[int | str, dict[str, Any]] = {
        202: {"model": models.JobInfo, "description": "accepted: poll the job at Location"},
        404: {"model": models.Problem, "description": "the request names a host or profile that is not loaded"},
        503: {"model": models.Problem, "description": "too many jobs"},
    }

    @app.post(
        "/v1/whatif/combinations",
        status_code=202,
        tags=["jobs"],
        summary="profile sets that can never be selected together (virtpolicy whatif combinations), as a job",
        responses=job_responses,
    )
    async def whatif_combinations(body: models.WhatifRequest) -> JSONResponse:
        profiles = known_profiles(body.profiles) if body.profiles else sorted(engine.profiles())
        host_ids = [known_host(h, f"hosts[{i}]") for i, h in enumerate(body.hosts)]
        kwargs = {
            "profiles": profiles,
            "oses": list(body.oses),
            "domain": _utf8(body.domain, "domain") if body.domain is not None else None,
            "hosts": host_ids or None,
            "guest_support": body.guest_support,
        }
        return start_job("whatif/combinations", "whatif_combinations", kwargs, host_ids)

    @app.post(
        "/v1/plan/hosts",
        status_code=202,
        tags=["jobs"],
        summary="on which loaded hosts a domain runs, and why not elsewhere (virtpolicy plan hosts), as a job",
        responses=job_responses,
    )
    async def plan_hosts(body: models.PlanHostsRequest) -> JSONResponse:
        from virtpolicy.plan.fleet import Fleet

        names = [known_host(h, f"hosts[{i}]") for i, h in enumerate(body.hosts)] or list(state.hosts)
        fleet = Fleet()
        loaded = engine.hosts
        for name in names:
            fleet.add(name, loaded[name], state.hosts[name].fingerprint, {}, f"host {name}")
        kwargs = {
            "fleet": fleet,
            "domain": _utf8(body.domain, "domain"),
            "profiles": known_profiles(body.profiles),
            "os": body.os,
            "guest_support": body.guest_support,
        }
        return start_job("plan/hosts", "plan_hosts", kwargs, [])

    @app.get(
        "/v1/jobs/{job_id}",
        tags=["jobs"],
        summary="a job's state and, when done, its result (the CLI's --format json document)",
        responses={404: {"model": models.Problem, "description": "no such job (or forgotten)"}},
    )
    async def get_job(job_id: str = PathParam(max_length=64)) -> models.JobInfo:
        job = state.jobs.get(job_id)
        if job is None:
            raise Problem(404, "unknown-job", f"no job '{job_id[:64]}'", location="job_id")
        return models.JobInfo(**job.to_dict())

    # --- the service ------------------------------------------------------------------------------
    @app.get("/v1", tags=["service"], summary="version, loaded hosts and the profile library's digest")
    async def service() -> models.ServiceInfo:
        return models.ServiceInfo(
            version=__version__,
            engine_version=__version__,
            api="v1",
            hosts=[host_info(h) for h in engine.hosts],
            default_host=next(iter(engine.hosts)),
            profile_library_digest=_library_digest(engine),
            workers=state.pool.workers,
        )

    @app.get("/healthz", tags=["service"], summary="liveness (no token needed)")
    async def healthz() -> models.Health:
        return models.Health(status="ok")


def _library_digest(engine: Engine) -> str:
    from virtpolicy.inputs.xmlsafe import read_file

    digest = hashlib.sha256()
    for name, path in sorted(engine.profiles().items()):
        try:
            content = hashlib.sha256(read_file(path)).hexdigest()
        except (OSError, InputError):
            content = "unreadable"
        digest.update(f"{name}\0{content}\0".encode())
    return digest.hexdigest()[:16]


# --- the OpenAPI document ---------------------------------------------------------------------------
def _openapi(app: FastAPI, with_auth: bool) -> None:
    """FastAPI's document, with every error answer as application/problem+json and the answers every
    operation may give (400, 500; 413 with a body; 401 with a token)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        problem = {"$ref": "#/components/schemas/Problem"}
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", models.Problem.model_json_schema())
        for item in doc.get("paths", {}).values():
            for method, operation in item.items():
                responses = operation.setdefault("responses", {})
                extra = {"400": "bad input", "500": "a bug of virtpolicy (no internals are shown)"}
                if "requestBody" in operation:
                    extra["413"] = "the body is over the limit"
                if with_auth and not (method == "get" and operation.get("operationId", "").startswith("healthz")):
                    extra["401"] = "no valid bearer token"
                    operation["security"] = [{"bearer": []}]
                for code, description in extra.items():
                    responses.setdefault(
                        code, {"description": description, "content": {PROBLEM_JSON: {"schema": problem}}}
                    )
                validation = responses.get("422", {}).get("content", {}).get("application/json", {})
                if "HTTPValidationError" in str(validation):  # FastAPI's own 422: this service answers 400
                    del responses["422"]
                for code, response in responses.items():
                    content = response.get("content", {})
                    if code[0] in "45" and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        for unused in ("HTTPValidationError", "ValidationError"):
            if unused not in str(doc["paths"]):
                schemas.pop(unused, None)
        if with_auth:
            doc["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
