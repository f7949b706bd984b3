"""The pre-training model: masking (uniform, structured, restricted to a subset), losses, gradients, counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from launching import free_port

from fastav.config import Config, load_config
from fastav.models import (
    AVMAE,
    TokenGrid,
    build_avm,
    build_classifier,
    build_pretrain_model,
    count_parameters,
    info_nce,
    masked_mse,
    patchify_audio,
    patchify_video,
)
from fastav.models.avmae import plan_from_noise, structured_audio_noise

TINY = [
    "model.embed_dim=16",
    "model.num_heads=2",
    "model.specific_depth=1",
    "model.shared_depth=1",
    "model.decoder_dim=8",
    "model.decoder_heads=2",
    "model.decoder_depth=1",
    "data.frame_size=32",
    "data.target_length=64",
    "data.num_mel_bins=32",
    "data.num_frames=2",
]


def tiny(*extra: str) -> Config:
    return load_config("debug", [*TINY, *extra])


def batch(cfg: Config, b: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    d = cfg.data
    fbank = torch.randn(b, d.target_length, d.num_mel_bins, dtype=dtype)
    video = torch.randn(b, d.num_frames, 3, d.frame_size, d.frame_size, dtype=dtype)
    return fbank, video


@pytest.mark.parametrize("recipe", ["debug", "debug_cavmae"], ids=["stella", "cavmae"])
def test_forward_shapes_and_mask_counts(recipe: str) -> None:
    cfg = load_config(recipe)
    model = build_pretrain_model(cfg)
    grid = model.grid
    out = model(*batch(cfg, 3))
    visible_a = int(grid.audio_tokens * (1 - cfg.model.mask_ratio_a))
    assert out.plan_a.ids_keep_BN.shape == (3, visible_a)
    assert out.pred_a_BKP.shape == (3, grid.audio_tokens, 256)
    assert out.pred_v_BKP.shape == (3, grid.video_tokens, 768)
    assert torch.equal(out.plan_a.mask_BK.sum(1), torch.full((3,), float(grid.audio_tokens - visible_a)))
    assert out.pooled_a_BD.shape == (3, cfg.model.embed_dim)
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    expected = cfg.model.mae_weight * (out.loss_mae_a + out.loss_mae_v) + cfg.model.contrastive_weight * out.loss_nce
    torch.testing.assert_close(out.loss, expected)


def test_plan_from_noise_keeps_the_smallest_and_unshuffles() -> None:
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    plan = plan_from_noise(noise, 2)
    assert plan.ids_keep_BN.tolist() == [[1, 3], [3, 0]]
    assert plan.mask_BK.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    order = torch.cat([plan.ids_keep_BN, noise.argsort(1)[:, 2:]], dim=1)
    assert torch.equal(order.gather(1, plan.ids_restore_BK), torch.arange(4).expand(2, 4))


@pytest.mark.parametrize("mode", ["time", "freq", "tf"])
def test_structured_audio_masks_hide_whole_rows(mode: str) -> None:
    grid = TokenGrid(patch=16, audio_t=64, audio_f=8, frames=1, video_h=14, video_w=14)
    noise = structured_audio_noise(6, grid, mode, 0.75, torch.device("cpu")).reshape(6, 64, 8)
    scale = 0.7 if mode == "tf" else 1.0
    if mode in ("time", "tf"):
        hidden_t = (noise == 1.1).all(dim=2).sum(dim=1)
        assert (hidden_t >= int(64 * 0.75 * scale)).all()
    if mode in ("freq", "tf"):
        hidden_f = (noise == 1.1).all(dim=1).sum(dim=1)
        assert (hidden_f >= int(8 * 0.75 * scale)).all()
    model = build_pretrain_model(load_config("cavmae_base", [f"model.audio_mask={mode}", *TINY[:7]]))
    plan = model.plan_mask("a", 6, torch.device("cpu"), None)
    assert plan.num_visible == 128


def test_masking_restricted_to_selected_patches() -> None:
    cfg = tiny("model.mask_ratio_a=0.75", "model.mask_ratio_v=0.75")
    model = build_pretrain_model(cfg)
    grid = model.grid  # 8 audio tokens, 8 video tokens
    fbank, video = batch(cfg)
    sel_a = torch.stack([torch.randperm(grid.audio_tokens)[:5] for _ in range(4)])
    sel_v = torch.stack([torch.randperm(grid.video_tokens)[:4] for _ in range(4)])
    out = model(fbank, video, sel_a_BK=sel_a, sel_v_BK=sel_v)
    # visible tokens: int(L * 0.25) = 2 of the full length, drawn only among the selected ones
    assert out.plan_a.num_visible == 2 and out.plan_v.num_visible == 2
    visible = out.plan_a.visible_positions().tolist()
    assert all(set(row) <= set(s) for row, s in zip(visible, sel_a.tolist(), strict=True))
    # the decoder runs over the selected tokens only; loss covers selected-but-hidden ones only
    assert out.pred_a_BKP.shape == (4, 5, 256) and out.pred_v_BKP.shape == (4, 4, 768)
    assert out.plan_a.mask_BK.sum(1).tolist() == [3.0] * 4
    target = patchify_audio(fbank, 16).gather(1, sel_a[..., None].expand(-1, -1, 256))
    expected = masked_mse(out.pred_a_BKP, target, out.plan_a.mask_BK, norm_pix=True)
    torch.testing.assert_close(out.loss_mae_a, expected)
    with pytest.raises(ValueError, match="sel_v: 1 selected tokens cannot hold the 2 visible ones"):
        model(fbank, video, sel_a_BK=sel_a, sel_v_BK=sel_v[:, :1])


def test_masked_mse_normalises_patches_and_ignores_visible_ones() -> None:
    pred, target = torch.randn(2, 6, 12), torch.randn(2, 6, 12) * 3 + 1
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]])
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = ((pred - norm) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(masked_mse(pred, target, mask, norm_pix=True), expected)
    changed = pred.clone()
    changed[~mask.bool()] += 10.0
    torch.testing.assert_close(masked_mse(changed, target, mask, norm_pix=True), expected)
    assert masked_mse(pred, target, torch.zeros(2, 6), norm_pix=False) == 0.0  # nothing hidden: 0, not NaN


def test_info_nce_matches_cavmae_formula() -> None:
    a, v = torch.randn(6, 8), torch.randn(6, 8)
    an, vn = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    total = an @ vn.t() / 0.05  # CAV-MAE: S[i, j] = audio i . video j, log_softmax over dim 0
    single = -torch.diag(F.log_softmax(total, dim=0)).mean()
    both = 0.5 * (single - torch.diag(F.log_softmax(total.t(), dim=0)).mean())
    loss, acc = info_nce(a, v, tau=0.05, bidirectional=False)
    torch.testing.assert_close(loss, single)
    torch.testing.assert_close(info_nce(a, v, tau=0.05, bidirectional=True)[0], both)
    assert acc == (total.argmax(dim=0) == torch.arange(6)).float().mean()


_GATHER_WORKER = """
import sys, torch, torch.distributed as dist
from fastav.models import info_nce
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
a, v = torch.load(sys.argv[1])
rows = slice(rank * 4, rank * 4 + 4)
out = {}
for gather_grad in (False, True):
    a_r, v_r = a[rows].clone().requires_grad_(), v[rows].clone().requires_grad_()
    loss, _ = info_nce(a_r, v_r, tau=0.1, bidirectional=True, gather_grad=gather_grad)
    loss.backward()
    out[gather_grad] = (a_r.grad / world, v_r.grad / world)  # the data-parallel average
torch.save(out, sys.argv[2] + f".{rank}")
"""


@pytest.mark.distributed
def test_info_nce_gather_grad_follows_the_one_batch_gradient(tmp_path) -> None:
    """Two gloo processes of 4 rows each: with gather_grad the averaged gradients are those of one InfoNCE over the 8
    rows; STELLA's gather (the other rank's rows constant) leaves part of them out."""
    import os
    import subprocess
    import sys

    torch.manual_seed(0)
    a, v = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    torch.save((a, v), tmp_path / "inputs.pt")
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _GATHER_WORKER, str(tmp_path / "inputs.pt"), str(tmp_path / "grads")],
            env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    parts = [torch.load(tmp_path / f"grads.{r}") for r in range(2)]
    a.requires_grad_(), v.requires_grad_()
    one_batch = torch.autograd.grad(info_nce(a, v, tau=0.1, bidirectional=True)[0], (a, v))
    for gather_grad, close in ((True, True), (False, False)):
        grads = [torch.cat([p[gather_grad][i] for p in parts]) for i in range(2)]
        same = all(torch.allclose(g, o, atol=1e-12) for g, o in zip(grads, one_batch, strict=True))
        assert same == close, gather_grad


def test_gradients_match_finite_differences_in_float64() -> None:
    """The whole pre-training loss (masking fixed by the seed) against a central difference along a random
    direction in parameter space."""
    cfg = tiny("model.contrastive_weight=0.5")
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).double()
    fbank, video = batch(cfg, 4, torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        torch.manual_seed(1234)  # the same masks every call
        return model(fbank, video).loss

    grads = torch.autograd.grad(loss(), params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True))
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
        up = loss()
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * eps * d)
        down = loss()
    numeric = (up - down) / (2 * eps)
    assert abs(float(numeric - analytic)) < 1e-6 * max(1.0, abs(float(analytic))), (float(numeric), float(analytic))


def test_every_trainable_parameter_gets_a_gradient() -> None:
    cfg = tiny()  # STELLA layout: LayerNorm sets only where they are used
    model = build_pretrain_model(cfg)
    model(*batch(cfg)).loss.backward()
    silent = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert silent == []


def test_parameter_counts_at_base_size_on_the_meta_device() -> None:
    def counts(recipe: str) -> tuple[tuple[int, int], ...]:
        cfg = load_config(recipe)
        with torch.device("meta"):
            models = build_pretrain_model(cfg), build_classifier(cfg, 527), build_avm(cfg)
        return tuple(count_parameters(m) for m in models)

    (pre, pre_train), (ft, ft_train), _ = counts("cavmae_base")
    assert (round(pre / 1e6, 3), round(pre_train / 1e6, 3)) == (191.036, 190.130)  # docs/methods/cav_mae.md
    assert (round(ft / 1e6, 3), ft_train) == (164.907, ft)
    (stella, _), _, (avm, _) = counts("stella_vggsound")
    assert (stella, avm) == (185_534_976, 5_904_385)  # computed from STELLA's configuration (see the README)
    assert avm == 6 * 768**2 + 2 * 2 * 768 + 1536**2 + 1536 + 1536 + 1


@pytest.mark.parametrize("recipe", ["debug", "debug_cavmae"], ids=["stella", "cavmae"])
def test_forward_and_backward_read_nothing_on_the_host(recipe: str, host_reads) -> None:
    """The CPU check of the no-sync rule (docs/architecture.md): the model's step, with and without an audio selection,
    makes no ATen call that would synchronise on a GPU. The optimizer is left out (its CPU step counter is read on the
    host by design); the GPU test below runs the whole step under set_sync_debug_mode."""
    cfg = load_config(recipe)
    model = build_pretrain_model(cfg)
    fbank, video = batch(cfg, 4)
    sel_a = torch.randperm(model.grid.audio_tokens)[:40].expand(4, -1).contiguous()
    model(fbank, video).loss.backward()  # warm-up (lazy initialisation is allowed to read)
    for sel in (None, sel_a):
        with host_reads() as rec:
            out = model(fbank, video, sel_a_BK=sel)
            out.loss.backward()
        assert not rec.calls, f"host reads in the step (sel_a={'set' if sel is not None else None}): {dict(rec.calls)}"


@pytest.mark.gpu
def test_training_step_makes_no_host_sync_on_gpu() -> None:
    cfg = load_config("debug")
    model: AVMAE = build_pretrain_model(cfg).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fbank, video = (x.cuda() for x in batch(cfg, 4))
    sel_a = torch.randperm(model.grid.audio_tokens, device="cuda")[:40].expand(4, -1).contiguous()
    model(fbank, video).loss.backward()  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for sel in (None, sel_a):
            out = model(fbank, video, sel_a_BK=sel)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert patchify_video(video, 16).shape[1] == model.grid.video_tokens
