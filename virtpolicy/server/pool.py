"""The worker side of the REST service: requests run in processes that each hold an Engine.

The pool is `virtpolicy.whatif.runner.engine_pool`: every worker unpickles the server's Engine once
(hosts travel with it, osinfo-db is re-opened from its path). A host uploaded after the pool started
travels with each request that names it, with its fingerprint; a worker loads it once per fingerprint.
A worker answers with plain data (a status and the JSON document), never with an exception object, so
nothing of the engine's internals reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from virtpolicy.errors import InputError, OutputRejected, UnknownOSError

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.inputs.host import Host

_LOADED: dict[str, str] = {}  # in a worker: host id -> fingerprint of the uploaded host it holds


class Saturated(Exception):
    """Too many requests are queued for the workers (503 with Retry-After)."""


class TimedOut(Exception):
    """A request ran past its time bound; its worker was stopped (503)."""


class WorkerLost(Exception):
    """A worker process died under the request; the pool was replaced (503)."""


def run_request(
    engine: Engine, command: str, kwargs: dict[str, Any], uploads: list[tuple[str, str, Host]]
) -> tuple[str, Any]:
    """In a worker: one request -> ('ok' | 'conflict' | 'input' | 'rejected' | 'internal', data)."""
    for host_id, fingerprint, host in uploads:
        if _LOADED.get(host_id) != fingerprint:
            engine.add_host(host_id, host)
            _LOADED[host_id] = fingerprint
    try:
        if command in JOBS:
            return "ok", JOBS[command](engine, **kwargs)
        if command == "solve":
            result = engine.solve(**kwargs)
        elif command == "check":
            result = engine.check(**kwargs)
        elif command == "add_device":
            result = engine.add_device(**kwargs)
        elif command == "explain":
            return "ok", engine.explain(**kwargs).to_dict()
        elif command == "check_profiles":
            return "ok", engine.check_profiles(**kwargs).to_dict()
        else:
            return "internal", f"unknown command {command!r}"
        document = result.to_dict()
        if result.feasible or command == "check":
            return "ok", document
        return "conflict", {
            "document": document,
            "conflicts": [{"id": c.id, "members": [m.to_dict() for m in c.members]} for c in result.conflicts],
            "background": [b.to_dict() for b in result.background],
            "corrections": [
                {"id": k.id, "cost": k.cost, "drop": list(k.drop), "actions": list(k.actions)}
                for k in result.corrections
            ],
            "summary": result.summary(),
        }
    except InputError as exc:
        where = exc.input
        if isinstance(exc, UnknownOSError) and where is None:
            where = "os"
        location = exc.location or where or "domain"
        return "input", {"detail": str(exc), "input": where, "line": exc.line, "location": location}
    except OutputRejected:
        return "rejected", None
    except Exception as exc:  # a bug of the engine: named by its type only, never a traceback
        return "internal", type(exc).__name__


def _whatif_combinations(engine: Engine, **kwargs: Any) -> dict[str, Any]:
    from virtpolicy.whatif.report import analyse_combinations

    return analyse_combinations(engine, workers=1, **kwargs).to_dict()


def _plan_hosts(engine: Engine, fleet: Any, **kwargs: Any) -> dict[str, Any]:
    """`virtpolicy plan hosts` over the hosts the request names: an Engine of the fleet's classes."""
    from virtpolicy.engine import Engine
    from virtpolicy.plan.hosts import plan_hosts

    classes = Engine(dict(fleet.classes), osinfo_db=engine.osinfo, profile_path=engine.profile_path)
    return plan_hosts(classes, fleet, source="domain", workers=1, **kwargs).to_dict()


JOBS = {"whatif_combinations": _whatif_combinations, "plan_hosts": _plan_hosts}


def _warm(engine: Engine) -> int:
    """A first solve loads what every later one shares (osinfo-db's index, the rules): ~0.4 s, once."""
    from virtpolicy.cli import EMBEDDED_EXAMPLE

    with contextlib.suppress(Exception):
        engine.solve(EMBEDDED_EXAMPLE.read_bytes())
    return os.getpid()


class EnginePool:
    """A process pool of Engines that is replaced when a request overruns or a worker dies."""

    def __init__(self, engine: Engine, workers: int, timeout: float, queue: int) -> None:
        self.workers = max(1, workers)
        self.timeout = timeout
        self.queue = queue  # requests in flight or waiting, at most
        self._engine = engine
        self._pool: ProcessPoolExecutor | None = None
        self._fingerprints: dict[str, str] = {}  # the hosts the current pool's workers started with
        self._pending = 0
        self._ready: asyncio.Future[None] | None = None  # start_soon's start in its thread
        self.replaced = 0

    def start(self, fingerprints: dict[str, str]) -> None:
        from virtpolicy.whatif.runner import engine_pool

        self._pool = engine_pool(self._engine, self.workers)
        self._fingerprints = dict(fingerprints)
        self.warm()  # every worker starts with the hosts of this snapshot, not with later ones

    def start_soon(self, fingerprints: dict[str, str]) -> None:
        """Start the pool in a thread, so the server answers (/healthz) while the workers come up."""
        self._ready = asyncio.get_running_loop().run_in_executor(None, self.start, fingerprints)

    def warm(self) -> None:
        """Start every worker now (forkserver, Engine unpickled, a first solve), not on the first request."""
        assert self._pool is not None
        from virtpolicy.whatif.runner import _call

        for _ in range(self.workers):
            self._pool.submit(_call, _warm, ())

    def uploads_for(self, hosts: dict[str, tuple[str, Host]]) -> list[tuple[str, str, Host]]:
        """What a request must carry so that a worker has these hosts (id -> (fingerprint, Host)) as the
        server has them now: the ones the pool did not start with."""
        return [(i, fp, host) for i, (fp, host) in hosts.items() if self._fingerprints.get(i) != fp]

    async def run(
        self, command: str, kwargs: dict[str, Any], uploads: list[tuple[str, str, Host]], fingerprints: dict[str, str]
    ) -> tuple[str, Any]:
        from virtpolicy.whatif.runner import _call

        if self._pending >= self.queue:
            raise Saturated()
        if self._ready is not None:
            await self._ready  # every request waits for the same start; done, it returns at once
        if self._pool is None:
            self.start(fingerprints)
        pool = self._pool
        assert pool is not None
        self._pending += 1
        try:
            future = pool.submit(_call, run_request, (command, kwargs, uploads))
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
            except TimeoutError:
                self._replace(pool, fingerprints)
                raise TimedOut() from None
            except BrokenProcessPool:
                self._replace(pool, fingerprints)
                raise WorkerLost() from None
        finally:
            self._pending -= 1

    def _replace(self, pool: ProcessPoolExecutor, fingerprints: dict[str, str]) -> None:
        """Stop every worker of `pool` (the overrunning one among them) and start a fresh pool."""
        if pool is self._pool:
            self.replaced += 1
            self.start(fingerprints)
        _terminate(pool)

    def shutdown(self) -> None:
        if self._pool is not None:
            if self._pending:
                _terminate(self._pool)  # a request still runs: stop its worker instead of waiting for it
            else:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _terminate(pool: ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive() and process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
