"""``manifest.json``: what a dataset directory holds, how it was made, and how it splits into tasks.

Layout of a dataset directory::

    manifest.json
    rejects.jsonl                       one {"source", "reason"} object per rejected input clip
    <task>/<split>/shard-000000.tar     + shard-000000.idx (DALI index) beside every tar

The manifest records the format version, every preprocessing parameter, the class list, the
category -> classes map, the tasks in training order (each with its classes and, per split, its
shards and sample counts), the number of rejected inputs and the builder's version. Readers call
:func:`load_manifest` with the parameter values they support; anything else is refused with a message
naming the field.

Each task entry is ``{"name", "category", "role", "classes", "splits"}``. ``role`` says what the task is for:

- ``"continual"``: one task of the continual sequence, trained in manifest order;
- ``"pretrain"``: data for pre-training before the sequence starts (``synth
  --pretrain-classes-per-category``): classes no continual task has, drawn from every category, so that
  pre-training sees every kind of clip the sequence will (as AudioSet-20k before VGGSound). A pretrain task
  comes after every continual task, and its classes after theirs in the class list, so the continual
  tasks and class ids are the same with or without it.

A task without ``role`` (manifests written before the field existed) is continual: read it through
:func:`task_role`, and pick tasks with :func:`task_names`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FORMAT = "fastav-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "test", "retrieval")
CONTINUAL, PRETRAIN = "continual", "pretrain"
TASK_ROLES = (CONTINUAL, PRETRAIN)
DISTRIBUTION = "fastav"
"""The installed distribution whose version is recorded as ``builder_version``."""
UNKNOWN_VERSION = "unknown"
"""``builder_version`` when the shard tools run from a checkout that is not installed."""
PREPROCESSING_KEYS = {
    "video_codec": str,
    "fps": int,
    "frame_size": int,
    "keyframe_interval": int,
    "audio_format": str,
    "sample_rate": int,
    "audio_channels": int,
    "channel_rule": str,
    "bits_per_sample": int,
}


class ManifestError(ValueError):
    """The manifest is missing, malformed, of an unsupported version, or has unsupported parameters."""


def shard_relpath(task: str, split: str, index: int) -> str:
    return f"{task}/{split}/shard-{index:06d}.tar"


@functools.cache
def builder_version() -> str:
    """The version of the installed ``fastav`` distribution (read from its metadata, not by importing it)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def task_role(task: Mapping[str, Any]) -> str:
    """A task entry's role; entries without one (older manifests) are continual."""
    return task.get("role", CONTINUAL)


def task_names(manifest: Mapping[str, Any], role: str = CONTINUAL) -> list[str]:
    """The names of the tasks with ``role``, in manifest order (for :func:`shard_paths`' ``tasks``)."""
    if role not in TASK_ROLES:
        raise ManifestError(f"task role {role!r}: choose one of {', '.join(TASK_ROLES)}")
    return [t["name"] for t in manifest["tasks"] if task_role(t) == role]


def make_manifest(
    *,
    preprocessing: Mapping[str, Any],
    classes: list[str],
    categories: Mapping[str, list[str]],
    tasks: list[dict[str, Any]],
    rejects: int,
    builder: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a manifest; ``tasks`` items hold name, category, role, classes and per-split shard entries."""
    counts = {split: sum(t["splits"][split]["num_samples"] for t in tasks) for split in SPLITS}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "builder": builder,
        "builder_version": builder_version(),
        "preprocessing": dict(preprocessing),
        "classes": list(classes),
        "categories": {k: list(v) for k, v in categories.items()},
        "tasks": tasks,
        "counts": counts,
        "rejects": rejects,
    }
    if extra:
        manifest.update(extra)
    _check_structure(manifest, "<new manifest>")
    return manifest


def write_manifest(root: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    path = Path(root) / "manifest.json"
    tmp = path.with_name("manifest.json.partial")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(root: str | os.PathLike, supported: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read and check ``root/manifest.json``.

    ``supported`` maps preprocessing keys to an accepted value or a collection of accepted values, e.g.
    ``{"sample_rate": 16000, "video_codec": ("vp9", "h264")}``.
    """
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path}: not found; build the dataset with 'python -m shards build' or 'synth'")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); rebuild the dataset") from None
    _check_structure(manifest, str(path))
    for key, accepted in (supported or {}).items():
        value = manifest["preprocessing"].get(key)
        ok = value in accepted if isinstance(accepted, tuple | list | set | frozenset) else value == accepted
        if not ok:
            raise ManifestError(
                f"{path}: preprocessing.{key} = {value!r} is not supported by this reader (accepted: {accepted!r}); "
                f"rebuild the shards with a supported value"
            )
    return manifest


def _check_structure(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: the manifest must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{where}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{where}: field 'format_version' is {version!r}; this fastav reads version {FORMAT_VERSION} only "
            f"(rebuild the shards with this fastav, or use the fastav that wrote them)"
        )
    for key in ("preprocessing", "classes", "categories", "tasks", "counts", "rejects"):
        if key not in manifest:
            raise ManifestError(f"{where}: field {key!r} is missing")
    pre = manifest["preprocessing"]
    for key, tp in PREPROCESSING_KEYS.items():
        if not isinstance(pre.get(key), tp):
            raise ManifestError(f"{where}: field 'preprocessing.{key}' must be a {tp.__name__}, got {pre.get(key)!r}")
    classes = set(manifest["classes"])
    for i, task in enumerate(manifest["tasks"]):
        for key in ("name", "classes", "splits"):
            if key not in task:
                raise ManifestError(f"{where}: field 'tasks[{i}].{key}' is missing")
        if task_role(task) not in TASK_ROLES:
            raise ManifestError(f"{where}: 'tasks[{i}].role' is {task['role']!r}; expected one of {TASK_ROLES}")
        unknown = set(task["classes"]) - classes
        if unknown:
            raise ManifestError(f"{where}: 'tasks[{i}].classes' names unknown classes {sorted(unknown)}")
        for split in SPLITS:
            entry = task["splits"].get(split)
            if entry is None or "shards" not in entry or "num_samples" not in entry:
                raise ManifestError(f"{where}: field 'tasks[{i}].splits.{split}' needs 'shards' and 'num_samples'")
            if sum(s["num_samples"] for s in entry["shards"]) != entry["num_samples"]:
                raise ManifestError(f"{where}: 'tasks[{i}].splits.{split}' shard counts do not add up")


def shard_paths(root: str | os.PathLike, manifest: Mapping[str, Any], split: str, tasks: list[str] | None = None):
    """(tar, idx) paths of ``split`` for the named tasks (all tasks by default), in manifest order."""
    if split not in SPLITS:
        raise ManifestError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    names = [t["name"] for t in manifest["tasks"]]
    for name in tasks or []:
        if name not in names:
            raise ManifestError(f"task {name!r} is not in the manifest; tasks: {', '.join(names)}")
    root = Path(root)
    out = []
    for task in manifest["tasks"]:
        if tasks is None or task["name"] in tasks:
            for shard in task["splits"][split]["shards"]:
                out.append((root / shard["path"], root / shard["index"]))
    return out


def summary(manifest: Mapping[str, Any]) -> str:
    """A human-readable table of tasks, classes and split sizes."""
    pre = manifest["preprocessing"]
    lines = [
        f"fastav shards v{manifest['format_version']} by {manifest['builder']} {manifest['builder_version']}",
        f"video {pre['video_codec']} {pre['frame_size']}px {pre['fps']} fps (keyframe every "
        f"{pre['keyframe_interval']}), audio {pre['audio_format']} {pre['sample_rate']} Hz mono",
        f"{len(manifest['classes'])} classes in {len(manifest['categories'])} categories, "
        f"{_task_count(manifest)}, {manifest['rejects']} rejected inputs",
        "",
        f"{'task':<18} {'classes':>7} {'train':>7} {'test':>7} {'retrieval':>9} {'shards':>7}",
    ]
    for task in manifest["tasks"]:
        n = {s: task["splits"][s]["num_samples"] for s in SPLITS}
        shards = sum(len(task["splits"][s]["shards"]) for s in SPLITS)
        lines.append(
            f"{task['name']:<18} {len(task['classes']):>7} {n['train']:>7} {n['test']:>7} {n['retrieval']:>9} "
            f"{shards:>7}"
        )
    c = manifest["counts"]
    lines.append(f"{'total':<18} {len(manifest['classes']):>7} {c['train']:>7} {c['test']:>7} {c['retrieval']:>9}")
    return "\n".join(lines)


def _task_count(manifest: Mapping[str, Any]) -> str:
    pretrain = len(task_names(manifest, PRETRAIN))
    text = f"{len(manifest['tasks'])} tasks"
    return f"{text} ({pretrain} for pre-training)" if pretrain else text
