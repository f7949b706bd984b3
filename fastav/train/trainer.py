"""The training loop over any :class:`~fastav.train.method.Method`: stages, logging, checkpoints, resume.

A run is a list of :class:`~fastav.train.method.Stage` s trained in order (pre-training is one stage; a continual
run one stage per task, or one 'multitask' stage). For each stage the trainer asks ``make_loader(stage)`` for
this rank's training loader, trains ``stage.epochs`` epochs over it, calls the method's stage hooks, runs
``evaluate(module, stage)`` (retrieval, say) and writes a checkpoint that is never pruned (unless the stage sets
``keep_checkpoint=False``). Within a stage:

- one :meth:`Engine.train_step` per batch, then ``method.after_step``; the loss terms are summed on the device
  and read back (averaged over ranks and over the steps whose loss was finite) only every ``train.log_every``
  steps, together with lr, step time, the share of time spent waiting for data, clips/s, the method's gauges,
  data skips and peak memory;
- a non-finite loss is skipped by the engine on the device and counted; the run stops with
  :class:`TrainingError` once ``train.max_bad_steps`` came in a row (seen at the next logging step);
- checkpoints every ``train.checkpoint_every`` steps (at each epoch end when 0), at the end of each stage, and
  when ``train.max_steps`` stops the run. The checkpoint holds the trainer's shared state (stage, step, the
  evaluation results so far) in ``meta.json`` and, per rank, the loader position and skips and the method's
  ``rank_state`` (a replay memory), so that ``train.resume=auto`` repeats the uninterrupted run step for step
  on every rank; ``metrics.jsonl`` then continues from the checkpoint's step.

At the end rank 0 writes ``weights.safetensors`` (the method's ``model``) and one file per entry of the method's
``extra_weights()`` (STELLA's AVM, say).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

import kernels
from fastav.config import Config
from fastav.log import Bar, MetricLogger, get_logger
from fastav.train.engine import DistInfo, Engine, init_distributed, resolve_resume
from fastav.train.method import Method, Stage, StepOutput

log = get_logger("fastav.train")


class TrainingError(RuntimeError):
    """The run cannot go on (too many non-finite losses in a row); the message says what to change."""


class Loader(Protocol):
    """What the trainer needs of a training loader (:class:`fastav.data.AVLoader`, :class:`fastav.data.SyntheticAV`)."""

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...
    def __len__(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


Evaluate = Callable[[nn.Module, Stage], dict[str, Any]]


@dataclass
class RunResult:
    run_dir: Path
    step: int
    rank: int = 0
    finished: bool = False
    """Every stage ran to its end (False when train.max_steps stopped the run)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The train records logged by this process (rank 0; empty elsewhere)."""
    stage_results: list[dict[str, Any]] = field(default_factory=list)
    """One entry per finished stage: name, step, and what ``evaluate`` returned."""
    checkpoint: Path | None = None
    weights: Path | None = None


def resolve_run_dir(cfg: Config, dist: DistInfo) -> Path:
    """``train.run_dir``, or ``runs/<recipe>-<timestamp>`` chosen by rank 0 and shared with the others."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    name = [f"runs/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])


def start_run(cfg: Config) -> tuple[DistInfo, Path]:
    """What every entry point does first: check the config, join the process group, size the CPU threads, choose
    the kernel backend (``model.kernels``) and resolve the run directory."""
    cfg.validate(require_data=cfg.data.source == "shards")
    dist = init_distributed(cfg)
    cpu_threads(dist)
    kernels.set_backend(cfg.model.kernels)
    return dist, resolve_run_dir(cfg, dist)


def cpu_threads(dist: DistInfo) -> None:
    """Give each CPU process its share of the cores unless OMP_NUM_THREADS says otherwise (oversubscribed
    OpenMP threads slow a small model down a hundredfold on a shared machine)."""
    if dist.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


class _Window:
    """Loss-term sums on the device between two logging steps (only steps with a finite loss count)."""

    def __init__(self, device: torch.device) -> None:
        self.sums: dict[str, Tensor] = {}
        self.finite = torch.zeros((), device=device)
        self.steps = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, terms: Mapping[str, Tensor], ok: Tensor) -> None:
        for key, value in terms.items():
            value = torch.where(ok, value.detach().float(), 0.0)  # a NaN term of a skipped step must not spread
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.finite = self.finite + ok
        self.steps += 1

    def read(self, world_size: int) -> dict[str, Any]:
        """Means over the window's finite steps and the ranks (no term when every step was skipped), the count of
        finite steps, and with several ranks each rank's own mean loss (``loss_by_rank``): the deliberate device
        sync of a logging step."""
        keys = sorted(self.sums)
        stacked = torch.stack([*[self.sums[k] for k in keys], self.finite.float()])
        if world_size > 1:
            parts = [torch.empty_like(stacked) for _ in range(world_size)]
            torch.distributed.all_gather(parts, stacked)
            per_rank = torch.stack(parts).cpu()  # sync-ok: logging step
        else:
            per_rank = stacked[None].cpu()  # sync-ok: logging step
        *sums, finite = per_rank.mean(dim=0).tolist()  # sync-ok: a host tensor already (copied above)
        out: dict[str, Any] = {"finite_steps": int(round(finite))}
        if finite > 0:
            out.update({k: v / finite for k, v in zip(keys, sums, strict=True)})
            if world_size > 1 and "loss" in keys:
                column = keys.index("loss")
                by_rank = per_rank[:, column] / per_rank[:, -1].clamp(min=1)
                out["loss_by_rank"] = by_rank.tolist()  # sync-ok: a host tensor already (copied above)
        return out


class Trainer:
    """Trains ``method`` through ``stages`` (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        method: Method,
        *,
        dist: DistInfo,
        run_dir: Path,
        make_loader: Callable[[Stage], Loader],
        evaluate: Evaluate | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist
        self.run_dir = run_dir
        self.make_loader = make_loader
        self.evaluate = evaluate
        self.engine = Engine(method, cfg, dist=dist)
        self.method: Method = self.engine.module  # type: ignore[assignment]
        self.ckpt_root = run_dir / "checkpoints"
        self.step = 0
        self.stage_index = 0
        self.stage_results: list[dict[str, Any]] = []
        self._loader_state: dict[str, Any] | None = None
        self._resumed_from: Path | None = None
        self.result = RunResult(run_dir, 0, dist.rank)
        self.logger: MetricLogger | None = None

    # --- resume ---------------------------------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Load the checkpoint ``train.resume`` names (if any): weights, optimizer, RNG, this rank's state."""
        path = resolve_resume(self.cfg.train.resume, self.ckpt_root)
        if path is None:
            return None
        shared, own = self.engine.load(path)
        self.step = int(shared["step"])
        self.stage_index = int(shared["stage"])
        self.stage_results = list(shared.get("stage_results", []))
        self._loader_state = own.get("data")
        self.method.load_rank_state(own.get("method", {}))
        self._resumed_from = path
        log.info("resumed from %s: stage %d, step %d", path, self.stage_index, self.step)
        return path

    # --- the run --------------------------------------------------------------------------------------------------

    def run(self, stages: Sequence[Stage]) -> RunResult:
        """Train every stage from where the run stands; returns what happened (on every rank)."""
        if self.dist.rank == 0:
            self.cfg.save(self.run_dir)
            resume_step = self.step if self._resumed_from is not None else None
            self.logger = MetricLogger(self.run_dir, tensorboard=self.cfg.train.tensorboard, resume_step=resume_step)
        try:
            max_steps = self.cfg.train.max_steps
            for stage in stages[self.stage_index :]:
                if max_steps and self.step >= max_steps:
                    break
                loader = self.make_loader(stage)
                if self._loader_state is not None:
                    loader.load_state_dict(self._loader_state)
                    self._loader_state = None
                self.method.on_stage_start(stage)
                if self._train_stage(stage, loader, stages):
                    break  # train.max_steps inside the stage
                self._finish_stage(stage, loader)
            self.result.finished = self.stage_index >= len(stages)
            self.result.weights = self._save_weights()
        finally:
            if self.logger is not None:
                self.logger.close()
        self.result.step = self.step
        self.result.stage_results = list(self.stage_results)
        return self.result

    def _epochs_before(self, stage: Stage, stages: Sequence[Stage]) -> int:
        return sum(s.epochs for s in stages[: stage.index])

    def _train_stage(self, stage: Stage, loader: Loader, stages: Sequence[Stage]) -> bool:
        """Train ``stage`` to its last epoch; returns True when ``train.max_steps`` stopped the run inside it."""
        train = self.cfg.train
        per_epoch = len(loader)
        total = per_epoch * stage.epochs
        done = min(loader.epoch, stage.epochs) * per_epoch + _delivered_in_epoch(loader, per_epoch)
        offset = self._epochs_before(stage, stages)
        bar = Bar(total, f"{stage.name} ({stage.index + 1}/{len(stages)})", "batch", enabled=self.dist.rank == 0,
                  initial=done)  # fmt: skip
        window = _Window(self.dist.device)
        clips_per_batch = self._clips_per_batch(loader)
        try:
            while loader.epoch < stage.epochs:
                waited = time.perf_counter()
                for batch in loader:
                    window.data_time += time.perf_counter() - waited
                    done += 1
                    out, ok, stepped = self.engine.train_step(batch, epoch_progress=offset + done / per_epoch)
                    self.method.after_step(batch, out)
                    window.add(out.terms, ok)
                    bar.update(1)
                    if stepped:
                        self.step += 1
                        if self.step % train.log_every == 0:
                            self._log(stage, loader, window, clips_per_batch)
                            window = _Window(self.dist.device)
                        if train.checkpoint_every and self.step % train.checkpoint_every == 0:
                            self._checkpoint(stage, loader)
                        if train.max_steps and self.step >= train.max_steps:
                            self._checkpoint(stage, loader)
                            return loader.epoch < stage.epochs
                    waited = time.perf_counter()
                if not train.checkpoint_every and loader.epoch < stage.epochs:
                    self._checkpoint(stage, loader)
        finally:
            bar.close()
        return False

    def _finish_stage(self, stage: Stage, loader: Loader) -> None:
        self.method.on_stage_end(stage)
        record: dict[str, Any] = {"stage": stage.index, "name": stage.name, "step": self.step}
        if self.evaluate is not None:
            record["eval"] = self.evaluate(self.method, stage)
            if self.logger is not None:
                line = _eval_line(stage, record["eval"])
                self.logger.log(self.step, {"stage": stage.name, **_flat(record["eval"])}, tag="eval", console=line)
        self.stage_results.append(record)
        self.stage_index = stage.index + 1
        self._checkpoint(None, loader if stage.loader_continues else None, pinned=stage.keep_checkpoint)

    def _clips_per_batch(self, loader: Loader) -> int:
        size = getattr(loader, "batch_size", self.cfg.data.batch_size)
        return int(size) * self.dist.world_size

    # --- logging and checkpoints -------------------------------------------------------------------------------

    def _log(self, stage: Stage, loader: Loader, window: _Window, clips_per_batch: int) -> None:
        engine = self.engine
        values: dict[str, Any] = window.read(self.dist.world_size)
        gauges = self.method.gauges()
        on_device = sorted(k for k, v in gauges.items() if isinstance(v, Tensor))
        counters = torch.stack(
            [engine.bad_steps.float(), engine.bad_run_max.float(), *[gauges[k].float() for k in on_device]]
        ).cpu()  # sync-ok: logging step
        bad_total, bad_run = int(counters[0]), int(counters[1])
        engine.bad_run_max.copy_(engine.bad_run)
        elapsed = time.perf_counter() - window.start
        values.update({k: float(v) for k, v in gauges.items() if not isinstance(v, Tensor)})
        values.update({k: float(counters[2 + i]) for i, k in enumerate(on_device)})
        values.update(
            stage=stage.name,
            epoch=loader.epoch,
            lr=engine.lr,
            step_time=elapsed / max(window.steps, 1),
            data_share=window.data_time / max(elapsed, 1e-9),
            clips_per_s=clips_per_batch * window.steps / max(elapsed, 1e-9),
            bad_steps=bad_total,
        )
        stats = getattr(loader, "stats", None)
        if callable(stats):
            values.update(stats())
        if torch.cuda.is_available():
            values["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.logger is not None:
            self.result.history.append(self.logger.log(self.step, values))
        if bad_run >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"step {self.step}: the loss was NaN or infinite for {bad_run} steps in a row (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}); those steps were skipped, the weights are those of the last good "
                f"step. Lower train.lr, check the inputs (python -m shards verify), or raise train.max_bad_steps"
            )

    def _checkpoint(self, stage: Stage | None, loader: Loader | None, *, pinned: bool = False) -> None:
        shared = {
            "stage": self.stage_index if stage is None else stage.index,
            "step": self.step,
            "stage_results": self.stage_results,
        }
        rank_state = {"data": None if loader is None else loader.state_dict(), "method": self.method.rank_state()}
        self.result.checkpoint = self.engine.save(
            self.ckpt_root, self.step, shared=shared, rank_state=rank_state, keep=self.cfg.train.keep_checkpoints,
            pinned=pinned,
        )  # fmt: skip

    def _save_weights(self) -> Path | None:
        """Rank 0 writes the method's model (gathered from the ranks under ZeRO-3) and its extra weights."""
        from fastav.models import save_weights

        module = self.method
        files = {
            "weights.safetensors": module.model,
            **{f"{k}.safetensors": m for k, m in module.extra_weights().items()},
        }

        def write() -> None:
            if self.dist.rank == 0:
                for name, sub in files.items():
                    save_weights(sub, self.run_dir / name, config=self.cfg)

        if self.cfg.distributed.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                write()
        else:
            write()
        return self.run_dir / "weights.safetensors" if self.dist.rank == 0 else None


def _delivered_in_epoch(loader: Loader, per_epoch: int) -> int:
    delivered = getattr(loader, "delivered", None)
    return 0 if delivered is None else int(delivered) % per_epoch


def _eval_line(stage: Stage, result: Mapping[str, Any]) -> str:
    """One console line of an evaluation: overall R@K and median rank per direction for a retrieval result, else the
    flat numbers."""
    if not all(isinstance(result.get(d), Mapping) and "overall" in result[d] for d in ("a2v", "v2a")):
        return f"after {stage.name}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in _flat(result).items())  # fmt: skip
    parts = []
    for direction in ("a2v", "v2a"):
        overall = result[direction]["overall"]
        recalls = " ".join(f"{k.upper()} {v:.1f}" for k, v in overall.items() if k.startswith("r") and k[1:].isdigit())
        parts.append(f"{direction} {recalls} MedR {overall['median_rank']:g}")
    return f"retrieval after {stage.name} ({result.get('gallery')} clips, %): " + " | ".join(parts)


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a2v": {"overall": {"r1": 3.0}}}`` -> ``{"a2v/overall/r1": 3.0}`` (numbers and strings only)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "/"))
        elif isinstance(value, int | float | str):
            out[name] = value
    return out


def step_output(loss: Tensor, **terms: Tensor) -> StepOutput:
    """A :class:`StepOutput` whose terms include the loss itself (detached)."""
    return StepOutput(loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}})
