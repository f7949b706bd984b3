"""Test-only fault injection for the shard builder: make one clip's worker crash or hang, on purpose.

The worker-isolation tests need an FFmpeg crash and an FFmpeg hang on demand. Two environment variables ask for
them; :func:`shards.build.build_dataset` passes its clip function through :func:`with_faults` once, which
returns the function unchanged when neither is set, so a normal build never runs this code.

- ``FASTAV_SHARDS_TEST_CRASH_ON=TEXT``: the worker given a clip whose source contains TEXT kills itself with
  SIGSEGV (what a crash inside FFmpeg looks like to the pool).
- ``FASTAV_SHARDS_TEST_HANG_ON=TEXT``: the worker given such a clip never returns (an FFmpeg hang).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol, TypeVar

CRASH_ENV = "FASTAV_SHARDS_TEST_CRASH_ON"
HANG_ENV = "FASTAV_SHARDS_TEST_HANG_ON"


class _HasSource(Protocol):
    source: str


J = TypeVar("J", bound=_HasSource)
R = TypeVar("R")


def with_faults(fn: Callable[[J], R]) -> Callable[[J], R]:
    """``fn``, or ``fn`` behind the crash / hang the environment asks for (read here, once, in the parent)."""
    crash_on, hang_on = os.environ.get(CRASH_ENV), os.environ.get(HANG_ENV)
    if not crash_on and not hang_on:
        return fn
    return partial(_faulty, fn=fn, crash_on=crash_on, hang_on=hang_on)


def _faulty(job: J, *, fn: Callable[[J], R], crash_on: str | None, hang_on: str | None) -> R:
    if crash_on and crash_on in job.source:
        os.kill(os.getpid(), signal.SIGSEGV)
    if hang_on and hang_on in job.source:
        time.sleep(10**6)
    return fn(job)
