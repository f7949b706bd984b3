"""Replay-guided correlation: the probability that a past query attends to a current patch more than the current one.

Legend (shape suffixes): B = batch, H = heads, L = patches (keys), K = head dim (D).

    pi[b, l] = 1/H * sum_h sigmoid( <q_past[b,h] - q_cur[b,h], k[b,h,l]> * scale )   if candidates[b, l] else 0

This is STELLA's π (docs/methods/stella.md): softmax([s_past, s_cur])_0 = σ(s_past − s_cur) with
s = <q̄, k> / 8, averaged over the 12 heads; the current score is the current sample's own pooled query by
linearity. No temperature. One program per (patch tile, b) loops over the heads: a matrix-vector product per head
in fp32, the sigmoid, and the head mean, written once.

References:
    Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment",
    ICML 2024, arXiv 2310.08204 (§3.2, replay-guided correlation assessment).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _utils

__all__ = ["replay_correlation", "replay_correlation_ref", "replay_correlation_triton"]


@triton.jit
def _replay_correlation_kernel(
    QP,  # (B, H, K) past pooled queries, any float dtype / strides
    QC,  # (B, H, K) current pooled queries
    Kp,  # (B, H, L, K) current keys
    C,  # (B, L) uint8 candidate flags, contiguous
    OUT,  # (B, L) fp32 out, contiguous
    stride_pb,
    stride_ph,
    stride_pk,
    stride_cb,
    stride_ch,
    stride_ck,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kk,
    H,
    L,
    K,
    scale,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < L
    mask_k = offs_k < K

    acc_L = tl.zeros([BLOCK_L], dtype=tl.float32)
    for h in range(0, H):
        qp_K = tl.load(QP + b * stride_pb + h * stride_ph + offs_k * stride_pk, mask=mask_k, other=0.0)
        qc_K = tl.load(QC + b * stride_cb + h * stride_ch + offs_k * stride_ck, mask=mask_k, other=0.0)
        dq_K = qp_K.to(tl.float32) - qc_K.to(tl.float32)
        k_ptrs = Kp + b * stride_kb + h * stride_kh + offs_l[:, None] * stride_kl + offs_k[None, :] * stride_kk
        k_LK = tl.load(k_ptrs, mask=mask_l[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        s_L = tl.sum(k_LK * dq_K[None, :], axis=1) * scale
        acc_L += 1.0 / (1.0 + tl.exp(-s_L))
    cand_L = tl.load(C + b * L + offs_l, mask=mask_l, other=0)
    out_L = tl.where(cand_L != 0, acc_L / H, 0.0)
    tl.store(OUT + b * L + offs_l, out_L, mask=mask_l)


_launch = _utils.Launcher(
    _replay_correlation_kernel,
    _utils.configs([{"BLOCK_L": b} for b in (32, 64, 128)], (2, 4)),
    key=["H", "L", "K"],
)


def _check(q_past: torch.Tensor, q_cur: torch.Tensor, k: torch.Tensor, candidates: torch.Tensor) -> None:
    if k.dim() != 4:
        raise ValueError(f"k must be (B, H, L, D), got {tuple(k.shape)}")
    B, H, L, D = k.shape
    if tuple(q_past.shape) != (B, H, D) or tuple(q_cur.shape) != (B, H, D):
        raise ValueError(
            f"q_past {tuple(q_past.shape)} and q_cur {tuple(q_cur.shape)} must be (B, H, D) = {(B, H, D)} "
            f"for k {tuple(k.shape)}"
        )
    if tuple(candidates.shape) != (B, L) or candidates.dtype != torch.bool:
        raise ValueError(
            f"candidates must be a (B, L) = {(B, L)} bool mask, got {tuple(candidates.shape)} {candidates.dtype}"
        )
    _utils.assert_same_device(q_past=q_past, q_cur=q_cur, k=k, candidates=candidates)


def replay_correlation_triton(
    q_past: torch.Tensor, q_cur: torch.Tensor, k: torch.Tensor, scale: float, candidates: torch.Tensor
) -> torch.Tensor:
    """Triton path of :func:`replay_correlation`."""
    _check(q_past, q_cur, k, candidates)
    B, H, L, K = k.shape
    out = torch.empty((B, L), device=k.device, dtype=torch.float32)
    if k.dtype == torch.float64:
        q_past, q_cur, k = q_past.float(), q_cur.float(), k.float()
    c = candidates.contiguous().view(torch.uint8)
    _launch(
        lambda meta: (triton.cdiv(L, meta["BLOCK_L"]), B),
        (q_past, q_cur, k, c, out, *q_past.stride(), *q_cur.stride(), *k.stride(), H, L, K, float(scale)),
        {"BLOCK_K": _utils.next_pow2(K)},
        {"BLOCK_L": _utils.interp_block(L, 1024)},
    )
    return out


def replay_correlation_ref(
    q_past: torch.Tensor, q_cur: torch.Tensor, k: torch.Tensor, scale: float, candidates: torch.Tensor
) -> torch.Tensor:
    """Reference: mean_h σ(<q_past − q_cur, k>·scale) on candidates, 0 elsewhere, in fp32."""
    _check(q_past, q_cur, k, candidates)
    dq_BHD = q_past.float() - q_cur.float()
    s_BHL = torch.einsum("bhd,bhld->bhl", dq_BHD, k.float()) * scale
    return torch.sigmoid(s_BHL).mean(dim=1) * candidates


@torch.no_grad()
def replay_correlation(
    q_past: torch.Tensor, q_cur: torch.Tensor, k: torch.Tensor, scale: float, candidates: torch.Tensor
) -> torch.Tensor:
    """STELLA's pruning probability π of each current patch against a replayed sample's pooled query.

    Args:
        q_past: (B, H, D) stored pooled query of the replay sample paired with row b (for π_v: its audio query
            q̄_a, which attended over video keys).
        q_cur: (B, H, D) the current sample's own pooled query of the same modality (for π_v: the current q̄_a).
        k: (B, H, L, D) current keys of the modality being scored (for π_v: K_v).
        scale: logit scale (1/8 in STELLA).
        candidates: (B, L) bool candidate set (π is 0 outside it).

    Returns:
        (B, L) float32 in [0, 1].
    """
    if _utils.use_triton(_launch.kernel, q_past, q_cur, k, candidates):
        return replay_correlation_triton(q_past, q_cur, k, scale, candidates)
    return replay_correlation_ref(q_past, q_cur, k, scale, candidates)
