"""Checking and describing a built dataset: ``python -m shards verify`` and ``python -m shards stats``.

:func:`verify_dataset` re-reads every shard the manifest lists, in worker processes (a decoder crash costs
one shard's report, not the run), and reports problems per shard:

- **tar structure**: the tar opens and reads to its end; every member is a regular file named
  ``KEY.EXT`` with a valid key; a sample's members are consecutive and are exactly mp4, audio, json;
- **index agreement**: the ``.idx`` parses, and each entry's extension, data offset, size and member name
  match the tar; the sample count matches;
- **manifest counts**: samples and bytes per shard as the manifest says;
- **decodable members** (unless ``decode=False``): the mp4 decodes with PyAV to ``num_frames`` square frames
  of ``frame_size`` in the manifest's codec and holds no audio track; the audio decodes to ``num_samples``
  mono samples at ``sample_rate``; the JSON has every contract field, and its key, split, task, labels and
  label names agree with the shard and the manifest.

Dataset-wide: sample keys are unique over train and test, retrieval samples are test samples, the split totals
add up, ``rejects.jsonl`` has ``rejects`` lines, and no ``.partial`` leftovers or unlisted shards lie around.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards.manifest import SPLITS, load_manifest
from shards.progress import progress
from shards.workers import default_workers, map_isolated
from shards.writer import ShardError, check_key, read_index

CONTRACT_FIELDS = (
    "key",
    "index",
    "source",
    "labels",
    "label_names",
    "category",
    "task",
    "split",
    "duration",
    "fps",
    "num_frames",
    "sample_rate",
    "num_samples",
    "start",
)


@dataclass(frozen=True)
class ShardCheck:
    """What to check one shard against."""

    root: str
    task: str
    split: str
    entry: dict[str, Any]
    preprocessing: dict[str, Any]
    classes: tuple[str, ...]
    decode: bool


@dataclass
class ShardReport:
    path: str
    task: str
    split: str
    num_samples: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    root: Path
    shards: list[ShardReport]
    problems: list[str]
    """Dataset-wide problems (not tied to one shard)."""

    @property
    def ok(self) -> bool:
        return not self.problems and all(not s.problems for s in self.shards)

    def format(self, verbose: bool = False) -> str:
        lines = []
        for s in self.shards:
            if s.problems:
                lines.append(f"FAIL {s.path} ({s.num_samples} samples)")
                lines += [f"     - {p}" for p in s.problems[:20]]
                if len(s.problems) > 20:
                    lines.append(f"     - ... {len(s.problems) - 20} more")
            elif verbose:
                lines.append(f"ok   {s.path} ({s.num_samples} samples)")
        lines += [f"FAIL dataset: {p}" for p in self.problems]
        bad = sum(1 for s in self.shards if s.problems)
        total = sum(s.num_samples for s in self.shards)
        verdict = "OK" if self.ok else "PROBLEMS FOUND"
        lines.append(
            f"{verdict}: {len(self.shards)} shards, {total} samples, {bad} shards with problems, "
            f"{len(self.problems)} dataset problems ({self.root})"
        )
        return "\n".join(lines)


def check_shard(check: ShardCheck) -> ShardReport:
    """Every per-shard check of the module docstring; never raises for a bad shard."""
    rel = check.entry["path"]
    report = ShardReport(path=rel, task=check.task, split=check.split)
    try:
        _check_shard(check, report)
    except Exception as err:  # a check that blows up is a finding about this shard, not the end of verify
        report.problems.append(f"could not be checked: {err!r}")
    return report


def _check_shard(check: ShardCheck, report: ShardReport) -> None:
    root = Path(check.root)
    tar_path, idx_path = root / check.entry["path"], root / check.entry["index"]
    problems = report.problems
    if not tar_path.is_file():
        problems.append("tar file is missing")
        return
    if not idx_path.is_file():
        problems.append(f"index file {check.entry['index']} is missing")
    audio_ext = "wav" if check.preprocessing.get("audio_format") == "wav" else "flac"
    expected = ["mp4", audio_ext, "json"]

    members: list[tuple[str, str, int, int]] = []  # key, ext, offset, size
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    problems.append(f"member {m.name!r} is not a regular file")
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")
                if not dot:
                    problems.append(f"member {m.name!r} has no extension")
                    continue
                members.append((key, ext, m.offset_data, m.size))
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"tar cannot be read to its end: {err}")
        return
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    for key, ext, offset, size in members:
        if samples and samples[-1][0] == key:
            samples[-1][1].append((ext, offset, size))
        else:
            samples.append((key, [(ext, offset, size)]))
    counts = Counter(key for key, _ in samples)
    for key, n in counts.items():
        if n > 1:
            problems.append(f"sample {key!r}: its members are not consecutive (seen {n} times)")
        try:
            check_key(key)
        except ShardError as err:
            problems.append(str(err))
    for key, parts in samples:
        exts = [e for e, _, _ in parts]
        if exts != expected:
            problems.append(f"sample {key!r}: members {exts}, expected {expected}")
    report.num_samples = len(samples)
    report.keys = [k for k, _ in samples]

    if check.entry.get("num_samples") != len(samples):
        problems.append(f"manifest says {check.entry.get('num_samples')} samples, the tar holds {len(samples)}")
    size = tar_path.stat().st_size
    if check.entry.get("num_bytes") not in (None, size):
        problems.append(f"manifest says {check.entry.get('num_bytes')} bytes, the tar has {size}")

    if idx_path.is_file():
        try:
            index = read_index(idx_path)
        except (ShardError, ValueError) as err:
            problems.append(f"index: {err}")
        else:
            tar_entries = [[(e, o, s, f"{key}.{e}") for e, o, s in parts] for key, parts in samples]
            if len(index) != len(tar_entries):
                problems.append(f"index lists {len(index)} samples, the tar holds {len(tar_entries)}")
            for i, (mine, theirs) in enumerate(zip(index, tar_entries, strict=False)):
                if [tuple(x) for x in mine] != theirs:
                    problems.append(f"index line {i + 2} disagrees with the tar: {mine} vs {theirs}")
                    break

    if not check.decode:
        return
    with open(tar_path, "rb") as f:
        for key, parts in samples:
            data = {}
            for ext, offset, size in parts:
                f.seek(offset)
                data[ext] = f.read(size)
            problems.extend(f"sample {key!r}: {p}" for p in _check_sample(key, data, check, audio_ext))


def _check_sample(key: str, data: dict[str, bytes], check: ShardCheck, audio_ext: str) -> Iterator[str]:
    import av

    pre = check.preprocessing
    try:
        meta = json.loads(data.get("json", b""))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        yield f"json does not parse ({err})"
        return
    missing = [f for f in CONTRACT_FIELDS if f not in meta]
    if missing:
        yield f"json lacks fields {missing}"
        return
    if meta["key"] != key:
        yield f"json key {meta['key']!r} differs from the member name"
    if meta["split"] != check.split or meta["task"] != check.task:
        yield f"json says task {meta['task']!r} split {meta['split']!r}, the shard is {check.task}/{check.split}"
    names = [check.classes[i] if isinstance(i, int) and 0 <= i < len(check.classes) else None for i in meta["labels"]]
    if None in names or names != list(meta["label_names"]):
        yield f"labels {meta['labels']} do not name classes {meta['label_names']} of the manifest"
    if "mp4" in data:
        try:
            with av.open(io.BytesIO(data["mp4"])) as c:
                if c.streams.audio:
                    yield "the mp4 has an audio track (shard video must be video only)"
                stream = c.streams.video[0]
                codec = stream.codec_context.codec.canonical_name
                n, shape = 0, None
                for frame in c.decode(stream):
                    n += 1
                    shape = (frame.height, frame.width)
            side = pre.get("frame_size")
            if codec != pre.get("video_codec"):
                yield f"video codec {codec}, the manifest says {pre.get('video_codec')}"
            if n != meta["num_frames"]:
                yield f"video decodes to {n} frames, json says {meta['num_frames']}"
            if shape != (side, side):
                yield f"frames are {shape}, expected ({side}, {side})"
        except (av.FFmpegError, IndexError, ValueError) as err:
            yield f"mp4 does not decode ({err})"
    if audio_ext in data:
        try:
            with av.open(io.BytesIO(data[audio_ext])) as c:
                stream = c.streams.audio[0]
                rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
                n = sum(frame.samples for frame in c.decode(stream))
            if rate != pre.get("sample_rate") or rate != meta["sample_rate"]:
                yield f"audio at {rate} Hz, manifest {pre.get('sample_rate')} Hz, json {meta['sample_rate']} Hz"
            if channels != 1:
                yield f"audio has {channels} channels, expected mono"
            if n != meta["num_samples"]:
                yield f"audio decodes to {n} samples, json says {meta['num_samples']}"
        except (av.FFmpegError, IndexError, ValueError) as err:
            yield f"{audio_ext} does not decode ({err})"


def _shard_crashed(check: ShardCheck, reason: str) -> ShardReport:
    return ShardReport(path=check.entry["path"], task=check.task, split=check.split, problems=[f"decoding: {reason}"])


def verify_dataset(
    root: str | os.PathLike, *, decode: bool = True, workers: int | None = None, show_progress: bool = True
) -> VerifyReport:
    """Check every shard of the dataset at ``root`` and the dataset as a whole."""
    root = Path(root)
    manifest = load_manifest(root)
    checks = [
        ShardCheck(str(root), task["name"], split, shard, manifest["preprocessing"], tuple(manifest["classes"]), decode)
        for task in manifest["tasks"]
        for split in SPLITS
        for shard in task["splits"][split]["shards"]
    ]
    n = default_workers() if workers is None else workers
    results = map_isolated(
        check_shard, checks, workers=min(n, max(1, len(checks))) if n else 0, on_crash=_shard_crashed
    )
    if show_progress and checks:
        results = progress(results, total=len(checks), desc="verify shards", unit="shard")
    shards = list(results)
    return VerifyReport(root=root, shards=shards, problems=_dataset_problems(root, manifest, shards))


def _dataset_problems(root: Path, manifest: dict[str, Any], shards: list[ShardReport]) -> list[str]:
    problems = []
    keys: dict[str, set[str]] = defaultdict(set)
    seen: Counter[str] = Counter()
    for s in shards:
        keys[s.split].update(s.keys)
        if s.split != "retrieval":
            seen.update(s.keys)
    dup = sorted(k for k, n in seen.items() if n > 1)
    if dup:
        problems.append(f"{len(dup)} sample keys appear more than once in train/test, e.g. {dup[:3]}")
    extra = keys["retrieval"] - keys["test"]
    if extra:
        problems.append(f"{len(extra)} retrieval samples are not test samples, e.g. {sorted(extra)[:3]}")
    for split in SPLITS:
        total = sum(t["splits"][split]["num_samples"] for t in manifest["tasks"])
        if manifest["counts"].get(split) != total:
            problems.append(f"counts.{split} = {manifest['counts'].get(split)}, the tasks add up to {total}")
    rejects = root / "rejects.jsonl"
    if not rejects.is_file():
        problems.append("rejects.jsonl is missing")
    else:
        lines = [line for line in rejects.read_text().splitlines() if line.strip()]
        if len(lines) != manifest["rejects"]:
            problems.append(f"rejects.jsonl has {len(lines)} lines, the manifest counts {manifest['rejects']} rejects")
        for i, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"rejects.jsonl line {i} is not JSON")
                break
            if not {"source", "reason"} <= record.keys():
                problems.append(f"rejects.jsonl line {i} lacks 'source' or 'reason'")
                break
    partials = sorted(str(p.relative_to(root)) for p in root.rglob("*.partial"))
    if partials:
        problems.append(f"leftovers of an interrupted write: {partials[:3]} (re-run the build)")
    listed = {s.path for s in shards}
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*.tar"))
    unlisted = [p for p in unlisted if p not in listed]
    if unlisted:
        problems.append(f"{len(unlisted)} tar files are not in the manifest, e.g. {unlisted[:3]}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------------------------------


def _metas(root: Path, shard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The JSON member of every sample of a shard, read through the index (no tar scan)."""
    with open(root / shard["path"], "rb") as f:
        for entries in read_index(root / shard["index"]):
            for ext, offset, size, _ in entries:
                if ext == "json":
                    f.seek(offset)
                    yield json.loads(f.read(size))


def dataset_stats(root: str | os.PathLike) -> dict[str, Any]:
    """Counts, hours, bytes, padding, per-class counts, source media and rejects of a dataset."""
    root = Path(root)
    manifest = load_manifest(root)
    per_split: dict[str, dict[str, Any]] = {}
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    sources: Counter[str] = Counter()
    for split in SPLITS:
        seconds = padded = nbytes = 0.0
        n = n_padded = 0
        for task in manifest["tasks"]:
            for shard in task["splits"][split]["shards"]:
                nbytes += shard.get("num_bytes", 0)
                for meta in _metas(root, shard):
                    n += 1
                    seconds += meta["duration"]
                    pad = float(meta.get("padded", 0.0))
                    padded += pad
                    n_padded += pad > 0
                    for name in meta["label_names"]:
                        per_class[split][name] += 1
                    if split != "retrieval":
                        sm = meta.get("source_media") or {}
                        if sm:
                            sources[f"{sm.get('video_codec')}/{sm.get('audio_codec')}"] += 1
        per_split[split] = {
            "samples": n,
            "hours": round(seconds / 3600, 4),
            "mean_seconds": round(seconds / n, 3) if n else 0.0,
            "padded_samples": n_padded,
            "padded_seconds": round(padded, 3),
            "megabytes": round(nbytes / 1e6, 3),
        }
    rejects = root / "rejects.jsonl"
    reasons: Counter[str] = Counter()
    if rejects.is_file():
        for line in rejects.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                reasons[record.get("code") or record.get("reason", "?")] += 1
    counts = [per_class["train"][c] for c in manifest["classes"]]
    return {
        "root": str(root),
        "tasks": len(manifest["tasks"]),
        "classes": len(manifest["classes"]),
        "splits": per_split,
        "train_per_class": {"min": min(counts, default=0), "max": max(counts, default=0)},
        "class_counts": {s: dict(per_class[s]) for s in SPLITS},
        "source_codecs": dict(sources.most_common()),
        "rejects": manifest["rejects"],
        "reject_codes": dict(reasons.most_common()),
        "excluded": manifest.get("excluded", {}),
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{'split':<10} {'samples':>8} {'hours':>9} {'mean s':>7} {'padded':>7} {'pad s':>8} {'MB':>10}"]
    for split, s in stats["splits"].items():
        lines.append(
            f"{split:<10} {s['samples']:>8} {s['hours']:>9.3f} {s['mean_seconds']:>7.2f} {s['padded_samples']:>7} "
            f"{s['padded_seconds']:>8.1f} {s['megabytes']:>10.1f}"
        )
    tpc = stats["train_per_class"]
    lines.append(f"train clips per class: min {tpc['min']}, max {tpc['max']} over {stats['classes']} classes")
    if stats["source_codecs"]:
        lines.append("source video/audio codecs: " + ", ".join(f"{k} {v}" for k, v in stats["source_codecs"].items()))
    lines.append(
        f"rejected: {stats['rejects']}"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in stats["reject_codes"].items()) + ")"
            if stats["reject_codes"]
            else ""
        )
    )
    if stats["excluded"]:
        lines.append("excluded by the split rules: " + ", ".join(f"{k} {v}" for k, v in stats["excluded"].items()))
    return "\n".join(lines)
