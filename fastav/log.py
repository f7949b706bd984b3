"""Logging shared by every fastav tool: console lines, a JSONL metrics file, TensorBoard, progress bars.

- :func:`get_logger` gives a console logger with one format everywhere (rank-aware when distributed).
- :class:`MetricLogger` writes one JSON object per call to ``metrics.jsonl`` in the run directory, a short
  console line, and (optionally) TensorBoard scalars. Values may be Python numbers or 0-d tensors; tensors
  are read back here, so the caller only pays a device sync on the steps it chooses to log.
- :class:`RateLimited` keeps a repeated warning (a skipped sample, say) from flooding the console while
  still counting every occurrence.
- :func:`progress` wraps tqdm with fastav's defaults for long work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_FORMAT = "%(asctime)s %(levelname).1s %(name)s%(rank)s | %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        record.rank = f"[{rank}]" if rank not in (None, "") and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        return True


def get_logger(name: str = "fastav", level: int | str = "INFO") -> logging.Logger:
    """A console logger (stderr) with fastav's format; idempotent."""
    logger = logging.getLogger(name)
    if not any(getattr(h, "_fastav", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        handler._fastav = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


def _scalar(value: Any) -> Any:
    """Plain Python value for JSON: tensors and numpy scalars become numbers."""
    if hasattr(value, "detach"):  # torch.Tensor; reading it is the deliberate sync of a logging step
        value = value.detach().float().cpu()  # sync-ok: logging step
        return value.item() if value.numel() == 1 else value.tolist()  # sync-ok: logging step
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


class MetricLogger:
    """Append-only metrics: ``metrics.jsonl`` (one object a line), console, optional TensorBoard.

    Each record carries ``step``, ``time`` (seconds since the logger was created) and the given values.
    ``tag`` groups records (``train``, ``eval``, ``task_end`` ...) so readers can filter them. A resumed run passes
    ``resume_step``: records written after that step by the interrupted run are dropped, so the file continues
    from the checkpoint and holds every step once.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = False,
        console: bool = True,
        filename: str = "metrics.jsonl",
        logger: logging.Logger | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        if resume_step is not None and self.path.is_file():
            _truncate_after(self.path, resume_step)
        self._file = self.path.open("a", buffering=1)
        self._start = time.monotonic()
        self._console = console
        self._logger = logger or get_logger("fastav")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(
        self, step: int, values: Mapping[str, Any], *, tag: str = "train", console: str | None = None
    ) -> dict[str, Any]:
        """Append one record; ``console`` replaces the printed line (every value by default)."""
        record: dict[str, Any] = {"tag": tag, "step": int(step), "time": round(time.monotonic() - self._start, 3)}
        record.update({k: _scalar(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._console:
            self._logger.info("%s step %d | %s", tag, step, console or _format_values(record))
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("tag", "step", "time") and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(f"{tag}/{key}", value, step)
        return record

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (atomically); unreadable trailing lines of a killed run go too."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if int(record.get("step", 0)) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _format_values(record: Mapping[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key in ("tag", "step", "time"):
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, int | str):
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def read_metrics(path: str | os.PathLike, tag: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file, optionally only those with ``tag``."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if tag is None or r.get("tag") == tag]


class RateLimited:
    """Log a recurring event at most once per ``interval`` seconds, counting every occurrence.

    >>> skips = RateLimited(get_logger(), "skipped undecodable sample", interval=30)
    >>> skips("shard-000003.tar key abc: no video stream")   # logs; later calls within 30 s only count
    """

    def __init__(self, logger: logging.Logger, what: str, interval: float = 30.0) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self.count = 0
        self._suppressed = 0
        self._last = -math.inf

    def __call__(self, detail: str) -> bool:
        """Count one event; return whether it was logged."""
        self.count += 1
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return False
        extra = f" ({self._suppressed} more since the last message)" if self._suppressed else ""
        self.logger.warning("%s: %s%s [total %d]", self.what, detail, extra, self.count)
        self._suppressed = 0
        self._last = now
        return True


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """A tqdm progress bar on stderr; plain iteration when tqdm is unavailable or FASTAV_NO_PROGRESS=1."""
    if os.environ.get("FASTAV_NO_PROGRESS") == "1":
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0))


class Bar:
    """A progress bar for work counted by hand (``update(n)``); silent when disabled, on ranks other than 0, or with
    FASTAV_NO_PROGRESS=1."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", *, enabled: bool = True, initial: int = 0) -> None:
        self._bar = None
        if enabled and os.environ.get("FASTAV_NO_PROGRESS") != "1":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, mininterval=1.0, leave=False
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
