"""Gather the selected 16x16 patches straight from the video / fbank tensors, without patchifying the whole input.

Legend (shape suffixes): B = batch, T = frames, C = channels, P = patch side, S = selected patches.

Canonical patch orders (fixed for fastav):

- Video (B, T, 3, H, W): patch j = frame * (Hp * Wp) + row * Wp + col with Hp = H / P, Wp = W / P; a patch is
  flattened in (p, q, c) order (row in patch, column in patch, channel), as MAE's ``patchify``: (B, S, P*P*3).
- Audio fbank (B, Tf, F) = (B, 1024, 128) time x mel: patch i = t * Fp + f (time-major, Tp = Tf / P = 64,
  Fp = F / P = 8); a patch is flattened in (dt, df) order: (B, S, P*P). Internally the fbank is the
  one-frame, one-channel case of the video kernel.

One program per (tile of selected patches, b) loads the ids, computes each patch's origin and copies the
P x P x C block with strided loads; the output keeps the input dtype (a pure copy). Out-of-range ids (which the
reference's torch.gather rejects) read as zero patches instead of faulting: no host check on the ids.

References:
    Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment",
    ICML 2024, arXiv 2310.08204 (§4.4, gather of the selected patches).
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (patchify order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _utils

__all__ = [
    "gather_audio_patches",
    "gather_audio_patches_ref",
    "gather_audio_patches_triton",
    "gather_video_patches",
    "gather_video_patches_ref",
    "gather_video_patches_triton",
    "patchify_audio_ref",
    "patchify_video_ref",
]


@triton.jit
def _gather_patches_kernel(
    X,  # (B, T, C, Hh, Ww) any dtype, any strides
    IDS,  # (B, NSEL) int32 / int64 patch ids
    OUT,  # (B, NSEL, P*P*C) same dtype as X, contiguous
    stride_xb,
    stride_xt,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_ib,
    stride_is,
    NSEL,
    NPATCH,  # T * Hp * Wp
    HPWP,  # Hp * Wp
    WP,
    C: tl.constexpr,
    P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_PP: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < NSEL
    ids_S = tl.load(IDS + b * stride_ib + offs_s * stride_is, mask=mask_s, other=0).to(tl.int64)
    ok_S = mask_s & (ids_S >= 0) & (ids_S < NPATCH)
    frame_S = ids_S // HPWP
    rem_S = ids_S % HPWP
    row_S = rem_S // WP
    col_S = rem_S % WP
    src_S = b * stride_xb + frame_S * stride_xt + row_S * (P * stride_xh) + col_S * (P * stride_xw)

    pq = tl.arange(0, BLOCK_PP)
    mask_pq = pq < P * P
    src_PP = (pq // P) * stride_xh + (pq % P) * stride_xw
    dst_S = (b * NSEL + offs_s.to(tl.int64)) * (P * P * C)
    for c in tl.static_range(C):
        src = X + src_S[:, None] + c * stride_xc + src_PP[None, :]
        vals = tl.load(src, mask=ok_S[:, None] & mask_pq[None, :], other=0)
        dst = OUT + dst_S[:, None] + pq[None, :] * C + c
        tl.store(dst, vals, mask=mask_s[:, None] & mask_pq[None, :])


_launch = _utils.Launcher(
    _gather_patches_kernel,
    _utils.configs([{"BLOCK_S": s} for s in (4, 8, 16)], (4, 8)),
    key=["NSEL", "NPATCH"],
)


def _check_ids(ids: torch.Tensor, B: int) -> None:
    if ids.dim() != 2 or ids.shape[0] != B:
        raise ValueError(f"ids must be (B, S) with B = {B}, got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")


def _check_video(video: torch.Tensor, ids: torch.Tensor, patch: int) -> tuple[int, int]:
    if video.dim() != 5:
        raise ValueError(f"video must be (B, T, C, H, W), got {tuple(video.shape)}")
    _, _, _, H, W = video.shape
    if H % patch or W % patch:
        raise ValueError(f"video frames {H}x{W} are not a whole number of {patch}x{patch} patches")
    _check_ids(ids, video.shape[0])
    _utils.assert_same_device(video=video, ids=ids)
    return H // patch, W // patch


def _check_audio(fbank: torch.Tensor, ids: torch.Tensor, patch: int) -> tuple[int, int]:
    if fbank.dim() != 3:
        raise ValueError(f"fbank must be (B, Tf, F), got {tuple(fbank.shape)}")
    _, Tf, F = fbank.shape
    if Tf % patch or F % patch:
        raise ValueError(f"fbank {Tf}x{F} (time x mel) is not a whole number of {patch}x{patch} patches")
    _check_ids(ids, fbank.shape[0])
    _utils.assert_same_device(fbank=fbank, ids=ids)
    return Tf // patch, F // patch


def _gather(x_BTCHW: torch.Tensor, ids: torch.Tensor, patch: int, hp: int, wp: int) -> torch.Tensor:
    B, T, C = x_BTCHW.shape[:3]
    nsel = ids.shape[1]
    out = torch.empty((B, nsel, patch * patch * C), device=x_BTCHW.device, dtype=x_BTCHW.dtype)
    if nsel == 0:
        return out
    _launch(
        lambda meta: (triton.cdiv(nsel, meta["BLOCK_S"]), B),
        (x_BTCHW, ids, out, *x_BTCHW.stride(), *ids.stride(), nsel, T * hp * wp, hp * wp, wp),
        {"C": C, "P": patch, "BLOCK_PP": _utils.next_pow2(patch * patch)},
        {"BLOCK_S": _utils.interp_block(nsel, 64)},
    )
    return out


def gather_video_patches_triton(video: torch.Tensor, ids: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Triton path of :func:`gather_video_patches`."""
    hp, wp = _check_video(video, ids, patch)
    return _gather(video, ids, patch, hp, wp)


def gather_audio_patches_triton(fbank: torch.Tensor, ids: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Triton path of :func:`gather_audio_patches`."""
    tp, fp = _check_audio(fbank, ids, patch)
    return _gather(fbank[:, None, None], ids, patch, tp, fp)


def patchify_video_ref(video: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T*Hp*Wp, P*P*C): every patch, canonical order, (p, q, c) flattening."""
    B, T, C, H, W = video.shape
    hp, wp = H // patch, W // patch
    x = video.reshape(B, T, C, hp, patch, wp, patch).permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(B, T * hp * wp, patch * patch * C)


def patchify_audio_ref(fbank: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, Tf, F) -> (B, Tp*Fp, P*P): every patch, time-major order, (dt, df) flattening."""
    B, Tf, F = fbank.shape
    tp, fp = Tf // patch, F // patch
    x = fbank.reshape(B, tp, patch, fp, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(B, tp * fp, patch * patch)


def _take(patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # out-of-range ids: torch.gather raises on CPU and device-asserts on CUDA (no host check here: no sync)
    return torch.gather(patches, 1, ids.long()[..., None].expand(-1, -1, patches.shape[2]))


def gather_video_patches_ref(video: torch.Tensor, ids: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Reference: patchify the whole clip, then gather (what the official code does)."""
    _check_video(video, ids, patch)
    return _take(patchify_video_ref(video, patch), ids)


def gather_audio_patches_ref(fbank: torch.Tensor, ids: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """Reference: patchify the whole fbank, then gather."""
    _check_audio(fbank, ids, patch)
    return _take(patchify_audio_ref(fbank, patch), ids)


@torch.no_grad()
def gather_video_patches(video: torch.Tensor, ids: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """The selected patches of a clip: (B, T, C, H, W), ids (B, S) -> (B, S, P*P*C), (p, q, c) flattening.

    ids index the canonical order j = frame * (Hp * Wp) + row * Wp + col. Output dtype = video dtype.
    """
    if _utils.use_triton(_launch.kernel, video, ids):
        return gather_video_patches_triton(video, ids, patch)
    return gather_video_patches_ref(video, ids, patch)


@torch.no_grad()
def gather_audio_patches(fbank: torch.Tensor, ids: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """The selected patches of an fbank: (B, Tf, F), ids (B, S) -> (B, S, P*P), (dt, df) flattening.

    ids index the time-major order i = t * Fp + f. Output dtype = fbank dtype.
    """
    if _utils.use_triton(_launch.kernel, fbank, ids):
        return gather_audio_patches_triton(fbank, ids, patch)
    return gather_audio_patches_ref(fbank, ids, patch)
