"""A fine-tuning run from a config: classification probes, CAV-MAE fine-tuning, MLA and its baselines.

``finetune(cfg)`` builds the process group, the method of ``method.name`` (its backbone from ``model.init``), the
training loader of ``data.source`` and a :class:`~fastav.train.trainer.Trainer` over one stage per epoch, so that
the trainer's stage hooks give every epoch its evaluation, its (prunable) checkpoint and a resumable record:

- after each epoch: scores of every output of the method ('audio', 'video', 'fused', ...) on the validation split
  ('val': ``data.val_fraction`` of the training split, held out) and on the test split; accuracy for single-label
  data, mAP for multi-label data (:mod:`fastav.eval.classification`). The validation score of the method's primary
  output ('fused', or the one modality of a unimodal mode) picks the best epoch, whose weights rank 0 keeps in
  ``run_dir/selected/best_val.safetensors``; with weight averaging (``method.classify.average_from``) rank 0 folds
  the epoch's weights into ``run_dir/selected/average.safetensors`` (a running arithmetic mean in fp32).
- at the end: the weights chosen by ``method.classify`` (the average, else the best validation epoch, else the
  last epoch; the test split never chooses) are loaded and scored once more on both splits; rank 0 writes
  ``report.json``, ``report.md`` and the plots (:mod:`fastav.eval.finetune_report`).

The test scores after every epoch are there to draw curves; the figures name the split they come from.

Every epoch is one stage of one epoch over the same training loader, seen through :class:`EpochView` (so the
shuffling continues epoch after epoch), with ``keep_checkpoint=False`` (epoch checkpoints are pruned like step
checkpoints) and ``loader_continues=True`` (an epoch's end checkpoint keeps the loader's position); the selection
files carry their epoch and score, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fastav.config import FINETUNE_METHODS, Config, ConfigError
from fastav.data import build_loader
from fastav.eval.classification import classification_metrics, collect
from fastav.finetune.balance import MLA, PAIR_METHODS, build_pair_method
from fastav.finetune.methods import FinetuneMethod, build_classify_method
from fastav.log import get_logger
from fastav.models.weights import FORMAT, FORMAT_VERSION, load_weights, read_state_dict, read_weights_metadata
from fastav.train.engine import DistInfo, barrier, seed_everything
from fastav.train.method import Stage
from fastav.train.trainer import RunResult, Trainer, start_run

log = get_logger("fastav.finetune")

BEST_FILE = "selected/best_val.safetensors"
AVERAGE_FILE = "selected/average.safetensors"


@dataclass
class FinetuneResult:
    run: RunResult
    epochs: list[dict[str, Any]] = field(default_factory=list)
    """Per epoch: ``{"epoch", "step", "val": {...}, "test": {...}}``."""
    selection: dict[str, Any] = field(default_factory=dict)
    """Which weights were tested: ``{"how", "epoch" or "epochs", "file"}``."""
    final: dict[str, Any] = field(default_factory=dict)
    """Scores of the selected weights: ``{"val": {...}, "test": {...}}``."""
    report: Path | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def num_classes(cfg: Config) -> int:
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_classes
    from shards.manifest import load_manifest

    return len(load_manifest(cfg.data_root())["classes"])


def index_bound(cfg: Config) -> int:
    """One more than the largest sample ``index`` of the training split (QMF's history table size)."""
    if cfg.data.source == "synthetic":
        return 2 * cfg.data.synthetic_clips
    from fastav.data.index import ShardIndex
    from shards.manifest import load_manifest

    index = ShardIndex(cfg.data_root(), load_manifest(cfg.data_root()), "train")
    return 1 + max(int(index.fetch(i).meta["index"]) for i in range(len(index)))


class EpochView:
    """The run's one training loader, seen by each one-epoch stage as if it started at epoch 0.

    ``epoch`` and ``delivered`` count from ``first`` epochs in; iteration, length and state are the loader's own,
    so its shuffling continues from epoch to epoch and a checkpoint (an epoch's end included: the stages say
    ``loader_continues``) stores its absolute position.
    """

    def __init__(self, loader: Any, first: int) -> None:
        self.loader = loader
        self.first = first

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.epoch - self.first

    @property
    def delivered(self) -> int:
        return self.loader.delivered - self.first * len(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        stats = getattr(self.loader, "stats", None)
        return stats() if callable(stats) else {}


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation, selection, weight averaging
# ---------------------------------------------------------------------------------------------------------------------


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """A fastav weights file (loadable by :func:`fastav.models.load_weights`), written atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


class Evaluator:
    """``evaluate(module, stage)`` for the trainer, then :meth:`final` (see the module docstring)."""

    def __init__(self, cfg: Config, dist: DistInfo, run_dir: Path) -> None:
        self.cfg = cfg
        self.dist = dist
        self.run_dir = run_dir
        self.splits = (["val"] if cfg.data.val_fraction > 0 else []) + ["test"]
        self._loaders: dict[str, Any] = {}
        c = cfg.method.classify
        self.average = range(c.average_from, (c.average_to or cfg.train.epochs) + 1) if c.average_from else None

    def loader(self, split: str, window_start: float | None = None) -> Any:
        """The evaluation loader of ``split``; for a test window, one whose clips start at ``window_start``."""
        key = (split, window_start)
        if key not in self._loaders:
            cfg = self.cfg
            if window_start is not None:
                cfg = copy.copy(cfg)
                cfg.data = dataclasses.replace(cfg.data, eval_window_start=window_start)
            self._loaders[key] = build_loader(
                cfg, split, train=False, rank=self.dist.rank, world_size=self.dist.world_size,
                device=self.dist.device, multi_frame=cfg.method.classify.multi_frame_eval,
            )  # fmt: skip
        return self._loaders[key]

    def scores(self, module: FinetuneMethod, split: str) -> dict[str, Any]:
        """Accuracy or mAP of every output on ``split``; on the test split with ``method.classify.test_windows`` > 1,
        over the predictions of every window of every clip (``n`` counts predictions, ``windows`` the starts)."""
        if split != "test" or self.cfg.method.classify.test_windows == 1:
            scores, labels = collect(module, self.loader(split), device=self.dist.device)
            return classification_metrics(scores, labels, multilabel=module.multilabel)
        starts = scored_window_starts(self.cfg)
        runs = [collect(module, self.loader(split, s), device=self.dist.device) for s in starts]
        scores = {name: np.concatenate([r[0][name] for r in runs]) for name in runs[0][0]}
        labels = np.concatenate([r[1] for r in runs])
        return {**classification_metrics(scores, labels, multilabel=module.multilabel), "windows": starts}

    def __call__(self, module: FinetuneMethod, stage: Stage) -> dict[str, Any]:
        epoch = stage.index + 1
        record: dict[str, Any] = {"epoch": epoch, **{split: self.scores(module, split) for split in self.splits}}
        if self.dist.rank == 0:
            if "val" in record:
                self._keep_if_best(module, epoch, record["val"][module.primary])
            if self.average is not None and epoch in self.average:
                self._fold_into_average(module, epoch)
        barrier()
        return record

    def _keep_if_best(self, module: FinetuneMethod, epoch: int, score: float) -> None:
        path = self.run_dir / BEST_FILE
        if path.is_file():
            meta = read_weights_metadata(path)
            if int(meta["epoch"]) >= epoch or float(meta["score"]) >= score:  # a replayed epoch, or no better
                return
        tensors = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
        _write_tensors(path, tensors, {"epoch": str(epoch), "score": repr(score), "config": self.cfg.to_json()})

    def _fold_into_average(self, module: FinetuneMethod, epoch: int) -> None:
        path = self.run_dir / AVERAGE_FILE
        epochs: list[int] = []
        mean: dict[str, Tensor] = {}
        if path.is_file():
            epochs = json.loads(read_weights_metadata(path)["epochs"])
            if epoch in epochs:  # a resumed run replaying an epoch already folded in
                return
            mean, _ = read_state_dict(path)
        n = len(epochs) + 1
        for key, value in module.model.state_dict().items():
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.float()
                mean[key] = value if key not in mean else mean[key] + (value - mean[key]) / n
            else:
                mean[key] = value  # counters (BatchNorm's num_batches_tracked): the latest
        _write_tensors(path, mean, {"epochs": json.dumps([*epochs, epoch]), "config": self.cfg.to_json()})

    def final(self, module: FinetuneMethod) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load the selected weights (on every rank) and score them: ``(selection, {split: scores})``."""
        c = self.cfg.method.classify
        barrier()
        average, best = self.run_dir / AVERAGE_FILE, self.run_dir / BEST_FILE
        if self.average is not None and average.is_file():
            epochs = json.loads(read_weights_metadata(average)["epochs"])
            selection = {"how": "weight average", "epochs": epochs, "file": str(average)}
            load_weights(module.model, average)
        elif c.select == "val" and best.is_file():
            meta = read_weights_metadata(best)
            selection = {"how": "best validation epoch", "epoch": int(meta["epoch"]), "file": str(best),
                         "val_score": float(meta["score"])}  # fmt: skip
            load_weights(module.model, best)
        else:
            selection = {"how": "last epoch"}
            if c.select == "val" or self.average is not None:
                selection["note"] = "the selected weights were never written (the run stopped before an epoch ended)"
        selection["output"] = module.primary
        return selection, {split: self.scores(module, split) for split in self.splits}


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def check(cfg: Config) -> None:
    """What a fine-tuning run needs of the config beyond each section's own checks."""
    c = cfg.method.classify
    if cfg.method.name not in FINETUNE_METHODS:
        raise ConfigError(
            f"method.name: got {cfg.method.name!r}; accepted for fine-tuning: {', '.join(FINETUNE_METHODS)}"
        )
    if cfg.distributed.zero_stage == 3:
        raise ConfigError(
            "distributed.zero_stage: got 3; accepted: 0, 1 or 2 for fine-tuning (weights are saved per epoch)"
        )
    if c.select == "val" and cfg.data.val_fraction <= 0 and not c.average_from:
        raise ConfigError(
            "method.classify.select: got 'val' with data.val_fraction=0; hold out a validation split "
            "(data.val_fraction=0.1, say) or choose method.classify.select=last (the test split never selects)"
        )
    if c.average_from > cfg.train.epochs or c.average_to > cfg.train.epochs:
        raise ConfigError(
            f"method.classify.average_from / average_to: got {c.average_from} / {c.average_to}; accepted: epochs "
            f"within train.epochs ({cfg.train.epochs})"
        )
    if c.multi_frame_eval and cfg.data.sampling != "cavmae":
        raise ConfigError("method.classify.multi_frame_eval: true needs data.sampling=cavmae (the 1-fps frame grid)")
    if c.test_windows > 1 and (cfg.data.sampling != "stella" or cfg.data.source != "shards"):
        raise ConfigError(
            f"method.classify.test_windows: got {c.test_windows}; accepted: 1, or more with data.sampling=stella on "
            f"shards (got data.sampling={cfg.data.sampling}, data.source={cfg.data.source}: "
            f"{'synthetic clips have no time axis' if cfg.data.source != 'shards' else 'CAV-MAE samples a frame grid'})"
        )


def scored_window_starts(cfg: Config) -> list[float]:
    """Start times (seconds) of the windows each test clip is scored on: ``method.classify.test_windows`` of them,
    every ``data.num_frames / 2`` seconds from 0 (STELLA: 0, 2, 4, 6 s), or ``[data.eval_window_start]``."""
    n = cfg.method.classify.test_windows
    if n == 1:
        return [cfg.data.eval_window_start]
    return [i * cfg.data.num_frames / 2 for i in range(n)]


def build_method(cfg: Config) -> FinetuneMethod:
    """The method of ``method.name`` with the same initial weights on every rank."""
    seed_everything(cfg.train.seed)
    classes = num_classes(cfg)
    if cfg.method.name in PAIR_METHODS:
        bound = index_bound(cfg) if cfg.method.name == "qmf" else 0
        return build_pair_method(cfg, classes, index_bound=bound)
    return build_classify_method(cfg, classes)


def finetune(cfg: Config) -> FinetuneResult:
    """Train, evaluate every epoch, test the selected weights; rank 0 writes the report."""
    cfg.validate(require_data=cfg.data.source == "shards")  # a config error before check's own messages
    check(cfg)
    dist, run_dir = start_run(cfg)
    method = build_method(cfg)
    seed_everything(cfg.train.seed + 1000 * dist.rank)
    train_loader = build_loader(cfg, "train", rank=dist.rank, world_size=dist.world_size, device=dist.device)
    if isinstance(method, MLA):
        method.batches_per_epoch = len(train_loader)
    stages = [
        Stage(e, f"epoch{e + 1}", 1, keep_checkpoint=False, loader_continues=True) for e in range(cfg.train.epochs)
    ]
    evaluator = Evaluator(cfg, dist, run_dir)
    trainer = Trainer(cfg, method, dist=dist, run_dir=run_dir,
                      make_loader=lambda stage: EpochView(train_loader, stage.index), evaluate=evaluator)  # fmt: skip
    if trainer.resume() is None and dist.rank == 0:
        shutil.rmtree(run_dir / "selected", ignore_errors=True)  # a fresh run must not inherit an older run's choice
    barrier()
    run = trainer.run(stages)
    module: FinetuneMethod = trainer.method  # type: ignore[assignment]
    selection, final = evaluator.final(module)
    epochs = [{"step": r["step"], **r["eval"]} for r in run.stage_results if "eval" in r]
    result = FinetuneResult(run, epochs, selection, final)
    if dist.rank == 0:
        from fastav.eval.finetune_report import write_finetune_report

        result.report = write_finetune_report(run_dir, cfg, result)
    barrier()
    return result
