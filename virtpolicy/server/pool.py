"""The server's side of its workers: one zygote, pools of warm workers forked from it, a bounded queue.

Requests run in worker processes that each hold a copy of the server's Engine (virtpolicy.server.worker):
the zygote loads and warms the Engine once and forks workers on demand, so a new worker costs a fork,
not an interpreter start and a first solve. The event loop talks to each worker over its own socket
(no threads, no executor): it writes one pickled request and reads the answer's frames as they arrive.

A pool holds `size` workers. A request takes an idle worker, or waits in a queue of at most `queue`
requests; beyond it the request is refused at once (`Saturated`: 429 with Retry-After), so nothing is
queued without bound. A request that runs past the time bound has its worker killed (`TimedOut`); a
worker that dies under a request fails that request only (`WorkerLost`); either way the worker is
replaced and the other requests are not touched.

A host uploaded after the zygote started travels with the first request that needs it on each worker;
the pool knows which host versions (fingerprints) every worker holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virtpolicy.server.worker import BOOT, FORK, FRAME, READY

if TYPE_CHECKING:
    from virtpolicy.engine import Engine
    from virtpolicy.inputs.host import Host

MAX_ZYGOTE_FAILURES = 3  # zygotes that died before they were ready, in a row: then workers cannot start


class Saturated(Exception):
    """The queue is full: answer 429, and say when to retry."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class TimedOut(Exception):
    """A request ran past its time bound; its worker was stopped (503)."""


class WorkerLost(Exception):
    """The worker died under the request, or no worker can be started (503)."""


class _NotTaken(Exception):
    """The worker died before it read the request: the request goes to another worker."""


def _settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Give a waiting request its answer; a request whose event loop has closed meanwhile (the in-process
    tests run one loop per request) is left alone."""
    if future.done():
        return
    with contextlib.suppress(RuntimeError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _kill(pid: int, pidfd: int | None) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


class _Reader:
    """A socket read by whichever event loop is running: callers re-bind it when the loop changes (the
    in-process tests run each request in a loop of its own)."""

    def __init__(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        self.sock = sock
        self.callback = callback
        self.loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is loop or self.sock.fileno() < 0:
            return
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
        loop.add_reader(self.sock.fileno(), self.callback)
        self.loop = loop

    def close(self) -> None:
        if self.loop is not None and not self.loop.is_closed() and self.sock.fileno() >= 0:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
        self.loop = None
        self.sock.close()


class Zygote:
    """The process the workers are forked from (virtpolicy.server.worker.zygote)."""

    def __init__(self, engine: Engine, workdir: Path, hosts: Callable[[], dict[str, str]]) -> None:
        self._engine = engine
        self._workdir = workdir
        self._hosts = hosts  # host id -> fingerprint, as the server has them now
        self._pools: dict[int, Pool] = {}
        self._starts = 0
        self._failures = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.reader: _Reader | None = None
        self.fingerprints: dict[str, str] = {}  # the hosts the zygote's Engine holds (every worker starts so)
        self.ready = False
        self.broken = False

    def register(self, pool: Pool) -> int:
        tag = len(self._pools)
        self._pools[tag] = pool
        return tag

    def start(self) -> None:
        """Start the zygote now; it warms up while the server goes on with its own start."""
        self._starts += 1
        engine_file = self._workdir / f"engine-{self._starts}.pickle"
        engine_file.write_bytes(pickle.dumps(self._engine, protocol=pickle.HIGHEST_PROTOCOL))
        self.fingerprints = dict(self._hosts())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-c", BOOT, json.dumps(sys.path), str(theirs.fileno()), str(engine_file)]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        self.ready = False
        self.reader = _Reader(ours, self._on_message)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.reader is not None:
            self.reader.bind(loop)

    def fork(self, pool: Pool) -> bool:
        """Ask for a worker for `pool`; it arrives in Pool.adopt. False: no zygote can be started."""
        if self.broken:
            return False
        if self.reader is None:
            self.start()
        assert self.reader is not None
        try:
            self.reader.sock.send(FORK + bytes([pool.tag]))
        except OSError:  # the zygote is gone; _on_message will see it and start another
            return True
        return True

    def _on_message(self) -> None:
        assert self.reader is not None
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(self.reader.sock, 64, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                for fd in fds:
                    os.close(fd)
                self._died()
                return
            if message == READY:
                self.ready = True
                self._failures = 0
                continue
            pool = self._pools.get(message[0])
            (pid,) = struct.unpack("!q", message[1:9])
            if pool is None or not fds:
                for fd in fds:
                    os.close(fd)
                continue
            pool.adopt(pid, socket.socket(fileno=fds[0]), dict(self.fingerprints))

    def _died(self) -> None:
        """The zygote ended: start another (workers it forked keep running), or give up after a few
        that died before they were ready."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1)
        if not self.ready:
            self._failures += 1
        self.ready = False
        if self._failures >= MAX_ZYGOTE_FAILURES:
            self.broken = True
            for pool in self._pools.values():
                pool.cannot_start()
            return
        loop = asyncio.get_running_loop()
        self.start()
        self.bind(loop)
        for pool in self._pools.values():
            pool.forks_lost()

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in self._workdir.glob("engine-*.pickle"):
            path.unlink(missing_ok=True)


class Worker:
    def __init__(self, pool: Pool, pid: int, sock: socket.socket, fingerprints: dict[str, str]) -> None:
        self.pool = pool
        self.pid = pid
        try:
            self.pidfd: int | None = os.pidfd_open(pid)  # signals reach this process, never a reused pid
        except (AttributeError, OSError):
            self.pidfd = None
        sock.setblocking(False)
        self.reader = _Reader(sock, self._readable)
        self.hosts = fingerprints  # host id -> fingerprint of the version this worker holds
        self.buffer = bytearray()
        self.future: asyncio.Future[tuple[str, Any]] | None = None
        self.progress: Callable[[int, int], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.taken = False  # the worker has read the current request
        self.alive = True

    def _readable(self) -> None:
        try:
            while True:
                chunk = self.reader.sock.recv(1 << 20)
                if not chunk:
                    self.pool.lost(self)
                    return
                self.buffer += chunk
                if len(chunk) < 1 << 20:
                    break
        except BlockingIOError:
            pass
        except OSError:
            self.pool.lost(self)
            return
        while len(self.buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < FRAME.size + size:
                return
            message = pickle.loads(self.buffer[FRAME.size : FRAME.size + size])
            del self.buffer[: FRAME.size + size]
            if message[0] == "taken":
                self.taken = True
            elif message[0] == "progress":
                if self.progress is not None:
                    self.progress(message[1], message[2])
            else:
                self.pool.finished(self, (message[1], message[2]))

    def exited(self) -> bool:
        """Whether the process has ended (its pidfd is readable), though its socket's EOF is not read yet."""
        if self.pidfd is None:
            return False
        try:
            return bool(select.select([self.pidfd], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        if self.alive:
            _kill(self.pid, self.pidfd)

    def close(self) -> None:
        self.alive = False
        if self.timer is not None:
            self.timer.cancel()
        self.reader.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Pool:
    """`size` workers of one kind (solves, or jobs) forked from the zygote, and a bounded queue."""

    def __init__(self, zygote: Zygote, size: int, timeout: float, queue: int) -> None:
        self.zygote = zygote
        self.size = max(1, size)
        self.timeout = timeout
        self.queue = queue  # requests that may wait for a worker; more are refused (Saturated)
        self.workers: set[Worker] = set()
        self.idle: deque[Worker] = deque()
        self.waiters: deque[asyncio.Future[Worker]] = deque()
        self.starting = 0
        self.replaced = 0  # workers replaced after a time bound or a death
        self.served = 0
        self._service = 0.05  # seconds a request takes in a worker (moving average), for Retry-After
        self.tag = zygote.register(self)

    # --- what the server shows ----------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return sum(1 for w in self.workers if w.future is not None)

    @property
    def waiting(self) -> int:
        return sum(1 for f in self.waiters if not f.done())

    def pids(self) -> list[int]:
        return sorted(w.pid for w in self.workers)

    # --- workers ----------------------------------------------------------------------------------------
    def fill(self) -> None:
        """Ask the zygote for workers until the pool has (or expects) `size` of them."""
        while len(self.workers) + self.starting < self.size:
            if not self.zygote.fork(self):
                self.cannot_start()
                return
            self.starting += 1

    def adopt(self, pid: int, sock: socket.socket, fingerprints: dict[str, str]) -> None:
        self.starting = max(0, self.starting - 1)
        worker = Worker(self, pid, sock, fingerprints)
        if len(self.workers) >= self.size:  # a late answer to a fork asked before a zygote restart
            worker.kill()
            worker.close()
            return
        self.workers.add(worker)
        if self.zygote.reader is not None and self.zygote.reader.loop is not None:
            worker.reader.bind(self.zygote.reader.loop)
        self._release(worker)

    def forks_lost(self) -> None:
        """The zygote died with forks outstanding: ask its successor."""
        self.starting = 0
        if self.workers or self.waiters:
            self.fill()

    def cannot_start(self) -> None:
        """No zygote runs: every waiting request fails (503); later ones fail at once."""
        self.starting = 0
        while self.waiters:
            waiter = self.waiters.popleft()
            _settle(waiter, error=WorkerLost("no worker process can be started"))

    def _release(self, worker: Worker) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(worker)
                return
        self.idle.append(worker)

    def lost(self, worker: Worker) -> None:
        """The worker's socket closed: it died (killed, crashed, or stopped at its time bound)."""
        if not worker.alive:
            return
        self.workers.discard(worker)
        with contextlib.suppress(ValueError):
            self.idle.remove(worker)
        future = worker.future
        worker.future = None
        worker.close()
        self.replaced += 1
        if future is not None:
            _settle(future, error=WorkerLost() if worker.taken else _NotTaken())
        self.fill()

    def finished(self, worker: Worker, answer: tuple[str, Any]) -> None:
        future = worker.future
        worker.future = worker.progress = None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        elapsed = time.monotonic() - worker.started
        self._service += (elapsed - self._service) * 0.1
        self.served += 1
        if future is not None:
            _settle(future, answer)
        self._release(worker)

    def _overrun(self, worker: Worker) -> None:
        if worker.future is not None:
            _settle(worker.future, error=TimedOut())
        worker.kill()  # its socket closes; lost() replaces it

    # --- requests ---------------------------------------------------------------------------------------
    def retry_after(self) -> int:
        """Seconds until the queue has room, at the rate requests have been taking."""
        return max(1, math.ceil((self.waiting + 1) * self._service / self.size))

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.zygote.bind(loop)
        for worker in list(self.workers):
            worker.reader.bind(loop)

    async def run(
        self,
        command: str,
        kwargs: dict[str, Any],
        hosts: dict[str, tuple[str, Host]],
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[str, Any]:
        """Run one request in a worker: (status, payload) as virtpolicy.server.worker.run_request says.

        `hosts` are the loaded hosts the request names (id -> (fingerprint, Host)); a worker that lacks
        one, or holds another version, gets it with the request."""
        loop = asyncio.get_running_loop()
        self.bind(loop)
        for attempt in range(3):
            worker = await self._acquire(loop)
            if progress is not None:
                progress(0, 0)  # running: the total is the worker's to say
            uploads = [(i, host) for i, (fp, host) in hosts.items() if worker.hosts.get(i) != fp]
            data = pickle.dumps((command, kwargs, uploads), protocol=pickle.HIGHEST_PROTOCOL)
            future: asyncio.Future[tuple[str, Any]] = loop.create_future()
            worker.future, worker.progress, worker.started = future, progress, time.monotonic()
            worker.taken = False
            worker.timer = loop.call_later(self.timeout, self._overrun, worker)
            for host_id, (fp, _host) in hosts.items():
                worker.hosts[host_id] = fp
            try:
                await loop.sock_sendall(worker.reader.sock, FRAME.pack(len(data)) + data)
            except OSError:
                self.lost(worker)
            try:
                return await future
            except _NotTaken:  # it died (killed, say) before it read the request: another worker can
                if attempt == 2:
                    raise WorkerLost() from None
        raise AssertionError("unreachable")

    async def _acquire(self, loop: asyncio.AbstractEventLoop) -> Worker:
        while self.idle:
            worker = self.idle.popleft()
            if worker.alive and not worker.exited():
                return worker
            self.lost(worker)  # died while idle: no request of it is lost
        if self.zygote.broken:
            raise WorkerLost("no worker process can be started")
        if self.waiting >= self.queue:
            raise Saturated(self.retry_after())
        waiter: asyncio.Future[Worker] = loop.create_future()
        self.waiters.append(waiter)
        self.fill()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a worker just as the request was cancelled
            raise

    def shutdown(self) -> None:
        for worker in list(self.workers):
            if worker.future is not None:
                _settle(worker.future, error=WorkerLost())
            worker.kill()
            worker.close()
        self.workers.clear()
        self.idle.clear()
