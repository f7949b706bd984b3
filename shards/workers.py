"""Ordered parallel map over worker processes that survives a worker dying (an FFmpeg crash, an OOM kill).

:func:`map_isolated` runs ``fn`` over ``items`` in a process pool and yields the results in item order,
keeping at most ``window`` items in flight (results hold encoded clips, so memory stays bounded). When a
worker process dies, Python's pool is broken and every in-flight item fails with it. The items whose results
had already arrived keep them; the others are suspects, and each is run again alone in a fresh one-worker
pool: the one that kills its worker again is the culprit and becomes ``on_crash(item, reason)``; the rest
get their normal results. Then a new pool carries on with the remaining items. A crash thus costs one clip,
not the build.

Workers are started with the ``forkserver`` method where available (fork from a small clean process rather
than from a parent holding threads and open files), else ``spawn``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CRASH_REASON = "the worker process died while processing it (an FFmpeg crash, or killed for memory)"
TIMEOUT_REASON = "timed out after {seconds:g} s in its worker process (a hang inside FFmpeg?)"


def _context() -> mp.context.BaseContext:
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def default_workers() -> int:
    """The CPUs this process may use (its affinity set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_isolated(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    on_crash: Callable[[T, str], R],
    window: int | None = None,
    timeout: float | None = None,
) -> Iterator[R]:
    """``fn(item)`` for every item, in order, in ``workers`` processes (0: in this process, no isolation).

    An item whose worker dies, or that is still running ``timeout`` seconds after the results before it were
    in, gives ``on_crash(item, reason)``: the pool is killed, the items that were in flight run again one at a
    time (with the same timeout), and only the one that crashes or hangs is given up.
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    window = window or 4 * workers
    ctx = _context()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    inflight: deque[tuple[T, Future[R]]] = deque()
    next_item = 0
    try:
        while inflight or next_item < len(items):
            while next_item < len(items) and len(inflight) < window:
                inflight.append((items[next_item], pool.submit(fn, items[next_item])))
                next_item += 1
            item, future = inflight[0]
            try:
                result = future.result(timeout=timeout)
            except (BrokenProcessPool, TimeoutError):
                _kill(pool)
                suspects = list(inflight)
                inflight.clear()
                for suspect, fut in suspects:
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        yield fut.result()
                    else:
                        yield _run_alone(fn, suspect, ctx, on_crash, timeout)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
                continue
            inflight.popleft()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop a pool now, hung workers included (``shutdown`` alone would wait for them)."""
    processes = getattr(pool, "_processes", None) or {}  # no public handle on the workers
    for process in list(processes.values()):
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _run_alone(
    fn: Callable[[T], R],
    item: T,
    ctx: mp.context.BaseContext,
    on_crash: Callable[[T, str], R],
    timeout: float | None,
) -> R:
    pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
    try:
        return pool.submit(fn, item).result(timeout=timeout)
    except BrokenProcessPool:
        return on_crash(item, CRASH_REASON)
    except TimeoutError:
        return on_crash(item, TIMEOUT_REASON.format(seconds=timeout))
    finally:
        _kill(pool)
