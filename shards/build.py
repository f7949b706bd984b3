"""The shard builder: inputs -> plan -> clips transcoded in worker processes -> shards, index, manifest, rejects.

:func:`make_plan` reads the inputs and decides every shard's contents up front (:mod:`shards.split`);
:func:`build_dataset` then writes them. Resumability follows from that: beside each shard the builder keeps a
small record in ``OUT/.build/<task>/<split>/shard-NNNNNN.json`` holding a fingerprint of what the shard was
made from (its jobs, the source files' sizes and mtimes, the preprocessing parameters) and what became of
each clip. A re-run skips a shard whose tar, index and record exist with the same fingerprint, and rewrites
any other one; since the plan and the encoders are deterministic, the rewritten shard has the same bytes an
uninterrupted build would have written. Shards, retrieval copies, ``rejects.jsonl`` and
``manifest.json`` are written through :mod:`shards.dataset`, the path ``synth`` takes too (``.partial`` files
renamed when complete); leftovers of a killed run are deleted first, and ``manifest.json`` is written last, so a
directory with a manifest is a finished build.

Bad clips never stop the build: each becomes a line of ``rejects.jsonl`` (``source``, ``reason``, ``code``, and
where known ``key``, ``task``, ``split``, ``path``, ``listed_in``) and counts in the manifest (``rejects``,
``reject_codes``). A shard whose clips were all rejected is not written (its number stays unused). Worker
processes run the clips (:func:`shards.workers.map_isolated`), so even a crash inside FFmpeg costs one clip.
:class:`BuildReport` says whether the rejects exceed the allowed fraction; the CLI turns that into exit code 1.

Retrieval shards hold, per class, the first ``retrieval_per_class`` built test clips in a seeded order,
copied from the test shards with ``split`` set to ``retrieval`` (:func:`shards.dataset.copy_retrieval`).

The stages of :func:`build_dataset`: :func:`_clip_units` (a unit per train / test shard, finished or not),
:func:`_encode` (the clips of the unfinished ones, in worker processes), :func:`_retrieval_units` and
:func:`_copy_retrieval`, :func:`_remove_stale`, then :func:`_finish` (rejects and manifest).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import IO, Any

from shards import _testing
from shards.dataset import (
    Written,
    copy_retrieval,
    finish_dataset,
    retrieval_layout,
    shard_entry,
    task_entry,
    write_samples,
)
from shards.manifest import SPLITS, load_manifest, shard_relpath
from shards.progress import progress
from shards.rejects import code_counts
from shards.sources import VIDEO_EXTENSIONS, InputError, Inputs, read_category_map, read_class_index, read_inputs
from shards.split import Plan, SplitConfig, TaskPlan, class_order, plan_dataset
from shards.transcode import ClipJob, ClipParams, ClipResult, process_clip
from shards.workers import default_workers, map_isolated
from shards.writer import Sample, remove_partials, shard_complete

BUILDER = "shards build"
BUILD_FORMAT = 1
"""Bumped when the same job and parameters would give different bytes; part of every shard fingerprint."""
STATE_DIR = ".build"
DEFAULT_CLIP_TIMEOUT = 300.0


class BuildError(RuntimeError):
    """The build itself cannot go on (bad output directory, unreadable input file); the message says what to do."""


@dataclass(frozen=True)
class InputOptions:
    """Where the clips come from and how their files and labels are found."""

    inputs: tuple[str, ...]
    test_inputs: tuple[str, ...] = ()
    video_dir: str | None = None
    name_pattern: str | None = None
    class_index: str | None = None
    categories: str | None = None
    audio_from: str = "video"
    """'video' (the video file's audio) or 'wav' (a datafile entry's ``wav`` file)."""
    csv_start: str = "ignore"
    """'ignore': CSV files are already cut to the clip; 'seek': the segment starts at the CSV's start_seconds."""
    start: float = 0.0
    """Seconds into each file where the segment starts (added to start_seconds with csv_start='seek')."""
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS

    def __post_init__(self) -> None:
        if not self.inputs and not self.test_inputs:
            raise InputError("give at least one --input")
        if self.audio_from not in ("video", "wav"):
            raise InputError(f"--audio-from {self.audio_from!r}: choose video or wav")
        if self.csv_start not in ("ignore", "seek"):
            raise InputError(f"--csv-start {self.csv_start!r}: choose ignore or seek")
        if self.start < 0:
            raise InputError(f"--start {self.start}: must be 0 or more")


@dataclass
class BuildReport:
    """What a build wrote and rejected."""

    out: Path
    manifest: dict[str, Any]
    written: int
    """Train + test samples in the shards (retrieval copies not counted)."""
    rejects: list[dict[str, Any]]
    built_shards: int
    skipped_shards: int
    processed: int
    """Clips transcoded by this run (those of shards a previous run had not finished)."""
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def considered(self) -> int:
        return self.written + len(self.rejects)

    @property
    def reject_fraction(self) -> float:
        return len(self.rejects) / self.considered if self.considered else 0.0

    def reject_summary(self, top: int = 5) -> str:
        return code_counts(self.rejects, top)


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


def read_all(opts: InputOptions) -> tuple[Inputs, list[str], dict[str, str] | None]:
    """The clips of every input, the class list and the class -> category map."""
    class_index = read_class_index(opts.class_index) if opts.class_index else None
    class_ids = {cid: name for cid, name in class_index} if class_index else None
    category_map = read_category_map(opts.categories) if opts.categories else None
    inputs = read_inputs(
        list(opts.inputs),
        test_paths=list(opts.test_inputs),
        class_ids=class_ids,
        video_dir=opts.video_dir,
        name_pattern=opts.name_pattern,
        audio_from=opts.audio_from,
        extensions=opts.extensions,
        csv_seek=opts.csv_start == "seek",
    )
    if class_index is None and any(label.startswith(("/m/", "/t/")) for c in inputs.clips[:200] for label in c.labels):
        raise InputError("the labels look like AudioSet ids (/m/...): pass --class-index class_labels_indices.csv")
    if opts.start:
        inputs.clips = [replace(c, start=c.start + opts.start) for c in inputs.clips]
    if not inputs.clips and not inputs.problems:
        raise InputError(f"the inputs name no clips: {', '.join(inputs.descriptions)}")
    return inputs, class_order(inputs.clips, class_index, category_map), category_map


def make_plan(opts: InputOptions, config: SplitConfig, *, check_files: bool = True) -> tuple[Plan, Inputs]:
    """Read the inputs and plan the whole dataset (tasks, splits, keys, shards)."""
    inputs, classes, category_map = read_all(opts)
    plan = plan_dataset(inputs.clips, classes, category_map, config, problems=inputs.problems, check_files=check_files)
    return plan, inputs


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """One shard of the build: what goes in, its fingerprint, and (once done) its record."""

    task: TaskPlan
    split: str
    rel: str
    fingerprint: str
    jobs: list[ClipJob] = field(default_factory=list)
    """Train and test shards: the clips to transcode, in order."""
    copies: dict[str, str] = field(default_factory=dict)
    """Retrieval shards: key -> the test shard it is copied from, in order."""
    record: dict[str, Any] | None = None
    done: bool = False
    """Finished by an earlier run (same fingerprint): skipped."""


def _work(job: ClipJob, params: ClipParams) -> ClipResult:
    return process_clip(job, params)


def _crashed(job: ClipJob, reason: str) -> ClipResult:
    return ClipResult(job.key, code="timeout" if reason.startswith("timed out") else "crash", reason=reason)


def _file_state(path: str | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _job_fingerprint(jobs: list[ClipJob], params: ClipParams) -> str:
    return _fingerprint(
        {
            "format": BUILD_FORMAT,
            "params": asdict(params),
            "jobs": [[asdict(j), _file_state(j.path), _file_state(j.audio_path)] for j in jobs],
        }
    )


def _record_path(out: Path, rel: str) -> Path:
    return out / STATE_DIR / (rel[: -len(".tar")] + ".json")


def _load_record(out: Path, rel: str) -> dict[str, Any] | None:
    path = _record_path(out, rel)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _save_record(out: Path, unit: _Unit, written: Written, rejects: list[dict[str, Any]]) -> dict[str, Any]:
    record = {
        "fingerprint": unit.fingerprint,
        "num_samples": len(written.keys),
        "num_bytes": written.num_bytes,
        "keys": written.keys,
        "rejects": rejects,
    }
    path = _record_path(out, unit.rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return record


def _check_done(out: Path, unit: _Unit) -> None:
    """Mark ``unit`` done (and load its record) when an earlier run finished it with the same fingerprint."""
    record = _load_record(out, unit.rel)
    if record is None or record.get("fingerprint") != unit.fingerprint:
        return
    tar = out / unit.rel
    if record["num_samples"] == 0:
        unit.done = not tar.exists()
    else:
        unit.done = shard_complete(tar) and tar.stat().st_size == record["num_bytes"]
    if unit.done:
        unit.record = record


def _prepare_out(out: Path) -> IO[str]:
    """Check that ``out`` may be written and lock it; return the open lock file (keep it open)."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_DIR).is_dir():
        if (out / "manifest.json").is_file():
            try:
                builder = load_manifest(out).get("builder")
            except ValueError:
                builder = "an unknown builder"
            raise BuildError(
                f"--out {out} holds a dataset made by {builder!r}, not by 'shards build'; choose another directory"
            )
        raise BuildError(f"--out {out} is not empty and holds no shard build; choose an empty or new directory")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    lock = open(out / STATE_DIR / "lock", "w")  # held (and locked) for the whole build
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise BuildError(f"another build is writing into {out} ({STATE_DIR}/lock is held); wait for it") from None
    return lock


def _reject_record(job: ClipJob, result: ClipResult) -> dict[str, Any]:
    return {
        "source": job.source,
        "reason": result.reason,
        "code": result.code,
        "key": job.key,
        "task": job.task,
        "split": job.split,
        "path": job.path,
    }


def build_dataset(
    plan: Plan,
    params: ClipParams,
    out: str | os.PathLike,
    *,
    config: SplitConfig,
    workers: int | None = None,
    show_progress: bool = True,
    extra: dict[str, Any] | None = None,
    clip_timeout: float | None = DEFAULT_CLIP_TIMEOUT,
) -> BuildReport:
    """Write ``plan`` into ``out`` (resuming an earlier build there); return what was written and rejected."""
    started = time.monotonic()
    out = Path(out)
    lock = _prepare_out(out)
    try:
        (out / "manifest.json").unlink(missing_ok=True)  # a manifest marks a finished build: written last
        remove_partials(out)
        units = _clip_units(out, plan, params=params)
        pending = [job for u in units if not u.done for job in u.jobs]
        _encode(out, units, pending, params=params, workers=workers, show_progress=show_progress, timeout=clip_timeout)
        units += _copy_retrieval(out, _retrieval_units(out, plan, units, config=config))
        _remove_stale(out, units)
        manifest, rejects = _finish(out, plan, units, params=params, config=config, extra=extra or {})
    finally:
        lock.close()
    return BuildReport(
        out=out,
        manifest=manifest,
        written=sum(manifest["counts"][s] for s in ("train", "test")),
        rejects=rejects,
        built_shards=sum(not u.done for u in units),
        skipped_shards=sum(u.done for u in units),
        processed=len(pending),
        seconds=time.monotonic() - started,
        warnings=list(plan.warnings),
    )


def _clip_units(out: Path, plan: Plan, *, params: ClipParams) -> list[_Unit]:
    """A unit per train and test shard of the plan, those an earlier run finished marked done."""
    units = []
    for task in plan.tasks:
        for split in ("train", "test"):
            for number, jobs in enumerate(task.shards[split]):
                unit = _Unit(task, split, shard_relpath(task.name, split, number), _job_fingerprint(jobs, params))
                unit.jobs = jobs
                _check_done(out, unit)
                units.append(unit)
    return units


def _encode(
    out: Path,
    units: list[_Unit],
    pending: list[ClipJob],
    *,
    params: ClipParams,
    workers: int | None,
    show_progress: bool,
    timeout: float | None,
) -> None:
    """Transcode ``pending`` (the clips of the units not done) in worker processes and write their shards."""
    n_workers = default_workers() if workers is None else workers
    stream = map_isolated(
        _testing.with_faults(partial(_work, params=params)),
        pending,
        workers=min(n_workers, max(1, len(pending))) if n_workers else 0,
        on_crash=_crashed,
        timeout=timeout,
    )
    results: Iterator[ClipResult] = stream
    if show_progress and pending:
        results = progress(stream, total=len(pending), desc=f"clips ({n_workers} workers)", unit="clip")
    try:
        for unit in units:
            if not unit.done:
                unit.record = _write_unit(out, unit, results)
        if next(results, None) is not None:
            raise BuildError("internal: more clip results than planned clips")
    finally:
        stream.close()  # stops the workers now if the build fails half-way


def _write_unit(out: Path, unit: _Unit, results: Iterator[ClipResult]) -> dict[str, Any]:
    """Write one train / test shard from the next results; the rejected clips go into its record."""
    rejects: list[dict[str, Any]] = []

    def samples() -> Iterator[Sample]:
        for job in unit.jobs:
            result = next(results)
            if result.key != job.key:
                raise BuildError(f"internal: result for {result.key!r} arrived in place of {job.key!r}")
            if result.sample is None:
                rejects.append(_reject_record(job, result))
            else:
                yield result.sample

    return _save_record(out, unit, write_samples(out, unit.rel, samples()), rejects)


def _retrieval_units(out: Path, plan: Plan, units: list[_Unit], *, config: SplitConfig) -> list[_Unit]:
    """A unit per retrieval shard: per class, the first ``retrieval_per_class`` candidates that were built."""
    retrieval = []
    for task in plan.tasks:
        test_units = [u for u in units if u.task is task and u.split == "test"]
        built = {key: u.rel for u in test_units if u.record is not None for key in u.record["keys"]}
        chosen: set[str] = set()
        for keys in task.retrieval_candidates.values():
            chosen.update([k for k in keys if k in built][: config.retrieval_per_class])
        test_keys = [job.key for shard in task.shards["test"] for job in shard]
        base = [u.fingerprint for u in test_units]
        for rel, keys in retrieval_layout(task.name, test_keys, chosen, shard_size=config.shard_size):
            unit = _Unit(task, "retrieval", rel, _fingerprint({"test": base, "keys": keys}))
            unit.copies = {key: built[key] for key in keys}
            _check_done(out, unit)
            retrieval.append(unit)
    return retrieval


def _copy_retrieval(out: Path, units: list[_Unit]) -> list[_Unit]:
    for unit in units:
        if not unit.done:
            written = copy_retrieval(out, unit.rel, list(unit.copies), unit.copies)
            unit.record = _save_record(out, unit, written, [])
    return units


def _remove_stale(out: Path, units: list[_Unit]) -> list[str]:
    """Delete shards and records a previous build left that this plan does not have; return their paths."""
    keep_records = {u.rel for u in units}
    keep_tars = {u.rel for u in units if u.record is not None and u.record["num_samples"]}
    removed = []
    for record in sorted((out / STATE_DIR).rglob("shard-*.json")):
        rel = record.relative_to(out / STATE_DIR).as_posix()[: -len(".json")] + ".tar"
        if rel not in keep_records:
            record.unlink()
            removed.append(str(record.relative_to(out)))
    for path in sorted(itertools.chain(out.glob("*/*/shard-*.tar"), out.glob("*/*/shard-*.idx"))):
        rel = path.relative_to(out).as_posix()
        if rel.endswith(".idx"):
            rel = rel[: -len(".idx")] + ".tar"
        if rel not in keep_tars:
            path.unlink()
            removed.append(str(path.relative_to(out)))
    for base in (out, out / STATE_DIR):
        for d in sorted(base.glob("*/*"), reverse=True) + sorted(base.glob("*"), reverse=True):
            if d.is_dir() and d.name != STATE_DIR and not any(d.iterdir()):
                d.rmdir()
    return removed


def _finish(
    out: Path, plan: Plan, units: list[_Unit], *, params: ClipParams, config: SplitConfig, extra: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write ``rejects.jsonl`` and the manifest; return the manifest and every reject."""
    entries: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    rejects = list(plan.rejects)
    for unit in units:
        assert unit.record is not None
        rejects.extend(unit.record["rejects"])
        if unit.record["num_samples"]:
            record = unit.record
            entry = shard_entry(unit.rel, num_samples=record["num_samples"], num_bytes=record["num_bytes"])
            entries[(unit.task.name, unit.split)].append(entry)
    tasks = [
        task_entry(
            name=task.name,
            category=task.category,
            classes=task.classes,
            shards={split: entries[(task.name, split)] for split in SPLITS},
        )
        for task in plan.tasks
    ]
    written = sum(t["splits"][s]["num_samples"] for t in tasks for s in ("train", "test"))
    manifest = finish_dataset(
        out,
        preprocessing=params.preprocessing(),
        classes=plan.classes,
        categories=plan.categories,
        tasks=tasks,
        rejects=rejects,
        builder=BUILDER,
        extra={
            **extra,
            "split": config.describe(),
            "excluded": plan.excluded,
            "reject_codes": dict(sorted(Counter(r["code"] for r in rejects).items())),
            "considered": written + len(rejects),
            "class_categories": plan.class_category,
            "warnings": plan.warnings,
        },
    )
    return manifest, rejects
