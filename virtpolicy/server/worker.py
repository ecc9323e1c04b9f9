"""The worker side of the REST service: a zygote process and the solver workers it forks.

The zygote is started once by the server (`python -c ... zygote`), unpickles the server's Engine, warms
it with a first solve (osinfo-db's index, the rules, the lazily imported solver modules) and freezes
the heap; then it forks a worker whenever the server asks for one. A worker starts warm and costs a
fork, so a worker that died or was stopped at its time bound is replaced in milliseconds.

Each worker talks to the server over its own Unix socket (the zygote hands the server its end with
SCM_RIGHTS): length-prefixed pickled frames. A request is `(command, kwargs, uploads)`; the answer is
`("done", status, payload)`, preceded by `("taken",)` as soon as the worker has read the request and,
for jobs, by `("progress", done, total)` frames. The payload of a
document is its JSON, encoded here, so the server sends bytes it never decodes or re-encodes. A worker
answers with plain data, never an exception object, so nothing of the engine's internals reaches a
client. This module imports neither FastAPI nor anything of the server's HTTP side.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtpolicy.engine import Engine

FRAME = struct.Struct("!Q")
PROBLEM_TYPE = "urn:virtpolicy:problem:"
FORK, READY = b"F", b"R"  # zygote control messages: fork request (+ a pool tag byte), warm-up done
CONFLICT_DETAIL = (
    "the requirements cannot all hold: `conflicts` holds the minimal sets, `corrections` the smallest changes "
    "that resolve them"
)


def problem_document(status: int, kind: str | None, detail: str | None, **members: Any) -> dict[str, Any]:
    """RFC 9457 problem details as a dict; members that are None are left out."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + kind if kind else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    body.update({k: v for k, v in members.items() if v is not None})
    return body


def to_json(document: Any) -> bytes:
    """The JSON an answer carries (as Starlette's JSONResponse renders it, minus the spaces)."""
    return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# --- framing ------------------------------------------------------------------------------------
def send_frame(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(FRAME.pack(len(data)) + data)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buffer)


def recv_frame(sock: socket.socket) -> Any:
    """The next message, or None when the server has gone."""
    head = _recv_exactly(sock, FRAME.size)
    if head is None:
        return None
    data = _recv_exactly(sock, FRAME.unpack(head)[0])
    return None if data is None else pickle.loads(data)


# --- one request --------------------------------------------------------------------------------
Progress = Callable[[int, int], None]


def run_request(engine: Engine, command: str, kwargs: dict[str, Any], progress: Progress) -> tuple[str, Any]:
    """One request -> ('ok' | 'conflict' | 'input' | 'rejected' | 'internal', payload).

    'ok' and 'conflict' carry JSON (the document; the 422 problem body); 'input' the members of a 400.
    """
    from virtpolicy.errors import InputError, OutputRejected, UnknownOSError

    try:
        if command in JOBS:
            return "ok", to_json(JOBS[command](engine, progress, **kwargs))
        if command == "solve":
            result = engine.solve(**kwargs)
        elif command == "check":
            result = engine.check(**kwargs)
        elif command == "add_device":
            result = engine.add_device(**kwargs)
        elif command == "explain":
            return "ok", to_json(engine.explain(**kwargs).to_dict())
        elif command == "check_profiles":
            return "ok", to_json(engine.check_profiles(**kwargs).to_dict())
        else:
            return "internal", f"unknown command {command!r}"
        document = result.to_dict()
        if result.feasible or command == "check":
            return "ok", to_json(document)
        return "conflict", to_json(
            problem_document(
                422,
                "conflict",
                CONFLICT_DETAIL,
                conflicts=[{"id": c.id, "members": [m.to_dict() for m in c.members]} for c in result.conflicts],
                background=[b.to_dict() for b in result.background],
                corrections=[
                    {"id": k.id, "cost": k.cost, "drop": list(k.drop), "actions": list(k.actions)}
                    for k in result.corrections
                ],
                result=document,
            )
        )
    except InputError as exc:
        where = exc.input
        if isinstance(exc, UnknownOSError) and where is None:
            where = "os"
        location = exc.location or where or "domain"
        return "input", {"detail": str(exc), "input": where, "line": exc.line, "location": location}
    except OutputRejected:
        return "rejected", None
    except Exception as exc:  # a bug of the engine: named in the server log, never shown to the client
        print(f"virtpolicy serve: internal error in {command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("VIRTPOLICY_DEBUG"):
            import traceback

            traceback.print_exc()
        return "internal", type(exc).__name__


# --- jobs: the CLI's what-if and planning commands, through the same public functions ------------------
class InlineExecutor(Executor):
    """An Executor for `virtpolicy.whatif.runner.run_tasks` that runs each task here, in the job's
    worker, when its result is first wanted, and reports (done, submitted) after each one. run_tasks
    submits every task before it asks for the first result, so the total is known from then on."""

    def __init__(self, context: Any, progress: Progress) -> None:
        from virtpolicy.whatif.runner import _init_worker

        _init_worker(context)  # what runner._call hands every task: the engine (or the pair of engines)
        self._pending: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._progress = progress
        self.done = self.total = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = _LazyFuture(self)
        self._pending.append((future, lambda: fn(*args, **kwargs), ()))
        self.total += 1
        return future

    def run_until(self, future: Future[Any]) -> None:
        while not future.done() and self._pending:
            task_future, call, _ = self._pending.popleft()
            if task_future.set_running_or_notify_cancel():
                try:
                    task_future.set_result(call())
                except BaseException as exc:  # handed to whoever asks for the result, as a pool would
                    task_future.set_exception(exc)
            self.done += 1
            self._progress(self.done, self.total)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            for future, _, _ in self._pending:
                future.cancel()
            self._pending.clear()


class _LazyFuture(Future):
    def __init__(self, executor: InlineExecutor) -> None:
        super().__init__()
        self._executor = executor

    def result(self, timeout: float | None = None) -> Any:
        self._executor.run_until(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._executor.run_until(self)
        return super().exception(timeout)


def _fleet(engine: Engine, hosts: list[tuple[str, str]]) -> Any:
    """A Fleet of loaded hosts (id, fingerprint): each host its own entry, classes by fingerprint."""
    from virtpolicy.plan.fleet import Fleet

    fleet = Fleet()
    for name, fingerprint in hosts:
        fleet.add(name, engine.host(name), fingerprint, {}, f"host {name}")
    return fleet


def _options(engine: Engine) -> dict[str, Any]:
    return {"osinfo_db": engine.osinfo, "profile_path": engine.profile_path}


def _whatif_combinations(engine: Engine, progress: Progress, **kwargs: Any) -> dict[str, Any]:
    from virtpolicy.whatif.report import analyse_combinations

    return analyse_combinations(engine, executor=InlineExecutor(engine, progress), **kwargs).to_dict()


def _whatif_compare(
    engine: Engine, progress: Progress, domains: list[tuple[bytes, str]], sides: list[tuple[str | None, str | None]]
) -> dict[str, Any]:
    """`virtpolicy whatif compare`: the sides are (host id or None for the default, OS or None)."""
    from virtpolicy.engine import Engine
    from virtpolicy.whatif.compare import Side, compare_domains

    default = next(iter(engine.hosts))
    engines = tuple(Engine({h or default: engine.host(h or default)}, **_options(engine)) for h, _ in sides)

    def label(host: str | None, os_id: str | None) -> str:
        return ", ".join(p for p in (f"host {host}" if host else "", f"os {os_id}" if os_id else "") if p) or "as given"

    pair = tuple(Side(label(h, o), o) for h, o in sides)
    report = compare_domains(engines[0], engines[1], domains, pair, executor=InlineExecutor(engines, progress))  # type: ignore[arg-type]
    return report.to_dict()


def _plan_hosts(
    engine: Engine, progress: Progress, hosts: list[tuple[str, str]], domain: bytes, **kwargs: Any
) -> dict[str, Any]:
    from virtpolicy.plan.hosts import engine_for, plan_hosts

    fleet = _fleet(engine, hosts)
    classes = engine_for(fleet, **_options(engine))
    classes.build(domain, source="domain", **kwargs)  # bad input fails here, once, as in the CLI
    executor = InlineExecutor(classes, progress)
    # workers only sizes the batches of classes here (about 32 of them: a progress step each)
    return plan_hosts(classes, fleet, domain, "domain", workers=8, executor=executor, **kwargs).to_dict()


def _plan_common(
    engine: Engine, progress: Progress, hosts: list[tuple[str, str]], domain: bytes, min_hosts: int | None,
    **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """`virtpolicy plan common [--min-hosts K]`, as cmd_plan_common composes it."""
    from virtpolicy.cli import names_of
    from virtpolicy.errors import InputError
    from virtpolicy.plan.common import choose_classes, plan_common
    from virtpolicy.plan.fleet import classes_of
    from virtpolicy.plan.hosts import engine_for

    fleet = _fleet(engine, hosts)
    classes_engine = engine_for(fleet, **_options(engine))
    classes = classes_of(fleet.hosts)
    choice = None
    if min_hosts is not None:
        choice = choose_classes(fleet.classes, {c: len(fleet.members(c)) for c in classes}, min_hosts)
        if choice is None:
            raise InputError(f"min_hosts: the fleet has only {len(fleet.hosts)} host(s), fewer than {min_hosts}")
        classes = list(choice.chosen)
    progress(0, 1)
    names = {c: names_of(fleet, c) for c in classes}
    plan = plan_common(classes_engine, classes, domain, "domain", names=names, **kwargs)
    report = plan.to_dict()
    if choice is not None:
        report["left_out"] = [
            {"class": c, "hosts": names_of(fleet, c), "would_lose": list(choice.cost_of[c])} for c in choice.left_out
        ]
    return report


def _plan_migrate(
    engine: Engine, progress: Progress, domain: bytes, source: tuple[str, str] | None, hosts: list[tuple[str, str]],
    os: str | None,
) -> dict[str, Any]:  # fmt: skip
    """`virtpolicy plan migrate --from HOST --fleet F`, as cmd_plan_migrate composes it."""
    from virtpolicy.engine import Engine
    from virtpolicy.plan.migrate import plan_migrate, to_dict

    fleet = _fleet(engine, hosts)
    destinations = list(fleet.classes)
    source_class = None
    if source is not None:
        source_class = source[1]
        if source_class not in fleet.classes:
            fleet.classes[source_class] = engine.host(source[0])
    names = {c: ", ".join(h.name for h in fleet.members(c)) for c in fleet.classes}
    if source is not None:
        names[source_class] = names.get(source_class) or source[0]  # type: ignore[index]
    classes = Engine(dict(fleet.classes), **_options(engine))
    progress(0, 1)
    verdicts = plan_migrate(classes, domain, "domain", destinations, source_class, os)
    return to_dict("domain", names.get(source_class or ""), verdicts, names)


def _plan_capacity(
    engine: Engine, progress: Progress, hosts: list[tuple[str, str]], templates: list[tuple[bytes, str]],
    usage: dict[str, tuple[float, float]] | None, **kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """`virtpolicy plan capacity [--usage FILE]`; usage is host -> (vCPUs, MiB), as read_usage reads it."""
    from virtpolicy.plan.capacity import Usage, plan_capacity
    from virtpolicy.plan.hosts import engine_for

    fleet = _fleet(engine, hosts)
    classes = engine_for(fleet, osinfo_db=engine.osinfo)
    used = {name: Usage(float(cpus), int(mib * 1024)) for name, (cpus, mib) in usage.items()} if usage else None
    progress(0, 1)
    return plan_capacity(classes, fleet, templates, usage=used, **kwargs).to_dict()


JOBS: dict[str, Callable[..., dict[str, Any]]] = {
    "whatif_combinations": _whatif_combinations,
    "whatif_compare": _whatif_compare,
    "plan_hosts": _plan_hosts,
    "plan_common": _plan_common,
    "plan_migrate": _plan_migrate,
    "plan_capacity": _plan_capacity,
}


# --- the worker loop ----------------------------------------------------------------------------
def serve(sock: socket.socket, engine: Engine) -> None:
    """Answer requests on `sock` until the server closes it."""
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 0.05 or done >= total:
            last = now
            send_frame(sock, ("progress", done, total))

    taken = pickle.dumps(("taken",), protocol=pickle.HIGHEST_PROTOCOL)
    taken = FRAME.pack(len(taken)) + taken
    while True:
        message = recv_frame(sock)
        if message is None:
            return
        sock.sendall(taken)  # the server may give a request to another worker only until it hears this
        command, kwargs, uploads = message
        for host_id, host in uploads:  # hosts this worker lacks or holds in an older version
            engine.add_host(host_id, host)
        status, payload = run_request(engine, command, kwargs, progress)
        send_frame(sock, ("done", status, payload))


def _warm(engine: Engine) -> None:
    """A first solve loads what every later one shares (osinfo-db's index, the rules): ~0.3 s, once."""
    from virtpolicy.cli import EMBEDDED_EXAMPLE

    with contextlib.suppress(Exception):
        engine.solve(EMBEDDED_EXAMPLE.read_bytes())


def zygote(control_fd: int, engine_file: str) -> None:
    """The zygote's main: load and warm the Engine, then fork a worker for each request of the server.

    A request is FORK + a tag byte; the answer is the tag and the worker's pid, with the server's end of
    the worker's socket attached. The zygote exits when the server closes the control socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it stops us
    control = socket.socket(fileno=control_fd)
    with open(engine_file, "rb") as f:
        engine = pickle.load(f)
    with contextlib.suppress(OSError):
        os.unlink(engine_file)  # the server's copy for this zygote only
    _warm(engine)
    gc.collect()
    gc.freeze()  # the warm heap stays shared with the workers (no collection touches its pages)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    with contextlib.suppress(OSError):  # the server has gone: so does the zygote, quietly
        control.send(READY)
        while _fork_one(control, engine):
            pass


def _fork_one(control: socket.socket, engine: Engine) -> bool:
    """Wait for the server's next request and fork a worker for it; False when the server has gone."""
    message = control.recv(16)
    if not message:
        return False
    if message[:1] == FORK:
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            control.close()
            ours.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                serve(theirs, engine)
            except BaseException:  # the server's end is gone, or a bug: either way this worker ends
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        try:
            socket.send_fds(control, [message[1:2] + struct.pack("!q", pid)], [ours.fileno()])
        finally:
            ours.close()
    return True


BOOT = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from virtpolicy.server.worker import zygote; zygote(int(sys.argv[2]), sys.argv[3])"
)
