"""STELLA's AVM stage: the audio-video matching module trained with the backbone frozen, before the continual run.

The paper pre-trains the AVM (L_AVM: BCE on pairs of which half are deranged) on the backbone's pre-training data
with the backbone frozen, then starts the continual run from it. STELLA's released commands leave
``avm_pretrain_path`` empty, so their continual runs start from a random AVM; fastav follows the method: this
stage writes ``avm.safetensors``, which ``method.stella.avm_init`` loads (left empty, the AVM starts random).

    deepspeed --num_gpus 4 launch/avm.py --recipe stella_vggsound data.root=/data/as20k \\
        model.init=/ckpt/audioset_pretrained.pth train.run_dir=runs/avm
    deepspeed --num_gpus 4 launch/continual.py --recipe stella_vggsound data.root=/data/vgg-stella \\
        model.init=/ckpt/audioset_pretrained.pth method.stella.avm_init=runs/avm/avm.safetensors

One stage of ``method.stella.avm_epochs`` epochs over the dataset's pre-training task (every continual task when
it has none, with a warning: the AVM then sees the future tasks), Adam at ``train.lr`` on the AVM's parameters
only (the backbone's have ``requires_grad=False``, so the optimizer never holds them). At the end: the matching
loss and accuracy on the test split of the same tasks (``eval`` record), ``avm.safetensors`` and, unchanged,
``weights.safetensors`` (the backbone it was trained on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastav.config import Config
from fastav.data import build_loader, dataset_tasks
from fastav.log import get_logger
from fastav.models import AVMAE, AVMatching, build_avm, build_pretrain_model, load_init, matching_loss
from fastav.models.weights import load_avm
from fastav.train.engine import seed_everything
from fastav.train.method import Method, Stage, StepOutput
from fastav.train.trainer import RunResult, Trainer, start_run

log = get_logger("fastav.continual")


class AVMStage(Method):
    """L_AVM on the current batch; the backbone frozen (no gradient, no optimizer state), the AVM trained."""

    name: ClassVar[str] = "avm"

    def __init__(self, cfg: Config, model: AVMAE, avm: AVMatching) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model.requires_grad_(False)
        self.avm = avm

    def matching(self, fbank: Tensor, video: Tensor) -> tuple[Tensor, Tensor]:
        """(L_AVM, matching accuracy) of a batch: frozen codes and joint layers, the AVM with a gradient."""
        dtype = self.input_dtype()
        enc = self.model.encoder
        with torch.no_grad():
            z_a, z_v = enc.specific_codes(fbank.to(dtype), video.to(dtype))
        loss, logits_B, labels_B = matching_loss(self.avm, torch.no_grad()(enc.joint_codes), z_a, z_v)
        acc = ((logits_B.detach() > 0).float() == labels_B).float().mean()
        return loss, acc

    def forward(self, batch: Mapping[str, Tensor]) -> StepOutput:
        loss, acc = self.matching(batch["fbank"], batch["video"])
        return StepOutput(loss, {"loss": loss.detach(), "loss_avm": loss.detach(), "avm_acc": acc})

    def extra_weights(self) -> dict[str, nn.Module]:
        return {"avm": self.avm}


def build_avm_stage(cfg: Config) -> AVMStage:
    """The backbone (``model.init``) and the AVM (``method.stella.avm_init`` if set, else random), same on every
    rank."""
    seed_everything(cfg.train.seed)
    model = build_pretrain_model(cfg)
    if cfg.model.init:
        log.info("model.init %s: %s", cfg.model.init, load_init(model, cfg.model.init, family=cfg.model.arch))
    else:
        log.warning("model.init is empty: the AVM stage trains on a random, frozen backbone")
    avm = build_avm(cfg)
    if cfg.method.stella.avm_init:
        log.info("method.stella.avm_init %s: %s", cfg.method.stella.avm_init, load_avm(avm, cfg.method.stella.avm_init))
    return AVMStage(cfg, model, avm)


def matching_evaluator(cfg: Config, tasks: list[str], rank: int, world_size: int, device: torch.device):
    """``evaluate(module, stage)``: L_AVM and matching accuracy over the test split of ``tasks`` (valid rows; the
    pairs drawn from a fixed seed), averaged over ranks."""

    @torch.no_grad()
    def evaluate(module: nn.Module, stage: Stage) -> dict[str, Any]:
        loader = build_loader(cfg, "test", tasks=tasks, train=False, rank=rank, world_size=world_size, device=device)
        sums = torch.zeros(3, device=device, dtype=torch.float64)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.train.seed)
            for batch in loader:
                loss, acc = module.matching(batch["fbank"], batch["video"])
                n = batch["valid"].sum()
                sums += torch.stack([loss.double() * n, acc.double() * n, n.double()])
        if world_size > 1:
            torch.distributed.all_reduce(sums)
        loss_sum, acc_sum, count = sums.tolist()  # sync-ok: evaluation
        return {"loss_avm": loss_sum / max(count, 1.0), "avm_acc": acc_sum / max(count, 1.0), "clips": int(count)}

    return evaluate


def avm_stage(cfg: Config) -> RunResult:
    """Train the AVM for ``method.stella.avm_epochs`` epochs over the pre-training task; writes ``avm.safetensors``."""
    dist, run_dir = start_run(cfg)
    method = build_avm_stage(cfg)
    seed_everything(cfg.train.seed + 1000 * dist.rank)  # per-rank pairings
    tasks = dataset_tasks(cfg, "pretrain")
    if not tasks:
        tasks = dataset_tasks(cfg, "continual")
        if dist.rank == 0:
            log.warning("the dataset has no pre-training task: the AVM stage trains on every continual task")
    stage = Stage(0, "avm", cfg.method.stella.avm_epochs, tuple(tasks))

    def make_loader(s: Stage):
        return build_loader(cfg, "train", tasks=list(s.tasks), rank=dist.rank, world_size=dist.world_size,
                            device=dist.device)  # fmt: skip

    evaluate = matching_evaluator(cfg, list(tasks), dist.rank, dist.world_size, dist.device)
    trainer = Trainer(cfg, method, dist=dist, run_dir=run_dir, make_loader=make_loader, evaluate=evaluate)
    trainer.resume()
    return trainer.run([stage])
