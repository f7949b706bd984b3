"""CAV-MAE-style pre-training (MAE + InfoNCE) of :class:`fastav.models.AVMAE` through :class:`Engine`.

One loop for every recipe: build the model (identical weights on every rank), the loader of this rank, the
DeepSpeed engine; resume when asked; then per micro-batch forward / backward / step, with

- metrics accumulated on the device and read back (averaged over ranks) only every ``train.log_every`` steps,
  together with lr, step time, data-wait time and clips/s (total and per rank);
- checkpoints every ``train.checkpoint_every`` steps (or at each epoch end when 0) and at the end, holding the
  loader position, so a resumed run repeats the uninterrupted one step for step;
- the final weights as ``run_dir/weights.safetensors`` (rank 0).

The loader is anything with AVLoader's protocol (:mod:`fastav.data` on shards, or
:class:`fastav.train.synthetic.SyntheticAV`): ``for batch in loader`` yields the rest of the epoch, ``len``,
``epoch``, ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fastav.config import Config
from fastav.log import MetricLogger, get_logger
from fastav.models import build_pretrain_model, save_weights
from fastav.train.engine import DistInfo, Engine, init_distributed, resolve_resume, seed_everything

log = get_logger("fastav.train")


class Loader(Protocol):
    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...
    def __len__(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    epoch: int
    rank: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """The logged train records of this process's run (rank 0; empty elsewhere)."""
    checkpoint: Path | None = None
    weights: Path | None = None
    retrieval: dict[str, float] = field(default_factory=dict)


def resolve_run_dir(cfg: Config, dist: DistInfo) -> Path:
    """``train.run_dir``, or ``runs/<recipe>-<timestamp>`` chosen by rank 0 and shared with the others."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    name = [f"runs/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])


def _cpu_threads(dist: DistInfo) -> None:
    """Give each CPU process its share of the cores unless OMP_NUM_THREADS says otherwise (oversubscribed
    OpenMP threads slow a small model down a hundredfold on a shared machine)."""
    if dist.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


class _Window:
    """Metric sums on the device between two logging steps."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0
        self.data_time = 0.0
        self.start = time.perf_counter()

    def add(self, metrics: Mapping[str, Tensor]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def read(self, world_size: int) -> dict[str, float]:
        """Means over the window and the ranks: the deliberate device sync of a logging step."""
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k].float() for k in keys]) / max(self.count, 1)
        if world_size > 1:
            torch.distributed.all_reduce(stacked)
            stacked /= world_size
        values = stacked.cpu().tolist()  # sync-ok: logging step
        return dict(zip(keys, values, strict=True))


def pretrain(
    cfg: Config,
    make_loader: Callable[[DistInfo], Loader],
    *,
    make_eval_loader: Callable[[DistInfo], Iterable[dict[str, Tensor]]] | None = None,
) -> PretrainResult:
    """Run (or resume) pre-training as ``cfg`` says; returns where it stopped and what it logged."""
    cfg.validate()
    dist = init_distributed(cfg)
    _cpu_threads(dist)
    run_dir = resolve_run_dir(cfg, dist)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = build_pretrain_model(cfg)
    seed_everything(cfg.train.seed + 1000 * dist.rank)  # per-rank mask draws
    loader = make_loader(dist)
    gas = cfg.train.grad_accum
    steps_per_epoch = len(loader) // gas
    if steps_per_epoch == 0:
        raise ValueError(f"the loader gives {len(loader)} batches per epoch, fewer than train.grad_accum={gas}")
    engine = Engine(model, cfg, steps_per_epoch=steps_per_epoch, dist=dist)
    ckpt_root = run_dir / "checkpoints"
    resume = resolve_resume(cfg.train.resume, ckpt_root)
    if resume is not None:
        client = engine.load(resume)
        loader.load_state_dict(client["data"])
        log.info("resumed from %s at step %d, epoch %d", resume, engine.global_step, loader.epoch)
    logger = MetricLogger(run_dir, tensorboard=cfg.train.tensorboard) if dist.rank == 0 else None
    if dist.rank == 0:
        cfg.save(run_dir)
    result = PretrainResult(run_dir, engine.global_step, loader.epoch, dist.rank)
    try:
        _loop(cfg, engine, loader, logger, ckpt_root, result)
        result.weights = _save_final_weights(cfg, engine, run_dir)
        if make_eval_loader is not None:
            result.retrieval = evaluate_retrieval(engine, make_eval_loader(dist))
            if logger is not None:
                logger.log(result.step, result.retrieval, tag="eval")
    finally:
        if logger is not None:
            logger.close()
    return result


def _loop(
    cfg: Config,
    engine: Engine,
    loader: Loader,
    logger: MetricLogger | None,
    ckpt_root: Path,
    result: PretrainResult,
) -> None:
    train = cfg.train
    clips_per_step = cfg.data.batch_size * train.grad_accum * engine.dist.world_size
    window, saved_at, done = _Window(), -1, False

    def checkpoint() -> None:
        nonlocal saved_at
        state = {"data": loader.state_dict(), "epoch": loader.epoch, "config": cfg.to_dict()}
        result.checkpoint = engine.save(ckpt_root, state, keep=train.keep_checkpoints)
        saved_at = engine.global_step

    while not done and loader.epoch < train.epochs:
        waited = time.perf_counter()
        for batch in loader:
            window.data_time += time.perf_counter() - waited
            metrics, stepped = engine.train_step(batch)
            window.add(metrics)
            if stepped:
                step = engine.global_step
                if step % train.log_every == 0:
                    _log(logger, step, loader.epoch, engine, window, clips_per_step, result)
                    window = _Window()
                if train.checkpoint_every and step % train.checkpoint_every == 0:
                    checkpoint()
                if train.max_steps and step >= train.max_steps:
                    done = True
                    break
            waited = time.perf_counter()
        else:
            if not train.checkpoint_every:
                checkpoint()
    result.step, result.epoch = engine.global_step, loader.epoch
    if saved_at != engine.global_step:
        checkpoint()


def _log(
    logger: MetricLogger | None,
    step: int,
    epoch: int,
    engine: Engine,
    window: _Window,
    clips_per_step: int,
    result: PretrainResult,
) -> None:
    values: dict[str, Any] = window.read(engine.dist.world_size)
    elapsed = time.perf_counter() - window.start
    steps = max(window.count // engine.cfg.train.grad_accum, 1)
    values.update(
        lr=engine.lr,
        epoch=epoch,
        step_time=elapsed / steps,
        data_time=window.data_time / steps,
        clips_per_s=clips_per_step * steps / elapsed,
        clips_per_s_per_rank=clips_per_step * steps / elapsed / engine.dist.world_size,
    )
    if torch.cuda.is_available():
        values["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if logger is not None:
        result.history.append(logger.log(step, values))


def _save_final_weights(cfg: Config, engine: Engine, run_dir: Path) -> Path | None:
    """Rank 0 writes the full model (gathered from the ranks under ZeRO-3) as safetensors."""
    module = engine.module
    path = run_dir / "weights.safetensors"
    if cfg.distributed.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if engine.dist.rank == 0:
                save_weights(module, path, config=cfg)
    elif engine.dist.rank == 0:
        save_weights(module, path, config=cfg)
    return path if engine.dist.rank == 0 else None


@torch.no_grad()
def embed_dataset(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], *, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Retrieval embeddings (L2-normalised, fp32) of every row: audio (N, D), video (N, D) and the rows' ``valid``
    flags (N,) (padding rows of an evaluation loader's last batch are False)."""
    model.eval()
    a, v, valid = [], [], []
    for batch in batches:
        emb_a, emb_v = model.embed_clips(
            batch["fbank"].to(device=device, dtype=dtype), batch["video"].to(device=device, dtype=dtype)
        )
        a.append(emb_a)
        v.append(emb_v)
        ones = torch.ones(emb_a.shape[0], dtype=torch.bool, device=device)
        valid.append(batch["valid"].to(device) if "valid" in batch else ones)
    model.train()
    return torch.cat(a), torch.cat(v), torch.cat(valid)


def recall_at_k(query_ND: Tensor, gallery_ND: Tensor, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose own item (same row) ranks among the top k of the gallery by cosine similarity."""
    sim_NN = query_ND @ gallery_ND.t()
    own_N = sim_NN.diagonal()
    rank_N = (sim_NN > own_N[:, None]).sum(dim=1)
    return {k: float((rank_N < k).float().mean()) for k in ks}  # sync-ok: evaluation, once per run


def evaluate_retrieval(engine: Engine, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
    """Audio->video and video->audio R@1/5/10 over every rank's valid clips (plus chance level, 1/N).

    Every rank must hold the same number of rows (evaluation loaders pad their last batch and flag it).
    """
    a, v, valid = embed_dataset(engine.module, batches, device=engine.dist.device, dtype=engine.dtype)
    if engine.dist.world_size > 1:
        gathered = []
        for x in (a, v, valid.to(torch.uint8)):  # gloo gathers no bool tensors
            parts = [torch.empty_like(x) for _ in range(engine.dist.world_size)]
            torch.distributed.all_gather(parts, x)
            gathered.append(torch.cat(parts))
        a, v, valid = gathered
    a, v = a[valid.bool()], v[valid.bool()]
    out = {f"a2v_r{k}": r for k, r in recall_at_k(a, v).items()}
    out.update({f"v2a_r{k}": r for k, r in recall_at_k(v, a).items()})
    out["chance_r1"] = 1.0 / len(a)
    return out
