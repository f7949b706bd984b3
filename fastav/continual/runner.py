"""Runs: pre-training (one stage) and continual pre-training (one stage per task), from a config.

Both build the same pieces: the process group, the model (identical initial weights on every rank, then
``model.init`` if given), the method of ``method.name``, per-rank loaders of ``data.source``, the
:class:`~fastav.train.trainer.Trainer`, and retrieval on the whole retrieval set after each stage
(:mod:`fastav.eval`). The continual run also writes the report (``report.json``, ``report.md``, plots) at its end.

- **Pre-training** (``launch/pretrain.py``): one stage over ``train.epochs`` epochs of the dataset's pre-training
  task (manifest role 'pretrain') when it has one, else of every task; retrieval at its end with ``eval=True``.
- **Continual** (``launch/continual.py``): the continual tasks in ``continual.task_order`` (or manifest) order,
  ``continual.epochs_per_task`` epochs each, one optimizer whose state carries across tasks; 'multitask' trains
  one stage on all tasks jointly. Retrieval after every task when ``eval.after_each_task``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastav.config import Config, ConfigError
from fastav.continual.methods import METHODS, AVMethod, ReplayMethod
from fastav.data import build_loader, dataset_tasks, task_names
from fastav.eval import evaluate_retrieval
from fastav.log import get_logger
from fastav.models import build_pretrain_model, load_init
from fastav.train.engine import DistInfo, seed_everything
from fastav.train.method import Stage
from fastav.train.trainer import RunResult, Trainer, start_run

log = get_logger("fastav.continual")


@dataclass
class Run:
    """What a run needs besides its stages."""

    cfg: Config
    dist: DistInfo
    run_dir: Path
    method: AVMethod


def build_method(cfg: Config, dist: DistInfo) -> AVMethod:
    """The model (same initial weights on every rank; ``model.init`` loaded when set) inside ``method.name``."""
    seed_everything(cfg.train.seed)
    model = build_pretrain_model(cfg)
    if cfg.model.init:
        report = load_init(model, cfg.model.init, family=cfg.model.arch)
        log.info("model.init %s: %s", cfg.model.init, report)
    if cfg.method.name not in METHODS:
        raise ConfigError(
            f"method.name: {cfg.method.name!r} is a fine-tuning method (run it with launch/finetune.py); continual "
            f"pre-training takes one of {', '.join(METHODS)}"
        )
    cls = METHODS[cfg.method.name]
    if issubclass(cls, ReplayMethod):
        return cls(cfg, model, rank=dist.rank, world_size=dist.world_size)
    return cls(cfg, model)


def setup(cfg: Config) -> Run:
    """Process group, threads, kernel backend, run directory and method; RNG seeded per rank for the run."""
    dist, run_dir = start_run(cfg)
    method = build_method(cfg, dist)
    seed_everything(cfg.train.seed + 1000 * dist.rank)  # per-rank masks and draws
    if isinstance(method, ReplayMethod) and dist.rank == 0:
        per_clip = method.bytes_per_clip()
        log.info(
            "replay memory: %d clips per process x %d process(es), %d bytes (%.2f MB) per clip (%s), %.1f MB per "
            "process on %s",
            method.capacity, dist.world_size, per_clip, per_clip / 1e6, method.memory_layout,
            per_clip * method.capacity / 1e6, dist.device,
        )  # fmt: skip
    return Run(cfg, dist, run_dir, method)


def _ranks(dist: DistInfo) -> dict[str, Any]:
    return {"rank": dist.rank, "world_size": dist.world_size, "device": dist.device}


def retrieval_evaluator(run: Run, tasks: Sequence[str]):
    """``evaluate(module, stage)``: retrieval over the retrieval split of ``tasks`` (gathered over ranks)."""
    cfg = run.cfg
    group_names = dataset_tasks(cfg, role=None)

    def evaluate(module: nn.Module, stage: Stage) -> dict[str, Any]:
        loader = build_loader(cfg, "retrieval", tasks=list(tasks), train=False, **_ranks(run.dist))
        return evaluate_retrieval(
            module, loader, device=run.dist.device, ks=cfg.eval.retrieval_ks, group_names=group_names
        )

    return evaluate


def _train_loader(run: Run):
    def make(stage: Stage):
        return build_loader(run.cfg, "train", tasks=list(stage.tasks) or None, **_ranks(run.dist))

    return make


def pretrain(cfg: Config, *, evaluate: bool = False) -> RunResult:
    """One stage of ``train.epochs`` epochs over the pre-training task (or every task)."""
    if cfg.method.name != "finetune":
        log.info("pre-training trains the plain MAE + InfoNCE objective; method.name=%s is for launch/continual.py",
                 cfg.method.name)  # fmt: skip
        cfg.method.name = "finetune"
    run = setup(cfg)
    tasks = dataset_tasks(cfg, "pretrain") or dataset_tasks(cfg, "continual")
    stage = Stage(0, "pretrain", cfg.train.epochs, tuple(tasks))
    evaluator = retrieval_evaluator(run, tasks) if evaluate else None
    trainer = Trainer(cfg, run.method, dist=run.dist, run_dir=run.run_dir, make_loader=_train_loader(run),
                      evaluate=evaluator)  # fmt: skip
    trainer.resume()
    return trainer.run([stage])


def continual_stages(cfg: Config) -> list[Stage]:
    tasks = task_names(cfg)
    epochs = cfg.continual.epochs_per_task
    if cfg.method.name == "multitask":
        return [Stage(0, "multitask", epochs, tuple(tasks))]
    return [Stage(i, name, epochs, (name,)) for i, name in enumerate(tasks)]


def continual(cfg: Config) -> RunResult:
    """Continual pre-training over the task sequence; writes the report on rank 0 at the end."""
    run = setup(cfg)
    stages = continual_stages(cfg)
    tasks = task_names(cfg)
    evaluator = retrieval_evaluator(run, tasks) if cfg.eval.after_each_task else None
    trainer = Trainer(cfg, run.method, dist=run.dist, run_dir=run.run_dir, make_loader=_train_loader(run),
                      evaluate=evaluator)  # fmt: skip
    trainer.resume()
    result = trainer.run(stages)
    if run.dist.rank == 0 and evaluator is not None:
        from fastav.eval.report import write_continual_report

        write_continual_report(run.run_dir, cfg, result, tasks, memory_bytes_per_clip=_memory_bytes(run.method))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def _memory_bytes(method: AVMethod) -> int | None:
    return method.bytes_per_clip() if isinstance(method, ReplayMethod) else None
