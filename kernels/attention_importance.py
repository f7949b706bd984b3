"""Cross-modal attention importance (flash-style, never materialises the attention map) and the pooled query.

Legend (shape suffixes): B = batch, H = heads, M = queries (Lq), N = keys (Lk), K = head dim (D), L = tokens.

    importance[b, n] = 1/(H*M) * sum_h sum_m softmax_n'( q[b,h,m] . k[b,h,n'] * scale / temperature )[n]

STELLA (§2 of the paper, arXiv 2310.08204) computes I_v with audio queries over video keys (M = 512, N = 784)
and I_a with video queries over audio keys (M = 784, N = 512), scale 1/8, temperature 0.4; the official code
materialises both B x 12 x 512 x 784 maps. Here two passes over key / query tiles do the same in O(B*H*(M+N))
memory:

1. ``_row_stats_kernel``, one program per (query tile, b*h): online max / sum-exp over key tiles, giving the
   log-sum-exp of every query row (base 2), (B*H, M) fp32. Logits tile S = Q·Kᵀ: queries on the MMA rows.
2. ``_col_accum_kernel``, one program per (key tile, b*h): recompute the logits tile by tile over the queries,
   p = exp2(s - lse_row), and sum over the queries, giving (B*H, N) fp32 partial sums; the head sum and
   the 1/(H*M) are a (B, H, N) torch reduction. Logits tile Sᵀ = K·Qᵀ: keys on the MMA rows, so the sum over
   queries runs along a row of the accumulator, inside one warp (a sum down the columns of Q·Kᵀ would cross
   warps through shared memory, with barriers, every iteration).

Only one (BLOCK_M, BLOCK_N) tile of logits exists at a time. Logits are computed with ``tl.dot`` accumulating in
fp32 on the tensor cores: bf16 / fp16 inputs directly, fp32 inputs as three TF32 products (``tf32x3``: each
operand split into a TF32 high part and a TF32 remainder, dropping only the remainder x remainder term), which
keeps the result within 1e-5 of the fp32 reference where plain TF32 (10-bit mantissa) would not (emulated at
STELLA's size: 3e-7 against 3e-4 relative, ``test_fp32_dot_precision_keeps_the_bound``), and which, unlike IEEE
fp32 FMAs, neither runs off the tensor cores nor spills registers at these tile sizes. The interpreter ignores
``input_precision`` (numpy fp32). ``pooled_query`` is the importance-weighted mean of the
queries over a candidate set (a one-pass reduction kernel).

References:
    Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment",
    ICML 2024, arXiv 2310.08204 (§2, localized patch importance scoring).
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022
    (online softmax statistics; the two-pass recomputation mirrors its backward pass).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import _utils

__all__ = [
    "attention_importance",
    "attention_importance_ref",
    "attention_importance_triton",
    "pooled_query",
    "pooled_query_ref",
    "pooled_query_triton",
]

_LOG2E = math.log2(math.e)
FP32_PRECISION = "tf32x3"
"""``tl.dot`` precision of fp32 inputs: three TF32 tensor-core products (16-bit inputs ignore it)."""


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(
    Q,  # (B, H, M, K) fp32 / bf16 / fp16, any strides
    Kt,  # (B, H, N, K) same dtype as Q
    LSE,  # (B*H, M) fp32 out: log2-sum-exp2 of each query row of the base-2 logits
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qk,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kk,
    H,
    M,
    N,
    K,
    qk_scale,  # scale / temperature * log2(e): logits in base 2
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs ("tf32x3"); ignored for 16-bit inputs
    UPCAST: tl.constexpr,  # load 16-bit inputs as fp32 (the interpreter's bf16 tl.dot is wrong)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk
    q_MK = tl.load(q_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    if UPCAST:
        q_MK = q_MK.to(tl.float32)
    k_base = Kt + b * stride_kb + h * stride_kh

    m_M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_M = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        mask_n = offs_n < N
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_k[None, :] * stride_kk
        k_NK = tl.load(k_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            k_NK = k_NK.to(tl.float32)
        s_MN = tl.dot(q_MK, tl.trans(k_NK), input_precision=PRECISION)
        s_MN = tl.where(mask_n[None, :], s_MN * qk_scale, float("-inf"))
        # queries on the MMA rows: the row max and sum stay inside a warp (a few shuffles, no shared memory)
        m_new = tl.maximum(m_M, tl.max(s_MN, axis=1))
        l_M = l_M * tl.exp2(m_M - m_new) + tl.sum(tl.exp2(s_MN - m_new[:, None]), axis=1)
        m_M = m_new
    lse_M = m_M + tl.log2(l_M)
    tl.store(LSE + pid_bh * M + offs_m, lse_M, mask=mask_m)


@triton.jit
def _col_accum_kernel(
    Q,  # (B, H, M, K)
    Kt,  # (B, H, N, K)
    LSE,  # (B*H, M) fp32, from _row_stats_kernel
    OUT,  # (B*H, N) fp32 out: sum over queries of the softmax probabilities of each key
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qk,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kk,
    H,
    M,
    N,
    K,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K

    k_ptrs = Kt + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_k[None, :] * stride_kk
    k_NK = tl.load(k_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    if UPCAST:
        k_NK = k_NK.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh

    acc_N = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + offs_m0
        mask_m = offs_m < M
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk
        q_MK = tl.load(q_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            q_MK = q_MK.to(tl.float32)
        # queries past M get lse = +inf, hence p = 0
        lse_M = tl.load(LSE + pid_bh * M + offs_m, mask=mask_m, other=float("inf"))
        # keys on the MMA rows (K·Qᵀ): the sum over queries runs along a row, inside a warp
        s_NM = tl.dot(k_NK, tl.trans(q_MK), input_precision=PRECISION)
        p_NM = tl.exp2(s_NM * qk_scale - lse_M[None, :])
        acc_N += tl.sum(p_NM, axis=1)
    tl.store(OUT + pid_bh * N + offs_n, acc_N, mask=mask_n)


@triton.jit
def _pooled_query_kernel(
    Q,  # (B, H, L, K) any float dtype, any strides
    W,  # (B, L) float weights, contiguous
    C,  # (B, L) uint8 candidate flags (bool viewed as uint8), contiguous
    OUT,  # (B*H, K) fp32 out
    stride_qb,
    stride_qh,
    stride_ql,
    stride_qk,
    H,
    L,
    K,
    BLOCK_L: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_l0 = tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    q_base = Q + b * stride_qb + h * stride_qh

    acc_K = tl.zeros([BLOCK_K], dtype=tl.float32)
    den_L = tl.zeros([BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + offs_l0
        mask_l = offs_l < L
        w_L = tl.load(W + b * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
        c_L = tl.load(C + b * L + offs_l, mask=mask_l, other=0)
        w_L = tl.where(c_L != 0, w_L, 0.0)
        q_ptrs = q_base + offs_l[:, None] * stride_ql + offs_k[None, :] * stride_qk
        q_LK = tl.load(q_ptrs, mask=mask_l[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc_K += tl.sum(q_LK * w_L[:, None], axis=0)
        den_L += w_L
    den = tl.sum(den_L, axis=0)
    out_K = tl.where(den > 0, acc_K / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(OUT + pid_bh * K + offs_k, out_K, mask=mask_k)


# --------------------------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------------------------


def _cfg(m: int, n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


# Candidates per pass and input dtype, the first being the fixed config. Cut from the 24 tiles x warps x stages
# tried before (minutes of compiling on first use) to those that compile for sm_90 without spills, with tensor-core
# MMAs, a moderate register count and two barriers per loop iteration (the reduction stays inside a warp), over
# distinct shapes: the larger tile dimension on the MMA rows (queries in pass 1, keys in pass 2), one or two
# warpgroups; fp32 (tf32x3) keeps every operand twice in shared memory, so its tiles are smaller. Figures per
# config: ``python bench/kernels.py --compile``.
_ROW_STATS_SPACE = {
    "16bit": [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 128, 4, 3), _cfg(128, 64, 8, 2)],
    "fp32": [_cfg(64, 64, 4, 2), _cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2)],
}
_COL_ACCUM_SPACE = {
    "16bit": [_cfg(64, 128, 4, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 128, 8, 2)],
    "fp32": [_cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 2)],
}


def _space(table: dict[str, list[triton.Config]]):
    return lambda named: table["fp32" if named["Q"].dtype == torch.float32 else "16bit"]


_row_stats = _utils.Launcher(_row_stats_kernel, _space(_ROW_STATS_SPACE), key=["M", "N", "K"])
_col_accum = _utils.Launcher(_col_accum_kernel, _space(_COL_ACCUM_SPACE), key=["M", "N", "K"])
_pooled = _utils.Launcher(
    _pooled_query_kernel, _utils.configs([{"BLOCK_L": b} for b in (32, 64, 128)], (2, 4)), key=["L", "K"]
)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, L, D), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, H, Lq, D) = {tuple(q.shape)} and k (B, H, Lk, D) = {tuple(k.shape)} disagree on B, H or D"
        )
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    _utils.assert_same_device(q=q, k=k)


def attention_importance_triton(q: torch.Tensor, k: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """Triton path of :func:`attention_importance` (always runs the kernels)."""
    _check_qk(q, k)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, H, M, K = q.shape
    N = k.shape[2]
    if q.dtype == torch.float64:
        q, k = q.float(), k.float()
    qk_scale = float(scale) / float(temperature) * _LOG2E
    lse = torch.empty((B * H, M), device=q.device, dtype=torch.float32)
    partial = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    block_k = _utils.next_pow2(K, 16)  # tl.dot needs every dim >= 16
    strides = (*q.stride(), *k.stride())
    upcast = _row_stats.interpreted and q.dtype != torch.float32
    const = {"BLOCK_K": block_k, "PRECISION": FP32_PRECISION, "UPCAST": upcast}
    interp = {"BLOCK_M": _utils.interp_block(M, 256, 16), "BLOCK_N": _utils.interp_block(N, 256, 16)}
    _row_stats(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H),
        (q, k, lse, *strides, H, M, N, K, qk_scale),
        const,
        interp,
    )
    _col_accum(
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H),
        (q, k, lse, partial, *strides, H, M, N, K, qk_scale),
        const,
        interp,
    )
    return partial.view(B, H, N).sum(dim=1).mul_(1.0 / (H * M))


def attention_importance_ref(q: torch.Tensor, k: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """Reference (and specification): materialises the (B, H, Lq, Lk) softmax in fp32."""
    _check_qk(q, k)
    s_BHMN = torch.einsum("bhmd,bhnd->bhmn", q.float(), k.float()) * (scale / temperature)
    return s_BHMN.softmax(dim=-1).mean(dim=(1, 2))


@torch.no_grad()
def attention_importance(q: torch.Tensor, k: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """Mean over heads and queries of the key softmax of q·kᵀ·scale/temperature.

    Args:
        q: (B, H, Lq, D) queries (fp32 / bf16 / fp16).
        k: (B, H, Lk, D) keys, same dtype and device.
        scale: logit scale (1/sqrt(D) = 1/8 in STELLA's AVM).
        temperature: softmax temperature (0.4 in STELLA §2).

    Returns:
        (B, Lk) float32 importance; each row sums to 1.
    """
    if _utils.use_triton(_row_stats.kernel, q, k):
        return attention_importance_triton(q, k, scale, temperature)
    return attention_importance_ref(q, k, scale, temperature)


def _check_pooled(q: torch.Tensor, weights: torch.Tensor, candidates: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, L, D), got {tuple(q.shape)}")
    B, _, L, _ = q.shape
    if tuple(weights.shape) != (B, L) or tuple(candidates.shape) != (B, L):
        raise ValueError(
            f"weights {tuple(weights.shape)} and candidates {tuple(candidates.shape)} must be (B, L) = {(B, L)} "
            f"for q {tuple(q.shape)}"
        )
    if candidates.dtype != torch.bool:
        raise ValueError(f"candidates must be a bool mask, got {candidates.dtype}")
    _utils.assert_same_device(q=q, weights=weights, candidates=candidates)


def pooled_query_triton(q: torch.Tensor, weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Triton path of :func:`pooled_query`."""
    _check_pooled(q, weights, candidates)
    B, H, L, K = q.shape
    if q.dtype == torch.float64:
        q = q.float()
    w = weights.float().contiguous()
    c = candidates.contiguous().view(torch.uint8)
    out = torch.empty((B * H, K), device=q.device, dtype=torch.float32)
    _pooled(
        lambda meta: (B * H,),
        (q, w, c, out, *q.stride(), H, L, K),
        {"BLOCK_K": _utils.next_pow2(K)},
        {"BLOCK_L": _utils.interp_block(L, 1024)},
    )
    return out.view(B, H, K)


def pooled_query_ref(q: torch.Tensor, weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Reference: sum_{j in C} w_j q_j / sum_{j in C} w_j per (b, h), in fp32; zeros where the weight sum is 0."""
    _check_pooled(q, weights, candidates)
    w_BL = weights.float() * candidates
    num_BHD = torch.einsum("bl,bhld->bhd", w_BL, q.float())
    den_B = w_BL.sum(dim=1)
    safe = torch.where(den_B > 0, den_B, torch.ones_like(den_B))
    return torch.where((den_B > 0)[:, None, None], num_BHD / safe[:, None, None], torch.zeros_like(num_BHD))


@torch.no_grad()
def pooled_query(q: torch.Tensor, weights: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Importance-weighted mean query over a candidate set: q̄ = Σ_{j∈C} I[j] q[j] / Σ_{j∈C} I[j] (STELLA).

    Args:
        q: (B, H, L, D) queries.
        weights: (B, L) non-negative weights (the importance I).
        candidates: (B, L) bool candidate set C (e.g. ``topk_mask(I, k)``).

    Returns:
        (B, H, D) float32; rows whose candidate weights sum to 0 are 0.
    """
    if _utils.use_triton(_pooled.kernel, q, weights, candidates):
        return pooled_query_triton(q, weights, candidates)
    return pooled_query_ref(q, weights, candidates)
