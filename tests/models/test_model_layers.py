"""Canonical patch orders, patch embedding = strided conv, sin-cos tables, attention backends, blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastav.config import ConfigError, load_config
from fastav.models import layers
from fastav.models.layers import (
    Block,
    TokenGrid,
    attend,
    audio_sincos,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
    video_sincos,
)

GRID = TokenGrid(patch=4, audio_t=5, audio_f=3, frames=2, video_h=3, video_w=2)


def test_grid_comes_from_the_data_config() -> None:
    base = TokenGrid.from_config(load_config("cavmae_base"))
    assert (base.audio_tokens, base.video_tokens_per_frame, base.video_tokens) == (512, 196, 196)
    assert (base.audio_t, base.audio_f) == (64, 8)
    assert TokenGrid.from_config(load_config("stella_vggsound")).video_tokens == 784
    dbg = TokenGrid.from_config(load_config("debug"))
    assert (dbg.audio_t, dbg.audio_f, dbg.frames, dbg.video_h) == (16, 4, 4, 4)
    with pytest.raises(ConfigError, match="data.frame_size: got 72; accepted: a multiple of model.patch_size"):
        TokenGrid.from_config(load_config("debug", ["data.frame_size=72"]))
    with pytest.raises(ValueError, match=r"fbank: expected \(B, 20, 12\)"):
        GRID.check_inputs(torch.zeros(1, 20, 13), None)


def test_audio_patches_are_time_major_and_flattened_dt_df() -> None:
    p, T, F_ = GRID.patch, GRID.audio_t * GRID.patch, GRID.audio_f * GRID.patch
    t_idx = torch.arange(T)[:, None].expand(T, F_)
    f_idx = torch.arange(F_)[None, :].expand(T, F_)
    fbank = (t_idx * 1000 + f_idx).float()[None]  # each value names its (time, mel) cell
    patches = patchify_audio(fbank, p)[0]
    for t in range(GRID.audio_t):
        for f in range(GRID.audio_f):
            i = t * GRID.audio_f + f
            for dt in range(p):
                for df in range(p):
                    assert patches[i, dt * p + df] == (t * p + dt) * 1000 + f * p + df
    assert torch.equal(unpatchify_audio(patchify_audio(fbank, p), GRID), fbank)


def test_video_patches_are_frame_row_col_and_flattened_pqc() -> None:
    p = GRID.patch
    video = torch.randn(2, GRID.frames, 3, GRID.video_h * p, GRID.video_w * p)
    patches = patchify_video(video, p)
    frame, row, col = 1, 2, 1
    j = frame * GRID.video_tokens_per_frame + row * GRID.video_w + col
    pq, c = (3 * p + 1), 2  # row 3 and column 1 inside the patch, channel 2
    expected = video[:, frame, c, row * p + pq // p, col * p + pq % p]
    assert torch.equal(patches[:, j, pq * 3 + c], expected)
    assert torch.equal(unpatchify_video(patches, GRID), video)


def test_patch_embedding_is_a_strided_conv_with_reshaped_weight() -> None:
    p, D = GRID.patch, 5
    embed = layers.TokenEmbed(3 * p * p, D, GRID.video_tokens, trainable_pos=False)
    conv_w = embed.proj.weight.reshape(D, p, p, 3).permute(0, 3, 1, 2)  # (D, c, p, q) as a Conv2d weight
    video = torch.randn(2, GRID.frames, 3, GRID.video_h * p, GRID.video_w * p)
    ref = F.conv2d(video.flatten(0, 1), conv_w, embed.proj.bias, stride=p).flatten(2).transpose(1, 2)
    mine = embed.proj(patchify_video(video, p))
    torch.testing.assert_close(mine, ref.reshape(2, -1, D), rtol=1e-5, atol=1e-5)
    audio = layers.TokenEmbed(p * p, D, GRID.audio_tokens, trainable_pos=False)
    fbank = torch.randn(2, GRID.audio_t * p, GRID.audio_f * p)
    ref_a = F.conv2d(fbank[:, None], audio.proj.weight.reshape(D, 1, p, p), audio.proj.bias, stride=p)
    torch.testing.assert_close(audio.proj(patchify_audio(fbank, p)), ref_a.flatten(2).transpose(1, 2))


def _mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _cavmae_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """CAV-MAE's get_2d_sincos_pos_embed, written from docs/methods/cav_mae.md (meshgrid(w, h): w goes first)."""
    grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32)), axis=0)
    grid = grid.reshape(2, 1, grid_h, grid_w)
    return np.concatenate([_mae_1d(dim // 2, grid[0]), _mae_1d(dim // 2, grid[1])], axis=1)


def test_sincos_tables_match_mae_and_cavmae_permuted_to_time_major() -> None:
    dim, grid = 16, TokenGrid(patch=16, audio_t=64, audio_f=8, frames=2, video_h=14, video_w=14)
    video = video_sincos(dim, grid)[0].double().numpy()
    mae = _cavmae_2d(dim, 14, 14)
    np.testing.assert_allclose(video[:196], mae, atol=1e-6)
    np.testing.assert_allclose(video[196:], mae, atol=1e-6)  # repeated for the second frame
    cav = _cavmae_2d(dim, 8, 64)  # CAV-MAE's audio table: row f * 64 + t
    audio = audio_sincos(dim, grid)[0].double().numpy()  # canonical: row t * 8 + f
    for t, f in [(0, 0), (5, 3), (63, 7), (17, 1)]:
        np.testing.assert_allclose(audio[t * 8 + f], cav[f * 64 + t], atol=1e-6)


def test_attention_backends_agree_on_cpu() -> None:
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v
    torch.testing.assert_close(attend(q, k, v, "sdpa"), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q, k, v, "xformers"), ref, rtol=1e-5, atol=1e-5)  # no CPU path: SDPA


@pytest.mark.gpu
def test_xformers_matches_sdpa_within_bf16_tolerance() -> None:
    pytest.importorskip("xformers")
    q, k, v = (torch.randn(2, 12, 196, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fast = attend(q, k, v, "xformers")
    ref = attend(q, k, v, "sdpa")
    diff = (fast.float() - ref.float()).abs()
    assert diff.max() < 2e-2, f"max {diff.max():.3g} mean {diff.mean():.3g}"


def test_block_uses_the_modality_norm_set_and_gradchecks() -> None:
    torch.manual_seed(0)
    blk = Block(8, 2, 2.0, tagged_norms=True).double()
    with torch.no_grad():
        blk.norm1_a.weight.mul_(3.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert not torch.allclose(blk(x, "a"), blk(x, "joint"))
    assert torch.autograd.gradcheck(lambda t: blk(t, "a"), (x,), eps=1e-6, atol=1e-5)
    plain = Block(8, 2, 2.0, tagged_norms=False)
    with pytest.raises(ValueError, match="no 'v' LayerNorms"):
        plain(torch.randn(1, 3, 8), "v")
    assert not hasattr(plain, "norm1_a")
