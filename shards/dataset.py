"""Writing a dataset directory: the one path ``python -m shards synth`` and ``build`` both go through.

In order:

1. :func:`write_samples` writes each train / test shard and its DALI index (:func:`shards.writer.write_shard`)
   and returns the shard's manifest entry and keys;
2. :func:`retrieval_layout` and :func:`copy_retrieval` make the retrieval shards: the chosen test samples,
   read back from the test shards just written and marked ``"split": "retrieval"``;
3. :func:`task_entry` describes a task for the manifest, and :func:`finish_dataset` writes ``rejects.jsonl``
   and, last, ``manifest.json``, so a directory with a manifest is a finished dataset.

What each caller decides on its own: which clips go where (``synth`` renders them, ``build`` transcodes them
and skips the shards an interrupted run had finished), and which test samples become retrieval samples.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.manifest import CONTINUAL, SPLITS, TASK_ROLES, make_manifest, shard_relpath, write_manifest
from shards.writer import Sample, ShardError, iter_shard, write_shard


@dataclass(frozen=True)
class Written:
    """What :func:`write_samples` or :func:`copy_retrieval` put on disk."""

    rel: str
    keys: list[str]
    num_bytes: int

    @property
    def entry(self) -> dict[str, Any]:
        """The shard's entry in the manifest (only for a shard that holds samples)."""
        return shard_entry(self.rel, num_samples=len(self.keys), num_bytes=self.num_bytes)


def shard_entry(rel: str, *, num_samples: int, num_bytes: int) -> dict[str, Any]:
    return {"path": rel, "index": rel[: -len(".tar")] + ".idx", "num_samples": num_samples, "num_bytes": num_bytes}


def write_samples(out: Path, rel: str, samples: Iterable[Sample]) -> Written:
    """Write ``samples`` as the shard ``out/rel`` with its index; with no sample at all, delete that shard."""
    stream = iter(samples)
    first = next(stream, None)
    tar = out / rel
    if first is None:
        for path in (tar, tar.with_suffix(".idx")):
            path.unlink(missing_ok=True)
        return Written(rel, [], 0)
    keys: list[str] = []

    def tracked() -> Iterator[Sample]:
        for sample in itertools.chain([first], stream):
            keys.append(sample.key)
            yield sample

    info = write_shard(tar, tracked())
    return Written(rel, keys, info.num_bytes)


def retrieval_layout(
    task: str, test_keys: Iterable[str], chosen: Collection[str], *, shard_size: int
) -> list[tuple[str, list[str]]]:
    """(rel, keys) of each retrieval shard of ``task``: the ``chosen`` test keys in test order, cut into shards."""
    order = [key for key in test_keys if key in chosen]
    return [
        (shard_relpath(task, "retrieval", k // shard_size), order[k : k + shard_size])
        for k in range(0, len(order), shard_size)
    ]


def copy_retrieval(out: Path, rel: str, keys: list[str], test_shard_of: Mapping[str, str]) -> Written:
    """Write the retrieval shard ``rel``: the test samples ``keys`` (``test_shard_of``: key -> test shard)."""
    wanted = set(keys)
    found: dict[str, Sample] = {}
    for test_rel in dict.fromkeys(test_shard_of[k] for k in keys):
        for sample in iter_shard(out / test_rel):
            if sample.key in wanted:
                found[sample.key] = with_split(sample, "retrieval")
    missing = sorted(wanted - found.keys())
    if missing:
        raise ShardError(f"the test shards of {out} lack the retrieval samples {missing[:3]}; delete {out} and rebuild")
    return write_samples(out, rel, [found[k] for k in keys])


def with_split(sample: Sample, split: str) -> Sample:
    """``sample`` with its JSON member saying ``split``."""
    meta = json.loads(sample.members["json"])
    if meta["split"] == split:
        return sample
    meta["split"] = split
    return Sample(sample.key, {**sample.members, "json": json.dumps(meta, sort_keys=True).encode()})


def task_entry(
    *, name: str, category: str, classes: list[str], shards: Mapping[str, list[dict[str, Any]]], role: str = CONTINUAL
) -> dict[str, Any]:
    """A task of ``manifest["tasks"]``; ``shards`` maps each split to its shard entries in order."""
    if role not in TASK_ROLES:
        raise ValueError(f"task {name!r}: role {role!r} is not one of {TASK_ROLES}")
    splits = {}
    for split in SPLITS:
        entries = list(shards.get(split, []))
        splits[split] = {"shards": entries, "num_samples": sum(e["num_samples"] for e in entries)}
    return {"name": name, "category": category, "role": role, "classes": list(classes), "splits": splits}


def finish_dataset(
    out: Path,
    *,
    preprocessing: Mapping[str, Any],
    classes: list[str],
    categories: Mapping[str, list[str]],
    tasks: list[dict[str, Any]],
    rejects: list[dict[str, Any]],
    builder: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``rejects.jsonl`` and then ``manifest.json`` (the mark of a finished dataset); return the manifest."""
    manifest = make_manifest(
        preprocessing=preprocessing,
        classes=classes,
        categories=categories,
        tasks=tasks,
        rejects=len(rejects),
        builder=builder,
        extra=extra,
    )
    _write_jsonl(out / "rejects.jsonl", rejects)
    write_manifest(out, manifest)
    return manifest


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)
