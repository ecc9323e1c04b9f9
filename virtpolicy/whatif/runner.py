"""Spread what-if cells over worker processes, each holding one Engine.

A cell (OS, host) is independent of every other, so cells are the unit of work. The executor is any
`concurrent.futures.Executor`; the default is a process pool whose workers unpickle the caller's Engine
once (hosts travel with it, osinfo-db is re-opened from its path), which is also how the cluster planner
fans out. `workers=1` runs in this process: no pool, same answers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from virtpolicy.engine import Engine

T = TypeVar("T")
_WORKER_CONTEXT: Any = None  # what every task of this worker gets first: an Engine, or a (before, after) pair


def _init_worker(context: Any) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = context


def _call(task: Callable[..., T], args: tuple[Any, ...]) -> T:
    assert _WORKER_CONTEXT is not None, "worker started without an engine"
    return task(_WORKER_CONTEXT, *args)


def _call_with(context: Any, task: Callable[..., T], args: tuple[Any, ...]) -> T:
    """A Dask task: the engine arrives as a scattered object, deserialised once per worker."""
    return task(context, *args)


def run_tasks(
    engine: Engine | tuple[Engine, ...],
    task: Callable[..., T],
    arguments: Sequence[tuple[Any, ...]],
    workers: int = 0,
    executor: Executor | None = None,
    label: str = "cells",
    client: Any = None,
) -> list[T]:
    """`task(engine, *args)` for every args tuple, results in the order given.

    `workers` 0 means one per CPU (at most one per task); a progress bar goes to stderr when it is a
    terminal. An `executor` passed in is used as it is (it must run `_call` with an initialised engine,
    e.g. one made by `engine_pool`).
    """
    if not arguments:
        return []
    progress = _progress(len(arguments), label)
    try:
        if client is not None:
            return _run_on_dask(client, engine, task, arguments, progress)
        if executor is None and (workers == 1 or len(arguments) == 1):
            results = []
            for args in arguments:
                results.append(task(engine, *args))
                progress(1)
            return results
        own = executor is None
        pool = executor or engine_pool(engine, workers or min(len(arguments), _cpus()))
        try:
            futures: list[Future[T]] = [pool.submit(_call, task, args) for args in arguments]
            for future in futures:
                future.add_done_callback(lambda _f: progress(1))
            return [f.result() for f in futures]
        finally:
            if own:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        progress(0, done=True)


def _run_on_dask(
    client: Any,
    context: Any,
    task: Callable[..., T],
    arguments: Sequence[tuple[Any, ...]],
    progress: Callable[..., None],
) -> list[T]:
    """Dask distributed: the engine is scattered to every worker once, then the tasks go out as futures."""
    shared = client.scatter(context, broadcast=True, hash=False)
    futures = [client.submit(_call_with, shared, task, args, pure=False) for args in arguments]
    for future in futures:
        future.add_done_callback(lambda _f: progress(1))
    return list(client.gather(futures))


def dask_client(scheduler: str) -> Any:
    """A client of a running Dask scheduler ('tcp://host:8786'); InputError when Dask is missing or the
    scheduler does not answer."""
    from virtpolicy.errors import InputError

    try:
        from distributed import Client
    except ImportError:
        raise InputError(
            f"--scheduler {scheduler}: Dask is not installed (pip install 'virtpolicy[distributed]')"
        ) from None
    try:
        return Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"--scheduler {scheduler}: no Dask scheduler answers there ({exc})") from None


def engine_pool(engine: Engine | tuple[Engine, ...], workers: int) -> ProcessPoolExecutor:
    """A process pool whose every worker holds a copy of `engine` (or of each engine of a tuple)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver" if sys.platform == "linux" else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(engine,))


def _cpus() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _progress(total: int, label: str) -> Callable[..., None]:
    """A rich progress bar on a terminal's stderr; nothing otherwise (pipes, tests, CI logs)."""
    if not sys.stderr.isatty() or total < 2:
        return lambda advance, done=False: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(f"virtpolicy: {label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),
    )
    bar.start()
    task = bar.add_task(label, total=total)

    def advance(step: int, done: bool = False) -> None:
        if step:
            bar.advance(task, step)
        if done:
            bar.stop()

    return advance
