"""The one module that touches DeepSpeed: process group, engine, optimizer, schedule, checkpoints.

Everything DeepSpeed-specific is here; models (:mod:`fastav.models`) are plain single-device modules and the
training loops (:mod:`fastav.train.pretrain`, the continual trainer) talk to :class:`Engine` only.

- The DeepSpeed JSON is generated from the typed config (:meth:`fastav.config.Config.deepspeed_config`):
  micro-batch, gradient accumulation, clipping, bf16, ZeRO stage 0-3.
- The optimizer is a torch ``Adam`` / ``AdamW`` instance built here (so no DeepSpeed optimizer op is compiled),
  with two parameter groups: weight decay on weight matrices only, none on biases, norms, positional tables,
  modality embeddings and mask tokens (the official ``no_weight_decay`` sets). Frozen parameters (CAV-MAE's
  fixed sin-cos tables) are left out.
- The learning-rate schedule is a function of the fractional epoch (cav_mae.md §5: MultiStep with milestones
  in epochs, stepped once per epoch; optional linear warm-up and cosine), wrapped in ``LambdaLR`` and stepped by
  DeepSpeed at every optimizer step; its state travels in the DeepSpeed checkpoint.
- Checkpoints are atomic: every rank writes into ``.step_N.tmp``, rank 0 renames it to ``step_N`` after a
  barrier and then points ``latest`` at it. A checkpoint holds DeepSpeed's model / optimizer / scheduler state,
  the client state (step, epoch, data position, config) and one RNG file per rank, so a resumed run repeats the
  uninterrupted one step for step.
- On a machine without CUDA: ``DS_ACCELERATOR=cpu``, gloo, and the single-process environment variables that
  spare DeepSpeed its MPI discovery (infra.md §4).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastav.config import Config, TrainConfig
from fastav.log import get_logger

log = get_logger("fastav.train")

NO_DECAY_NAMES = ("pos", "modality", "mask_token")
"""Parameters whose name contains one of these get no weight decay (as well as every 1-D parameter)."""
CHECKPOINT_PREFIX = "step_"


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
    """torch Adam (coupled L2, as both papers) or AdamW over :func:`parameter_groups`."""
    groups = parameter_groups(model, train.weight_decay)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=train.lr, betas=(train.betas[0], train.betas[1]))


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
    optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over optimizer steps: factor = :func:`lr_factor` at ``step / steps_per_epoch``."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch} (is the loader empty?)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(train, step / steps_per_epoch))


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


class Engine:
    """A DeepSpeed engine around ``model`` built from ``cfg``; one call of :meth:`train_step` per micro-batch.

    ``model`` must return an object with a ``loss`` tensor and a ``metrics()`` dict (e.g.
    :class:`fastav.models.PretrainOutput`) when called as ``model(fbank, video)``.
    """

    def __init__(self, model: nn.Module, cfg: Config, *, steps_per_epoch: int, dist: DistInfo) -> None:
        import deepspeed

        self.cfg = cfg
        self.dist = dist
        model = model.to(dist.device)
        self.optimizer = build_optimizer(model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, steps_per_epoch)
        self.ds_config = cfg.deepspeed_config(world_size=dist.world_size)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.dtype = torch.bfloat16 if self.ds.bfloat16_enabled() else torch.float32

    @property
    def module(self) -> nn.Module:
        """The wrapped model (its parameters are partitioned under ZeRO-3)."""
        return self.ds.module

    @property
    def global_step(self) -> int:
        """Optimizer steps taken."""
        return int(self.ds.global_steps)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The model inputs of a batch, on the engine's device in its dtype (no copy when they already are)."""
        device = self.dist.device
        fbank = batch["fbank"].to(device=device, dtype=self.dtype, non_blocking=True)
        video = batch["video"].to(device=device, dtype=self.dtype, non_blocking=True)
        return fbank, video

    def train_step(self, batch: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
        """Forward, backward and (at an accumulation boundary) optimizer step on one micro-batch.

        Returns the detached metric tensors (left on the device: nothing is read back here) and whether an
        optimizer step was taken.
        """
        self.ds.train()
        boundary = self.ds.is_gradient_accumulation_boundary()
        out = self.ds(*self.inputs(batch))
        self.ds.backward(out.loss)
        self.ds.step()
        return out.metrics(), boundary

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def save(self, root: str | os.PathLike, client_state: Mapping[str, Any], *, keep: int = 0) -> Path:
        """Write ``root/step_<N>`` atomically (every rank must call this) and point ``root/latest`` at it."""
        root = Path(root)
        tag = f"{CHECKPOINT_PREFIX}{self.global_step:08d}"
        tmp, final = root / f".{tag}.tmp", root / tag
        if self.dist.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        state = {**client_state, "global_step": self.global_step, "world_size": self.dist.world_size}
        self.ds.save_checkpoint(str(tmp), tag="state", client_state=state, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{self.dist.rank:05d}.pt")
        barrier()
        if self.dist.rank == 0:
            (tmp / "meta.json").write_text(
                json.dumps({"step": self.global_step, "time": time.time(), "world_size": self.dist.world_size}) + "\n"
            )
            (tmp / "config.json").write_text(self.cfg.to_json() + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = root / ".latest.tmp"
            latest_tmp.write_text(tag + "\n")
            os.replace(latest_tmp, root / "latest")
            if keep:
                for old in list_checkpoints(root)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore model, optimizer, schedule and this rank's RNG from a checkpoint; returns the client state."""
        path = Path(path)
        if not (path / "state").is_dir():
            raise FileNotFoundError(f"{path}: not a fastav checkpoint (no 'state' directory from DeepSpeed)")
        load_path, client = self.ds.load_checkpoint(str(path), tag="state")
        if load_path is None:
            raise FileNotFoundError(f"{path}: DeepSpeed could not load the checkpoint in {path / 'state'}")
        rng_file = path / f"rng_rank{self.dist.rank:05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        else:
            log.warning("%s: no RNG state for rank %d (saved with another world size); reseeding", path, self.dist.rank)
            seed_everything(self.cfg.train.seed + 1000 * self.dist.rank + self.global_step)
        return dict(client or {})


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
        raise FileNotFoundError(f"train.resume: {setting!r} is not a checkpoint directory (no 'state' inside)")
    return path
