"""The one module that touches DeepSpeed: process group, engine, optimizer, schedule, checkpoints.

Everything DeepSpeed-specific is here; models (:mod:`fastav.models`) are plain single-device modules, methods
(:mod:`fastav.train.method`) own the batch and the loss, and the loop (:mod:`fastav.train.trainer`) talks to
:class:`Engine` only.

- The DeepSpeed JSON is generated from the typed config (:meth:`fastav.config.Config.deepspeed_config`):
  micro-batch, gradient accumulation, clipping, bf16, ZeRO stage 0-3.
- The optimizer is torch's fused ``Adam`` / ``AdamW`` built here (so no DeepSpeed optimizer op is compiled),
  with two parameter groups: weight decay on weight matrices only, none on biases, norms, positional tables,
  modality embeddings and mask tokens (the official ``no_weight_decay`` sets); a method may define its own
  ``param_groups(train_cfg)``. Frozen parameters are left out. The fused optimizer skips a step on the device
  when told to (``found_inf``), which is how a non-finite loss is skipped without a host read.
- The learning-rate schedule is a function of the fractional epoch (CAV-MAE: MultiStep with milestones in
  epochs; optional linear warm-up and cosine), wrapped in ``LambdaLR`` and stepped by DeepSpeed at every
  optimizer step; its state travels in the DeepSpeed checkpoint.
- Checkpoints are atomic: every rank writes into ``.step_N.tmp``, rank 0 renames it to ``step_N`` after a
  barrier and then points ``latest`` at it. A checkpoint holds DeepSpeed's model / optimizer / scheduler state,
  ``meta.json`` (step, world size, the trainer's shared state) and one ``rank_<r>.pt`` per rank (RNG, data
  position, skips, the method's per-rank state such as a replay memory), so a resumed run repeats the
  uninterrupted one step for step on every rank.
- On a machine without CUDA: ``DS_ACCELERATOR=cpu``, gloo, and the single-process environment variables that
  spare DeepSpeed its MPI discovery.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastav.config import Config, ConfigError, TrainConfig
from fastav.log import get_logger
from fastav.train.method import StepOutput

log = get_logger("fastav.train")

NO_DECAY_NAMES = ("pos", "modality", "mask_token")
"""Parameters whose name contains one of these get no weight decay (as well as every 1-D parameter)."""
CHECKPOINT_PREFIX = "step_"
RANK_FILE_PREFIX = "rank_"


# ---------------------------------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> DistInfo:
    """Start (or join) the process group through DeepSpeed; works under the ``deepspeed`` launcher and alone.

    Run alone, the rank variables are set for a world of one (loopback, a free port) so DeepSpeed does not try
    MPI discovery. Without CUDA, ``DS_ACCELERATOR=cpu`` and gloo are used.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # torch's extension builder warns "No CUDA runtime is found" in every process of a CPU machine with a CUDA
        # toolkit installed; nothing here builds CUDA code, so the warning only confuses
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timedelta(minutes=cfg.distributed.timeout_minutes),
            verbose=False,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device, backend)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups of trainable parameters: with weight decay (matrices) and without (biases, norms, 1-D
    parameters, positional tables, modality embeddings, mask tokens)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(tag in name for tag in NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """torch's fused Adam (coupled L2, as both papers), AdamW or SGD with momentum (MLA) over the model's
    parameter groups.

    The groups are ``model.param_groups(train)`` when the model defines it, else :func:`parameter_groups`; a group
    may carry a ``"name"`` for :meth:`Engine.step`. The fused implementation (CUDA and CPU) is the fastest, and it
    honours ``optimizer.found_inf``: a step with it set leaves parameters and moments unchanged, decided on the
    device.
    """
    custom = getattr(model, "param_groups", None)
    groups = custom(train) if callable(custom) else parameter_groups(model, train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, fused=True)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=train.lr, betas=(train.betas[0], train.betas[1]), fused=True)


def lr_factor(train: TrainConfig, epoch: float) -> float:
    """Multiplier of ``train.lr`` at fractional epoch ``epoch`` (0 = start of training).

    'multistep' multiplies by gamma at each milestone reached (epoch index >= milestone, epochs counted from 0:
    CAV-MAE's milestones 10, 15, 20, 25 keep epochs 1-10 at full lr); 'cosine' decays to 0 over
    ``train.epochs``; warm-up ramps linearly over ``train.warmup_epochs`` first.
    """
    factor = 1.0
    if train.schedule == "multistep":
        factor = train.gamma ** sum(1 for m in train.milestones if math.floor(epoch) >= m)
    elif train.schedule == "cosine":
        span = max(train.epochs - train.warmup_epochs, 1e-9)
        progress = min(max(epoch - train.warmup_epochs, 0.0) / span, 1.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    if train.warmup_epochs > 0 and epoch < train.warmup_epochs:
        factor *= epoch / train.warmup_epochs
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, epoch_of_step: Callable[[int], float]
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over optimizer steps: factor = :func:`lr_factor` at ``epoch_of_step(step)``, the fractional
    epoch reached after ``step`` optimizer steps (the engine passes the trainer's progress)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(train, epoch_of_step(step)))


# ---------------------------------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain numbers (``weights_only``-loadable)."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CPU tensors read at resume time, not in a training step)."""
    py = state["python"]
    words = py["state"].tolist()  # sync-ok: resume, not a step
    random.setstate((py["version"], tuple(int(x) for x in words), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)  # sync-ok: resume, not a step
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed as asked; the message says why and what to do."""


class Engine:
    """DeepSpeed around a :class:`fastav.train.method.Method`: forward, backward, optimizer step, checkpoints.

    The engine calls ``method(batch)`` and back-propagates the returned ``StepOutput.loss``; it never looks at
    the batch. A non-finite loss on any rank makes the optimizer skip the step on every rank without a host
    read: the finiteness flag is all-reduced on the device and handed to the fused optimizer as ``found_inf``
    (the mechanism ``torch.amp.GradScaler`` uses), so parameters and moments stay as they were. Counters of
    skipped steps stay on the device until the trainer reads them on a logging step.

    Methods with their own backward / optimizer calls (``manual_steps``) get :meth:`backward` and :meth:`step`.
    ZeRO stages 0-2 allow them (each call is a DeepSpeed micro-step with ``train.grad_accum=1``); ZeRO-3
    partitions parameters between the calls and is refused for them.
    """

    def __init__(self, method: nn.Module, cfg: Config, *, dist: DistInfo) -> None:
        import deepspeed

        if getattr(method, "manual_steps", False):
            if cfg.distributed.zero_stage == 3:
                raise ConfigError(
                    f"distributed.zero_stage: got 3; accepted: 0, 1 or 2 for method.name='{cfg.method.name}' (it "
                    f"makes its own backward and optimizer calls per batch, which ZeRO-3's partitioning does not allow)"
                )
            if cfg.train.grad_accum != 1:
                raise ConfigError(
                    f"train.grad_accum: got {cfg.train.grad_accum}; accepted: 1 for method.name='{cfg.method.name}' "
                    f"(it steps the optimizer itself)"
                )
        self.cfg = cfg
        self.dist = dist
        method = method.to(dist.device)
        self.optimizer = build_optimizer(method, cfg.train)
        self.epoch_progress = 0.0
        """Fractional epoch the lr schedule reads when DeepSpeed steps it (set by the trainer)."""
        self.scheduler = build_scheduler(self.optimizer, cfg.train, lambda _step: self.epoch_progress)
        self.ds_config = cfg.deepspeed_config(world_size=dist.world_size)
        self.ds, _, _, _ = deepspeed.initialize(
            model=method,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        device = dist.device
        self._ok_window = torch.ones((), dtype=torch.bool, device=device)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        """Optimizer steps skipped for a non-finite loss, in all (device scalar)."""
        self.bad_run = torch.zeros((), dtype=torch.int64, device=device)
        """Skipped steps in a row up to the last one (device scalar)."""
        self.bad_run_max = torch.zeros((), dtype=torch.int64, device=device)
        """Longest run of skipped steps since the trainer last reset it (device scalar)."""

    @property
    def module(self) -> nn.Module:
        """The wrapped method (its parameters are partitioned under ZeRO-3)."""
        return self.ds.module

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (skipped ones included)."""
        return int(self.ds.global_steps)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds.bfloat16_enabled() else torch.float32

    # --- steps ------------------------------------------------------------------------------------------------------

    def train_step(self, batch: Mapping[str, Tensor], *, epoch_progress: float) -> tuple[StepOutput, Tensor, bool]:
        """One micro-batch: forward, backward and (at an accumulation boundary) the optimizer step.

        ``epoch_progress`` is the fractional epoch reached once this batch is done (the lr schedule reads it).
        Returns the method's output, the device flag "the loss was finite on every rank", and whether an optimizer
        step was taken.
        """
        self.ds.train()
        self.epoch_progress = epoch_progress
        boundary = self.ds.is_gradient_accumulation_boundary()
        if getattr(self.ds.module, "manual_steps", False):
            out = self.ds.module.manual_step(batch, self)
            return out, self._ok_window.clone(), True
        out = self.ds(batch)
        ok = self.finite_everywhere(out.loss)
        self._ok_window &= ok
        self.ds.backward(out.loss)
        if boundary:
            self._before_optimizer_step()
        self.ds.step()
        if boundary:
            self._ok_window.fill_(True)
        return out, ok, boundary

    def finite_everywhere(self, loss: Tensor) -> Tensor:
        """Device bool: ``loss`` is finite on every rank (an all-reduce on the device, no host read)."""
        ok = torch.isfinite(loss.detach()).to(torch.int32).reshape(())
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return ok.bool()

    def _before_optimizer_step(self) -> None:
        bad = ~self._ok_window
        self.optimizer.found_inf = bad.float()  # read by the fused optimizer: a skipped step changes nothing
        self.bad_steps += bad
        self.bad_run.mul_(bad).add_(bad)
        torch.maximum(self.bad_run_max, self.bad_run, out=self.bad_run_max)

    def backward(self, loss: Tensor) -> Tensor:
        """For ``manual_steps`` methods: back-propagate ``loss``; returns its all-ranks finiteness flag."""
        ok = self.finite_everywhere(loss)
        self._ok_window &= ok
        self.ds.backward(loss)
        return ok

    def step(self, groups: Collection[str] | None = None) -> None:
        """For ``manual_steps`` methods: the optimizer step (skipped on every rank if a loss since the last step
        was not finite).

        ``groups``: step only the parameter groups with these ``"name"`` s (all when None). The others are left
        out of the update, so their parameters get no momentum, moment or weight-decay change (MLA's resting
        encoder). Relying on "no gradient, no update" is not enough: DeepSpeed's gradient reduction gives every
        parameter without a gradient a zero one, and under ZeRO-1/2 and DeepSpeed's bf16 optimizer every group is
        one flat fp32 partition whose gradient always exists. So the group itself is emptied for the duration of
        the step; DeepSpeed keeps the optimizer's group dicts and steps them in place, which makes this hold on
        every path.
        """
        self._before_optimizer_step()
        held: list[tuple[dict[str, Any], list[Tensor]]] = []
        if groups is not None:
            names = {g.get("name") for g in self.optimizer.param_groups}
            unknown = sorted(set(groups) - names)
            if unknown:
                known = sorted(map(str, names))
                raise ValueError(f"Engine.step: no parameter group named {unknown}; the groups are {known}")
            held = [(g, g["params"]) for g in self.optimizer.param_groups if g.get("name") not in groups]
            for group, _ in held:
                group["params"] = []
        try:
            self.ds.step()
        finally:
            for group, params in held:
                group["params"] = params
        self._ok_window.fill_(True)

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def save(
        self,
        root: str | os.PathLike,
        step: int,
        *,
        shared: Mapping[str, Any],
        rank_state: Mapping[str, Any],
        keep: int = 0,
        pinned: bool = False,
    ) -> Path:
        """Write ``root/step_<step>`` atomically (every rank must call this) and point ``root/latest`` at it.

        ``shared`` (the same on every rank: stage, step, evaluation results) goes to ``meta.json``; ``rank_state``
        (data position, skips, replay memory: different per rank) to this rank's ``rank_<r>.pt`` with its RNG
        states. ``pinned`` checkpoints (the end of a stage) are never pruned by ``keep``. ``root`` must be on a
        filesystem every node sees.
        """
        root = Path(root)
        tag = f"{CHECKPOINT_PREFIX}{step:08d}"
        tmp, final = root / f".{tag}.tmp", root / tag
        if self.dist.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        self.ds.save_checkpoint(str(tmp), tag="state", save_latest=False)
        own = {
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "rng": rng_state(),
            "bad_steps": self.bad_steps.cpu(),  # sync-ok: checkpoint
            **rank_state,
        }
        torch.save(own, tmp / f"{RANK_FILE_PREFIX}{self.dist.rank:05d}.pt")
        barrier()
        if self.dist.rank == 0:
            meta = {
                "step": step,
                "optimizer_steps": self.global_step,
                "world_size": self.dist.world_size,
                "time": time.time(),
                "pinned": pinned,
                "shared": dict(shared),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            (tmp / "config.json").write_text(self.cfg.to_json() + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = root / ".latest.tmp"
            latest_tmp.write_text(tag + "\n")
            os.replace(latest_tmp, root / "latest")
            if keep:
                unpinned = [p for p in list_checkpoints(root) if not _pinned(p)]
                for old in unpinned[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model, optimizer, schedule, this rank's RNG and skip counter; returns ``(shared, rank_state)``.

        Resuming with another world size is refused: every rank's data position, skipped samples and replay memory
        live in its own file, and spreading them over a different number of ranks would lose or duplicate them.
        """
        path = Path(path)
        meta_file = path / "meta.json"
        if not (path / "state").is_dir() or not meta_file.is_file():
            raise CheckpointError(f"{path}: not a fastav checkpoint (no 'state' directory or meta.json)")
        meta = json.loads(meta_file.read_text())
        saved = int(meta["world_size"])
        if saved != self.dist.world_size:
            raise CheckpointError(
                f"{path} was written by {saved} processes and this run has {self.dist.world_size}: each process's data "
                f"position, skipped samples and replay memory are stored per process and would be lost or duplicated. "
                f"Resume with {saved} processes, or start a new run from its weights with "
                f"model.init={path.parent.parent / 'weights.safetensors'} (written at the end of a run)"
            )
        load_path, _ = self.ds.load_checkpoint(str(path), tag="state")
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load the checkpoint in {path / 'state'}")
        own = torch.load(path / f"{RANK_FILE_PREFIX}{self.dist.rank:05d}.pt", map_location="cpu", weights_only=True)
        set_rng_state(own.pop("rng"))
        self.bad_steps.fill_(int(own.pop("bad_steps")))
        for key in ("rank", "world_size"):
            own.pop(key)
        return dict(meta["shared"]), own


def _pinned(path: Path) -> bool:
    try:
        return bool(json.loads((path / "meta.json").read_text()).get("pinned"))
    except (OSError, ValueError):
        return False


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_resume(setting: str, root: str | os.PathLike) -> Path | None:
    """The checkpoint ``train.resume`` names: a path, 'auto' (the one ``root/latest`` names, if any) or none."""
    if not setting:
        return None
    if setting == "auto":
        latest = Path(root) / "latest"
        if latest.is_file():
            return Path(root) / latest.read_text().strip()
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(setting)
    if not (path / "state").is_dir():
        raise CheckpointError(f"train.resume: {setting!r} is not a checkpoint directory (no 'state' inside)")
    return path
