"""The bench's official-formulation STELLA step (bench/stella_official.py) computes what fastav's STELLA step computes:
the same losses and the same gradients on the same inputs, once the random draws are made the same (top-k
selection for every row, masks ranked by a noise table over grid positions, fixed matching pairs). Checked on the
first step (empty memory) and on a replay step (the memories filled by the first)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import kernels
from fastav.config import load_config
from fastav.continual import build_method
from fastav.continual.memory import IMAGENET_MEAN, IMAGENET_STD
from fastav.continual.stella import STELLA
from fastav.models import avm as avm_module
from fastav.models.avmae import plan_from_noise
from fastav.train.engine import DistInfo

ROOT = Path(__file__).resolve().parents[2]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
B = 4
TERMS = ("loss", "loss_mae_a", "loss_mae_v", "loss_nce", "loss_avm", "loss_der")


def _bench_module(name: str):
    """bench/<name>.py by path (bench/ is not a package, and bench/kernels.py would shadow the kernels package)."""
    spec = importlib.util.spec_from_file_location(f"fastav_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


official_stella = _bench_module("stella_official")


def _batch(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Frames whose pixels are exact 8-bit values and a bf16-exact fbank: fastav's memory (uint8 frames, bf16
    fbank) and the official fp32 memory then hold the same clips."""
    d, g = cfg.data, torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    pixels = torch.randint(0, 256, (B, d.num_frames, 3, d.frame_size, d.frame_size), generator=g).float()
    video = (pixels / 255.0 - mean) / std
    fbank = torch.randn(B, d.target_length, d.num_mel_bins, generator=g).bfloat16().float()
    return {"video": video, "fbank": fbank}


def _same_draws(monkeypatch, method, official) -> dict[str, torch.Tensor]:
    """Top-k selection for every row, MAE masks ranked by one noise value per grid position (the returned tables:
    refill them to draw new masks), fixed AVM pairs."""
    grid, m = method.model.grid, method.cfg.model
    tables = {"a": torch.rand(grid.audio_tokens), "v": torch.rand(grid.video_tokens)}
    visible = {
        "a": int(grid.audio_tokens * (1 - m.mask_ratio_a)),
        "v": int(grid.video_tokens * (1 - m.mask_ratio_v)),
    }

    def plan_mask(modality, batch, device, sel_BK):
        return plan_from_noise(tables[modality][sel_BK], visible[modality], sel_BK)

    labels, video_ids = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 3, 2, 1])
    monkeypatch.setattr(method.model, "plan_mask", plan_mask)
    monkeypatch.setattr(method, "_select_ids", lambda ia, iv, pa, pv: STELLA._select_ids(method, ia, iv, None, None))
    monkeypatch.setattr(avm_module, "matching_pairs", lambda n, device: (labels.clone(), video_ids.clone()))
    official.mask_noise = lambda modality, ids: tables[modality][ids]
    official.matching_pairs = lambda n, device: (labels.clone(), video_ids.clone())
    return tables


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def test_official_step_gives_fastavs_losses_and_gradients(monkeypatch) -> None:
    cfg = load_config("debug", ["method.name=stella", "method.memory_size=8", f"data.batch_size={B}"])
    method = build_method(cfg, CPU)
    official = official_stella.OfficialSTELLA(
        cfg, copy.deepcopy(method.model), copy.deepcopy(method.avm), capacity=8, deterministic=True
    )
    tables = _same_draws(monkeypatch, method, official)
    pairs = {f"model.{n}": n for n, _ in method.model.named_parameters()}
    pairs.update({f"avm.{n}": n for n, _ in method.avm.named_parameters()})
    with kernels.use_backend("ref"):
        for step, seed in enumerate((1, 2)):
            batch = _batch(cfg, seed)
            for table in tables.values():  # new masks each step: the replayed clips' embeddings then move
                table.copy_(torch.rand(table.shape, generator=torch.Generator().manual_seed(seed)))
            out = method(batch)
            terms = official(batch)
            for name in TERMS:
                torch.testing.assert_close(
                    terms[name], out.terms[name], rtol=2e-5, atol=2e-6, msg=f"{name} at step {step}"
                )
            if step == 1:  # the replay step trains on replayed rows and pays the DER penalty
                assert out.terms["loss_der"] > 0
            out.loss.backward()
            terms["loss"].backward()
            method.after_step(batch, out)
            fast, slow = _grads(method), _grads(official)
            assert set(slow) == set(fast) and len(fast) == len(pairs)
            for name in fast:
                torch.testing.assert_close(slow[name], fast[name], rtol=1e-4, atol=1e-6, msg=f"grad {name} step {step}")
            method.zero_grad()
            official.zero_grad()
    assert official.buffer.seen == method.memory.seen == 2 * B


def test_the_equality_check_sees_a_different_step(monkeypatch) -> None:
    """The comparison above fails when the official step computes something else (here: the pooled queries stored
    in the memory are not importance-weighted), so it can fail at all."""
    cfg = load_config("debug", ["method.name=stella", "method.memory_size=8", f"data.batch_size={B}"])
    method = build_method(cfg, CPU)
    official = official_stella.OfficialSTELLA(
        cfg, copy.deepcopy(method.model), copy.deepcopy(method.avm), capacity=8, deterministic=True
    )
    _same_draws(monkeypatch, method, official)
    real_add = official.buffer.add

    def add_with_wrong_importance(**fields):
        fields["n_attn_av"] = torch.ones_like(fields["n_attn_av"]) / fields["n_attn_av"].shape[1]
        real_add(**fields)

    official.buffer.add = add_with_wrong_importance
    with kernels.use_backend("ref"):
        for seed in (1, 2):
            batch = _batch(cfg, seed)
            out = method(batch)
            terms = official(batch)
            method.after_step(batch, out)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(terms["loss"], out.terms["loss"], rtol=2e-5, atol=2e-6)


def test_official_selection_pieces_keep_k_patches() -> None:
    """The sampled path: the chunk walk keeps exactly k_a audio patches (whole chunks of 4 time steps x all bands
    when nothing is pruned, never a pruned one when enough survive), the video order puts k_v patches with
    positive weight first and is a permutation."""
    cfg = load_config("debug", ["method.name=stella", "method.memory_size=8", f"data.batch_size={B}"])
    method = build_method(cfg, CPU)
    official = official_stella.OfficialSTELLA(cfg, method.model, method.avm, capacity=8)
    grid, k_a, k_v = method.model.grid, official.k_a, official.k_v
    g = torch.Generator().manual_seed(3)
    imp_a = torch.rand(8, grid.audio_tokens, generator=g).softmax(-1)
    nothing = torch.zeros(8, grid.audio_tokens, dtype=torch.bool)
    dropped = official.core_audio_mask(imp_a, nothing.clone(), k_a)
    assert ((~dropped).sum(dim=1) == k_a).all()
    chunk = cfg.method.stella.num_core_audio_times * grid.audio_f
    per_chunk = (~dropped).reshape(8, -1, chunk).sum(dim=-1)
    assert ((per_chunk == 0) | (per_chunk == chunk)).all()  # k_a is a whole number of chunks here
    pruned = torch.rand(8, grid.audio_tokens, generator=g) < 0.2
    dropped = official.core_audio_mask(imp_a, pruned.clone(), k_a)
    assert ((~dropped).sum(dim=1) == k_a).all() and not (~dropped & pruned).any()
    weights = torch.rand(8, grid.video_tokens, generator=g) * (torch.rand(8, grid.video_tokens, generator=g) > 0.3)
    order = official.video_order(weights)
    assert (order.sort(dim=1).values == torch.arange(grid.video_tokens)).all()
    assert (weights.gather(1, order[:, :k_v]) > 0).all()
