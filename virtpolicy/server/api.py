"""The HTTP side of the REST service: FastAPI routes, problem details, body limit, bearer token.

`build_app(state, cleanup)` is called by `virtpolicy.server.app.create_app` once the workers' zygote is
starting. A domain request is validated here (pydantic), named hosts and profiles are checked against
what is loaded, and the request goes to a worker; the worker's answer is JSON already, sent as it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from virtpolicy import __version__
from virtpolicy.errors import InputError
from virtpolicy.server import models
from virtpolicy.server.app import HostEntry, Job
from virtpolicy.server.pool import Pool, Saturated, TimedOut, WorkerLost
from virtpolicy.server.worker import problem_document

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.server.app import ServerState

PROBLEM_JSON = "application/problem+json"


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

    def document(self) -> dict[str, Any]:
        return problem_document(self.status, self.kind, self.detail, **self.members)


def problem_response(
    status: int, kind: str | None, detail: str | None, headers: dict[str, str] | None = None, **members: Any
) -> JSONResponse:
    body = problem_document(status, kind, detail, **members)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def build_app(state: ServerState, cleanup: Callable[[], Any]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        state.pool.bind(loop)  # read the zygote's answers now: the workers are ready before the first request
        try:
            yield
        finally:
            cleanup()

    app = FastAPI(
        title="virtpolicy",
        version=__version__,
        summary="A policy engine for libvirt domains",
        description="The CLI's commands as JSON endpoints; errors are RFC 9457 problem details (docs/rest.md).",
        lifespan=lifespan,
    )
    app.state.virtpolicy = state
    _install_errors(app)
    app.add_middleware(_BodyLimit, limit=state.settings.max_body)
    if state.token is not None:
        app.add_middleware(_BearerAuth, token=state.token)
    _routes(app, state)
    _openapi(app, with_auth=state.token is not None)
    return app


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

    def too_large(self) -> JSONResponse:
        return problem_response(413, "too-large", f"the request body is over the limit of {self.limit} bytes")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.strip().isdigit():
                    await _send_problem(send, problem_response(400, "bad-input", "Content-Length is not a number"))
                    return
                if int(value) > self.limit:
                    await _send_problem(send, self.too_large())
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
                await _send_problem(send, self.too_large())
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


def _input_problem(data: dict[str, Any]) -> Problem:
    return Problem(400, "bad-input", data["detail"], location=data["location"], input=data["input"], line=data["line"])


# --- routes -----------------------------------------------------------------------------------------
_RETRY_AFTER = {"schema": {"type": "integer", "minimum": 1}, "description": "seconds to wait before retrying"}
_SATURATED: dict[int | str, dict[str, Any]] = {
    429: {
        "model": models.Problem,
        "description": "saturated: the queue of waiting requests is full",
        "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}},
    },
    503: {
        "model": models.Problem,
        "description": "the request ran past its time bound, or its worker died (it was replaced)",
        "headers": {"Retry-After": _RETRY_AFTER},
    },
}
_DOMAIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the CLI's --format json document (docs/json-schema.md, docs/explain-schema.md)"},
    400: {"model": models.Problem, "description": "bad input: malformed or hostile XML, unknown OS, bad member"},
    404: {"model": models.Problem, "description": "the request names a host or profile that is not loaded"},
    422: {"model": models.ConflictProblem, "description": "the requirements conflict"},
    **_SATURATED,
}
_DOCUMENT = {"type": "object", "additionalProperties": True, "required": ["schema", "status"]}


def _routes(app: FastAPI, state: ServerState) -> None:
    from virtpolicy.engine import _parse_profile_spec
    from virtpolicy.profiles.library import check_name, looks_like_path

    engine = state.engine

    def default_host() -> str:
        return next(iter(state.hosts))

    def known_host(host_id: str, where: str) -> str:
        if host_id not in state.hosts:
            raise Problem(404, "unknown-host", f"{where}: no host '{host_id}' is loaded", location=where, input=where)
        return host_id

    def known_hosts(host_ids: list[str], member: str) -> list[str]:
        return [known_host(h, f"{member}[{i}]") for i, h in enumerate(host_ids)]

    def known_profiles(specs: list[str], member: str = "profiles") -> list[str]:
        if not specs:
            return []
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
        host_id = known_host(body.host if body.host is not None else default_host(), "host")
        kwargs = {
            "domain": _utf8(body.domain, "domain"),
            "source": "domain",
            "profiles": known_profiles(body.profiles),
            "os": body.os,
            "guest_support": body.guest_support,
            "host": host_id,
        }
        return kwargs, [host_id]

    async def run(
        pool: Pool,
        command: str,
        kwargs: dict[str, Any],
        host_ids: list[str],
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[str, Any]:
        wanted = {h: (state.hosts[h].fingerprint, engine.host(h)) for h in dict.fromkeys(host_ids) if h in state.hosts}
        try:
            return await pool.run(command, kwargs, wanted, progress)
        except Saturated as exc:
            raise Problem(
                429,
                "saturated",
                f"{pool.waiting} requests are waiting for {pool.size} worker(s), the most this server queues; "
                "retry later",
                {"Retry-After": str(exc.retry_after)},
            ) from None
        except TimedOut:
            raise Problem(
                503, "timeout", f"the request ran past the time bound of {pool.timeout:g} s and was stopped"
            ) from None
        except WorkerLost as exc:
            detail = str(exc) or "the worker process died under this request; it was replaced"
            raise Problem(503, "worker-lost", detail, {"Retry-After": "1"}) from None

    def answer(status: str, payload: Any) -> Response:
        if status == "ok":
            return Response(payload, media_type="application/json")
        if status == "conflict":
            return Response(payload, status_code=422, media_type=PROBLEM_JSON)
        if status == "input":
            raise _input_problem(payload)
        if status == "rejected":
            raise Problem(500, "output-rejected", "the engine produced XML libvirt's schema rejects (a bug)")
        raise Problem(500, "internal", "virtpolicy failed on this request (a bug; the server log has more)")

    async def dispatch(command: str, kwargs: dict[str, Any], host_ids: list[str]) -> Response:
        return answer(*await run(state.pool, command, kwargs, host_ids))

    doc200 = {
        **_DOMAIN_RESPONSES,
        200: {**_DOMAIN_RESPONSES[200], "content": {"application/json": {"schema": _DOCUMENT}}},
    }

    @app.post("/v1/solve", responses=doc200, tags=["domains"], summary="complete a partial domain (virtpolicy solve)")
    async def solve(body: models.SolveRequest) -> Response:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(complete=body.complete, refresh=body.refresh)
        return await dispatch("solve", kwargs, hosts)

    @app.post(
        "/v1/explain", responses=doc200, tags=["domains"], summary="every minimal conflict and correction, or why"
    )
    async def explain(body: models.ExplainRequest) -> Response:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(complete=body.complete, max_conflicts=body.max_conflicts)
        return await dispatch("explain", kwargs, hosts)

    @app.post("/v1/check", responses=doc200, tags=["domains"], summary="check an existing domain, never rewriting it")
    async def check(body: models.CheckRequest) -> Response:
        kwargs, hosts = request_kwargs(body)
        kwargs.update(max_conflicts=body.max_conflicts)
        return await dispatch("check", kwargs, hosts)

    @app.post(
        "/v1/devices/add", responses=doc200, tags=["domains"], summary="a device with a slot the domain can hot-plug"
    )
    async def devices_add(body: models.DeviceRequest) -> Response:
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
            **_SATURATED,
        },
    )
    async def check_profiles(body: models.ProfileCheckRequest) -> Response:
        files = {name: _utf8(text, f"profiles.{name}") for name, text in body.profiles.items()}
        directory = state.workdir / f"lint-{next(state.uploads)}"
        directory.mkdir()
        try:
            for name, data in files.items():
                (directory / name).write_bytes(data)
            status, payload = await run(
                state.pool, "check_profiles", {"files": [directory / n for n in sorted(files)]}, []
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        if status == "ok":  # the client's file names, not the server's directory
            payload = payload.replace(json.dumps(str(directory) + "/")[1:-1].encode(), b"")
        return answer(status, payload)

    # --- hosts ------------------------------------------------------------------------------------
    def host_info(host_id: str) -> models.HostInfo:
        entry = state.hosts[host_id]
        return models.HostInfo(
            id=host_id, fingerprint=entry.fingerprint, arch=engine.host(host_id).arch, uploaded=entry.uploaded
        )

    @app.get("/v1/hosts", tags=["hosts"], summary="the loaded hosts")
    async def list_hosts() -> list[models.HostInfo]:
        return [host_info(h) for h in state.hosts]

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
        unfinished = sum(1 for j in state.jobs.values() if j.finished is None)
        if unfinished >= state.job_queue:
            raise Problem(
                429,
                "saturated",
                f"{unfinished} jobs are queued or running, the most this server takes; retry later",
                {"Retry-After": str(state.jobs_pool.retry_after())},
            )
        job = Job(f"{next(state.job_ids):06d}-{secrets.token_hex(4)}", kind)
        while len(state.jobs) >= state.settings.jobs_kept:
            oldest = next((k for k, j in state.jobs.items() if j.finished is not None), None)
            if oldest is None:
                break
            del state.jobs[oldest]
        state.jobs[job.id] = job

        def progress(done: int, total: int) -> None:
            if job.status == "queued":
                job.status, job.started = "running", time.time()
            job.done, job.total = done, total

        async def work() -> None:
            try:
                status, payload = await run(state.jobs_pool, command, kwargs, host_ids, progress)
                if status == "ok":
                    job.status, job.result = "done", json.loads(payload)
                elif status == "input":
                    job.status, job.problem = "failed", _input_problem(payload).document()
                else:
                    job.status = "failed"
                    job.problem = Problem(500, "internal", "virtpolicy failed on this job (a bug)").document()
            except Problem as exc:
                job.status, job.problem = "failed", exc.document()
            job.started = job.started or time.time()
            job.finished = time.time()

        task = asyncio.get_running_loop().create_task(work())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

    job_responses: dict[int | str, dict[str, Any]] = {
        202: {
            "model": models.JobInfo,
            "description": "accepted: poll the job at Location",
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}", "required": True}},
        },
        404: {"model": models.Problem, "description": "the request names a host or profile that is not loaded"},
        429: {
            "model": models.Problem,
            "description": "saturated: too many jobs are queued or running",
            "headers": {"Retry-After": {**_RETRY_AFTER, "required": True}},
        },
    }

    def fleet_of(host_ids: list[str], member: str) -> list[tuple[str, str]]:
        """(id, fingerprint) of the named hosts, default every loaded host."""
        names = known_hosts(host_ids, member) or list(state.hosts)
        return [(name, state.hosts[name].fingerprint) for name in dict.fromkeys(names)]

    def named_domains(domains: dict[str, str], member: str) -> list[tuple[bytes, str]]:
        return [(_utf8(text, f"{member}.{name}"), name) for name, text in domains.items()]

    @app.post(
        "/v1/whatif/combinations",
        status_code=202,
        tags=["jobs"],
        summary="profile sets that can never be selected together (virtpolicy whatif combinations), as a job",
        responses=job_responses,
    )
    async def whatif_combinations(body: models.WhatifRequest) -> JSONResponse:
        profiles = known_profiles(body.profiles) if body.profiles else sorted(engine.profiles())
        host_ids = known_hosts(body.hosts, "hosts")
        kwargs = {
            "profiles": profiles,
            "oses": list(body.oses),
            "domain": _utf8(body.domain, "domain") if body.domain is not None else None,
            "hosts": host_ids or None,
            "guest_support": body.guest_support,
        }
        return start_job("whatif/combinations", "whatif_combinations", kwargs, host_ids)

    @app.post(
        "/v1/whatif/compare",
        status_code=202,
        tags=["jobs"],
        summary="what existing domains would decide differently on another host or OS (virtpolicy whatif "
        "compare), as a job",
        responses=job_responses,
    )
    async def whatif_compare(body: models.WhatifCompareRequest) -> JSONResponse:
        sides = []
        for member, side in (("before", body.before), ("after", body.after)):
            host = known_host(side.host, f"{member}.host") if side.host is not None else None
            sides.append((host, side.os))
        same = [(h or default_host(), o) for h, o in sides]
        if same[0] == same[1]:
            raise Problem(
                400,
                "bad-input",
                "whatif compare: name what changes: before.host/after.host or before.os/after.os",
                location="body.after",
                input="request",
            )
        kwargs = {"domains": named_domains(body.domains, "domains"), "sides": sides}
        return start_job("whatif/compare", "whatif_compare", kwargs, [h for h, _ in same])

    @app.post(
        "/v1/plan/hosts",
        status_code=202,
        tags=["jobs"],
        summary="on which loaded hosts a domain runs, and why not elsewhere (virtpolicy plan hosts), as a job",
        responses=job_responses,
    )
    async def plan_hosts(body: models.PlanHostsRequest) -> JSONResponse:
        hosts = fleet_of(body.hosts, "hosts")
        kwargs = {
            "hosts": hosts,
            "domain": _utf8(body.domain, "domain"),
            "profiles": known_profiles(body.profiles),
            "os": body.os,
            "guest_support": body.guest_support,
        }
        return start_job("plan/hosts", "plan_hosts", kwargs, [h for h, _ in hosts])

    @app.post(
        "/v1/plan/common",
        status_code=202,
        tags=["jobs"],
        summary="one complete domain that runs on every named host (virtpolicy plan common), as a job",
        responses=job_responses,
    )
    async def plan_common(body: models.PlanCommonRequest) -> JSONResponse:
        hosts = fleet_of(body.hosts, "hosts")
        if body.min_hosts is not None and body.min_hosts > len(hosts):
            raise Problem(
                400,
                "bad-input",
                f"min_hosts: {body.min_hosts} is more than the {len(hosts)} host(s) named",
                location="body.min_hosts",
                input="request",
            )
        kwargs = {
            "hosts": hosts,
            "domain": _utf8(body.domain, "domain"),
            "min_hosts": body.min_hosts,
            "profiles": known_profiles(body.profiles),
            "os": body.os,
            "guest_support": body.guest_support,
        }
        return start_job("plan/common", "plan_common", kwargs, [h for h, _ in hosts])

    @app.post(
        "/v1/plan/migrate",
        status_code=202,
        tags=["jobs"],
        summary="whether a running domain can live-migrate to each named host, and why not (virtpolicy plan "
        "migrate), as a job",
        responses=job_responses,
    )
    async def plan_migrate(body: models.PlanMigrateRequest) -> JSONResponse:
        source = None
        if body.from_ is not None:
            source = (known_host(body.from_, "from"), state.hosts[body.from_].fingerprint)
        hosts = fleet_of(body.to, "to")
        kwargs = {"domain": _utf8(body.domain, "domain"), "source": source, "hosts": hosts, "os": body.os}
        return start_job(
            "plan/migrate", "plan_migrate", kwargs, [h for h, _ in hosts] + ([source[0]] if source else [])
        )

    @app.post(
        "/v1/plan/capacity",
        status_code=202,
        tags=["jobs"],
        summary="how many instances of each template fit, per host and in the fleet (virtpolicy plan capacity), "
        "as a job",
        responses=job_responses,
    )
    async def plan_capacity(body: models.PlanCapacityRequest) -> JSONResponse:
        hosts = fleet_of(body.hosts, "hosts")
        named = {h for h, _ in hosts}
        for host in body.usage:
            if host not in named:
                where = f"usage.{host}"
                raise Problem(404, "unknown-host", f"{where}: no such host among those planned for", location=where)
        kwargs = {
            "hosts": hosts,
            "templates": named_domains(body.templates, "templates"),
            "usage": {h: (u.cpus, u.memory_mib) for h, u in body.usage.items()} or None,
            "os": body.os,
            "cpu_ratio": body.cpu_ratio,
            "ram_ratio": body.ram_ratio,
        }
        return start_job("plan/capacity", "plan_capacity", kwargs, [h for h, _ in hosts])

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
    @app.get("/v1", tags=["service"], summary="version, loaded hosts, the profile library's digest, the load")
    async def service() -> models.ServiceInfo:
        pool = state.pool
        return models.ServiceInfo(
            version=__version__,
            engine_version=__version__,
            api="v1",
            hosts=[host_info(h) for h in state.hosts],
            default_host=default_host(),
            profile_library_digest=_library_digest(engine),
            workers=pool.size,
            load=models.Load(
                in_flight=pool.in_flight,
                waiting=pool.waiting,
                queue=pool.queue,
                jobs_unfinished=sum(1 for j in state.jobs.values() if j.finished is None),
                job_queue=state.job_queue,
                workers_replaced=pool.replaced,
            ),
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
