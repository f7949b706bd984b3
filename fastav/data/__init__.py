"""Data: the DALI pipeline over fastav shards, CAV-MAE's Kaldi fbank on the device, the reference loader, and
in-memory synthetic clips.

``build_loader(cfg, split, tasks=..., rank=..., world_size=...)`` yields the batch contract (``docs/batch-contract.md``)
as device tensors from the source ``data.source`` names: the shards at ``data.root`` or synthetic clips.
``task_names(cfg)`` lists the continual tasks in training order. DALI and torchaudio are imported only by the
modules that need them.
"""

from __future__ import annotations

from typing import Any

from fastav.config import Config, ConfigError
from fastav.data.fbank import kaldi_fbank, normalize_fbank
from fastav.data.loader import AVLoader, DataError
from fastav.data.synthetic import SyntheticAV, synthetic_task_names


def build_loader(cfg: Config, split: str, **kwargs: Any) -> AVLoader | SyntheticAV:
    """The loader of ``split`` ('train', 'val', 'test' or 'retrieval'; 'val' is the part of the training split
    that ``data.val_fraction`` holds out, and 'train' the rest) from ``data.source``; keyword arguments as
    :class:`AVLoader` (``tasks``, ``rank``, ``world_size``, ``train``, ``batch_size``, ``device``)."""
    if cfg.data.source == "synthetic":
        kwargs.pop("multi_frame", None)
        return SyntheticAV(cfg, split, **kwargs)
    return AVLoader(cfg, split, **kwargs)


def dataset_tasks(cfg: Config, role: str | None = "continual") -> list[str]:
    """Names of the dataset's tasks with ``role`` ('continual', or 'pretrain' for the pre-training classes that no
    continual task uses; None: every task), in manifest order, which is the order of the ``task`` ids in
    batches."""
    if cfg.data.source == "synthetic":
        return synthetic_task_names(cfg) if role in ("continual", None) else []
    from shards.manifest import load_manifest

    cfg.validate(require_data=True)
    manifest = load_manifest(cfg.data_root())
    return [t["name"] for t in manifest["tasks"] if role is None or t.get("role", "continual") == role]


def task_names(cfg: Config) -> list[str]:
    """The continual tasks in training order: ``continual.task_order`` if set (each must exist), else the
    dataset's continual tasks in manifest order."""
    available = dataset_tasks(cfg, "continual")
    order = list(cfg.continual.task_order) or available
    missing = [t for t in order if t not in available]
    if missing:
        where = "data.source=synthetic" if cfg.data.source == "synthetic" else f"{cfg.data_root()}/manifest.json"
        raise ConfigError(
            f"continual.task_order: {', '.join(missing)} not among the tasks of {where} ({', '.join(available)}); "
            f"fix the order or leave it empty for the manifest's"
        )
    if not order:
        raise ConfigError(f"the dataset {cfg.data_root()} has no continual task (manifest tasks with role continual)")
    return order


__all__ = [
    "AVLoader",
    "DataError",
    "SyntheticAV",
    "build_loader",
    "dataset_tasks",
    "kaldi_fbank",
    "normalize_fbank",
    "task_names",
]
