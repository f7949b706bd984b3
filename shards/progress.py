"""Progress bars of the shard tools: tqdm on stderr, or plain iteration when it is off or tqdm is not installed.

``FASTAV_NO_PROGRESS=1`` turns every bar off (the test suite sets it); the commands' ``--quiet`` does the same for
one run. The shard tools draw their own bars so that they import nothing from ``fastav``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

NO_PROGRESS_ENV = "FASTAV_NO_PROGRESS"


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """``iterable`` with a progress bar on stderr, or as it is when bars are off or tqdm is missing."""
    if os.environ.get(NO_PROGRESS_ENV) == "1":
        return iter(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        return iter(iterable)
    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0))
