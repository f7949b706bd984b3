"""Trainer parts that need no process group: parameter groups, schedule, RNG state, synthetic source, resume paths."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fastav.config import load_config
from fastav.data import SyntheticAV, build_loader
from fastav.models import build_pretrain_model
from fastav.train import lr_factor, parameter_groups
from fastav.train.engine import (
    CheckpointError,
    build_optimizer,
    build_scheduler,
    resolve_resume,
    rng_state,
    set_rng_state,
)


def test_no_weight_decay_on_biases_norms_tables_embeddings_and_tokens() -> None:
    cfg = load_config("cavmae_base", ["model.embed_dim=32", "model.num_heads=2", "model.decoder_dim=16"])
    model = build_pretrain_model(cfg)
    decay, no_decay = parameter_groups(model, 5e-7)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 5e-7 and no_decay["weight_decay"] == 0.0
    assert {"encoder.embed_a.modality", "decoder.mask_token", "decoder.modality_v"} <= no_decay_names
    assert {"encoder.blocks_a.0.norm1.weight", "encoder.blocks_u.0.attn.qkv.bias"} <= no_decay_names
    assert {"encoder.blocks_a.0.attn.qkv.weight", "encoder.embed_v.proj.weight", "decoder.pred_a.weight"} <= decay_names
    frozen = {"encoder.embed_a.pos", "decoder.pos_embed_v"}  # CAV-MAE's fixed sin-cos tables: not optimised
    assert not frozen & (decay_names | no_decay_names)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    stella = build_pretrain_model(load_config("debug"))
    groups = parameter_groups(stella, 1e-3)
    learnable = {n for n, p in stella.named_parameters() if any(p is q for q in groups[1]["params"])}
    assert {"encoder.embed_a.pos", "encoder.inter_pos_v.weight", "decoder.pos_embed_a"} <= learnable


def test_cavmae_multistep_schedule_per_epoch() -> None:
    train = load_config("cavmae_base").train  # milestones 10, 15, 20, 25; gamma 0.5
    factors = [lr_factor(train, e) for e in range(26)]
    assert factors[:10] == [1.0] * 10  # epochs 1-10 at full lr (docs/methods/cav_mae.md)
    assert factors[10:15] == [0.5] * 5 and factors[15] == 0.25 and factors[20] == 0.125 and factors[25] == 0.0625
    assert lr_factor(train, 9.99) == 1.0
    warm = load_config("debug", ["train.warmup_epochs=2", "train.schedule=cosine", "train.epochs=10"]).train
    assert lr_factor(warm, 1.0) == pytest.approx(0.5) and lr_factor(warm, 2.0) == pytest.approx(1.0)
    assert lr_factor(warm, 10.0) == pytest.approx(0.0, abs=1e-12)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, train)
    sched = build_scheduler(opt, train, lambda step: step / 4)  # 4 steps per epoch
    lrs = []
    for _ in range(48):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[39] == pytest.approx(5e-5) and lrs[40] == pytest.approx(2.5e-5)  # step 40 = start of epoch 11
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.95, 0.999) and opt.defaults["fused"]


def test_rng_state_round_trip() -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_synthetic_source_is_deterministic_split_by_rank_and_task_and_resumable() -> None:
    cfg = load_config("debug", ["data.batch_size=4", "data.source=synthetic", "data.synthetic_clips=40"])
    ranks = [build_loader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    assert isinstance(ranks[0], SyntheticAV) and len(ranks[0]) == 5
    ids = [torch.cat([b["index"] for b in loader]) for loader in ranks]
    assert set(ids[0].tolist()).isdisjoint(ids[1].tolist()) and all(x.epoch == 1 for x in ranks)
    loader = SyntheticAV(cfg)
    batch = next(iter(loader))
    assert batch["video"].shape == (4, 4, 3, 64, 64) and batch["fbank"].shape == (4, 256, 64)
    assert batch["labels"].shape == (4, 8) and batch["index"].dtype == torch.int64 and bool(batch["valid"].all())
    it = iter(loader)
    seen = [next(it)["index"] for _ in range(2)]
    state = loader.state_dict()
    rest = [b["index"] for b in it] + [b["index"] for b in loader]  # end of epoch 0, then epoch 1
    again = SyntheticAV(cfg)
    again.load_state_dict(state)
    replay = [b["index"] for b in again] + [b["index"] for b in again]
    assert all(torch.equal(a, b) for a, b in zip(rest, replay, strict=True))
    assert not torch.equal(seen[0], rest[-1])
    same = SyntheticAV(cfg).sample(7)
    assert torch.equal(same[0], loader.sample(7)[0]) and torch.equal(same[1], loader.sample(7)[1])


def test_synthetic_tasks_and_held_out_evaluation_split() -> None:
    cfg = load_config(
        "debug",
        ["data.source=synthetic", "data.synthetic_clips=36", "data.synthetic_classes=6", "data.synthetic_tasks=3"],
    )
    task1 = SyntheticAV(cfg, "train", tasks=["task1"], batch_size=4)
    ids = torch.cat([b["index"] for b in task1])
    assert set((ids % 6).tolist()) == {2, 3} and set(ids.tolist()) <= set(range(36))
    assert all(bool((b["task"] == 1).all()) for b in SyntheticAV(cfg, "train", tasks=["task1"], batch_size=4))
    evals = [SyntheticAV(cfg, "retrieval", rank=r, world_size=2, batch_size=5) for r in range(2)]
    batches = [list(e) for e in evals]
    assert len(batches[0]) == len(batches[1]) == 4  # 18 clips per rank in batches of 5: the last one padded
    valid = torch.cat([b["index"][b["valid"]] for rank in batches for b in rank])
    assert sorted(valid.tolist()) == list(range(36, 72))  # the held-out clips, each exactly once
    with pytest.raises(ValueError, match="no task 'task9'"):
        SyntheticAV(cfg, "train", tasks=["task9"])


def test_resume_paths(tmp_path: Path) -> None:
    assert resolve_resume("", tmp_path) is None and resolve_resume("auto", tmp_path) is None
    (tmp_path / "step_00000004" / "state").mkdir(parents=True)
    (tmp_path / "step_00000012" / "state").mkdir(parents=True)
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000012"
    (tmp_path / "latest").write_text("step_00000004\n")
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000004"
    with pytest.raises(CheckpointError, match="train.resume: .* is not a checkpoint directory"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
