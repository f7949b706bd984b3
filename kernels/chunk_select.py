"""STELLA's chunked audio selection (docs/methods/stella.md): exactly k patches in whole time chunks, fused per row.

Legend (shape suffixes): B = batch rows, L = audio patches, C = chunks, S = patches per chunk, R = row tile.

Audio patches are in the canonical time-major order i = t * Fp + f (Fp = freq_patches = 8, Tp = L / Fp = 64).
A chunk is ``chunk_times`` consecutive time steps with all frequency bands, so chunk c holds the contiguous
indices [c*S, (c+1)*S) with S = chunk_times * Fp (32), flattened time-major inside the chunk; C = Tp /
chunk_times (16). Per row, given the importance I (B, L) and the pruned mask p (B, L) (Bernoulli(π_a) draws):

1. Chunk score c_k = mean over the chunk's time steps of a_t = Σ_f I[t, f] (= chunk sum / chunk_times). Draw a
   permutation of the chunks without replacement in proportion to c_k (Gumbel keys; zero scores in a lower tier,
   so all-zero rows give a uniform permutation; equal keys go to the lower chunk index).
2. Walk the chunks in that order, accumulating the unpruned counts: cum_c (inclusive), prev_c = cum_c − avail_c.
   A chunk with cum_c <= k is taken whole (all its unpruned patches); the boundary chunk is the one with
   prev_c < k < cum_c; it keeps need = k − prev_c of its unpruned patches (prunes e = cum_c − k more); every
   chunk after it is dropped. A chunk whose patches are all pruned is walked (it counts as chosen for the
   neighbour rule) but contributes nothing; with no pruning the result is exactly k / S whole chunks.
3. Side of the boundary chunk t: if chunk t−1 was walked before it and t+1 was not, keep its first ``need``
   unpruned positions (prune the last e: stay contiguous with t−1); if t+1 was walked before and t−1 was not,
   keep the last ``need``; otherwise (both or neither; chunk 0 has no t−1, the last chunk no t+1) a fair coin.
4. Edge rule beyond STELLA (cannot happen there: π is zero outside the 256 candidates, so >= 256 patches stay
   unpruned): if fewer than k patches are unpruned, all of them are kept and the deficit is filled with pruned
   patches, chunks in the walk order, lowest positions first. So exactly k patches are always kept.

Outputs: kept indices (B, k) in ascending order (``argsort(mask)`` of STELLA, first k) and the kept mask (B, L).
The kernel does all of it in registers: the walk order is a (C x C) comparison matrix (rank by counting), the
prefix sums over the walk are masked row sums of that matrix, positions inside a chunk are ``tl.cumsum``.

References:
    Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment",
    ICML 2024, arXiv 2310.08204 (§4.2, ``compute_core_audio_indices`` in the official code).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _utils
from kernels._utils import ZERO_TIER, philox_uniform

__all__ = ["chunk_select", "chunk_select_given", "chunk_select_ref", "chunk_select_triton"]

OP_CHUNKS = 2  # philox stream op id (``_utils.stream_id``)


@triton.jit
def _chunk_select_kernel(
    IMP,  # (B, L) float importance, contiguous; L = NCH * S
    PR,  # (B, L) uint8 pruned flags, contiguous
    RNG,  # (2,) int64 [seed, offset]
    IDS,  # (B, KSEL) int64 out: kept indices, ascending
    KEEP,  # (B, L) uint8 out: 1 where kept
    B,
    NCH,
    S,
    KSEL,
    inv_times,  # 1 / chunk_times
    STREAM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows_R = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    L = NCH * S
    ok_c = offs_c < NCH
    valid_RCS = (rows_R < B)[:, None, None] & ok_c[None, :, None] & (offs_s < S)[None, None, :]
    idx_CS = offs_c[:, None] * S + offs_s[None, :]
    flat_RCS = rows_R.to(tl.int64)[:, None, None] * L + idx_CS[None, :, :]

    imp_RCS = tl.load(IMP + flat_RCS, mask=valid_RCS, other=0.0).to(tl.float32)
    pruned_RCS = tl.load(PR + flat_RCS, mask=valid_RCS, other=0) != 0
    avail_RCS = (valid_RCS & ~pruned_RCS).to(tl.int32)
    pr_RCS = (valid_RCS & pruned_RCS).to(tl.int32)
    n_avail_RC = tl.sum(avail_RCS, axis=2)
    n_pr_RC = tl.sum(pr_RCS, axis=2)

    # 1. walk order: Gumbel keys of the chunk scores, rank by counting (ties -> lower chunk index)
    score_RC = tl.sum(imp_RCS, axis=2) * inv_times
    score_RC = tl.minimum(tl.where(score_RC > 0, score_RC, 0.0), 3.4028234663852886e38)
    ctr_RC = rows_R.to(tl.int64)[:, None] * NCH + offs_c[None, :]
    u_RC, coin_RC = philox_uniform(RNG, ctr_RC, STREAM)
    safe_RC = tl.where(score_RC > 0, score_RC, 1.0)
    key_RC = tl.where(score_RC > 0, tl.log(safe_RC), ZERO_TIER) - tl.log(-tl.log(u_RC))
    ki = key_RC[:, :, None]
    kj = key_RC[:, None, :]
    ci = offs_c[None, :, None]
    cj = offs_c[None, None, :]
    # before[r, i, j]: chunk j is walked before chunk i
    before_RCC = ((kj > ki) | ((kj == ki) & (cj < ci))) & ok_c[None, None, :]
    upto_RCC = before_RCC | (cj == ci)

    # 2. prefix counts along the walk
    cum_RC = tl.sum(tl.where(upto_RCC, n_avail_RC[:, None, :], 0), axis=2)
    prev_RC = cum_RC - n_avail_RC
    full_RC = cum_RC <= KSEL
    boundary_RC = (prev_RC < KSEL) & (cum_RC > KSEL)
    need_RC = KSEL - prev_RC

    # 3. side of the boundary chunk
    left_RC = tl.sum((before_RCC & (cj == ci - 1)).to(tl.int32), axis=2) > 0
    right_RC = tl.sum((before_RCC & (cj == ci + 1)).to(tl.int32), axis=2) > 0
    front_RC = (left_RC & ~right_RC) | ((left_RC == right_RC) & (coin_RC < 0.5))
    front_rank_RCS = tl.cumsum(avail_RCS, axis=2)  # 1-based position among the chunk's unpruned patches
    back_rank_RCS = n_avail_RC[:, :, None] - front_rank_RCS + 1
    side_rank_RCS = tl.where(front_RC[:, :, None], front_rank_RCS, back_rank_RCS)
    in_boundary_RCS = boundary_RC[:, :, None] & (side_rank_RCS <= need_RC[:, :, None])
    keep_RCS = (avail_RCS != 0) & (full_RC[:, :, None] | in_boundary_RCS)

    # 4. deficit (fewer than k unpruned): pruned patches in walk order, lowest positions first
    deficit_R = tl.maximum(KSEL - tl.sum(n_avail_RC, axis=1), 0)
    pcum_RC = tl.sum(tl.where(upto_RCC, n_pr_RC[:, None, :], 0), axis=2)
    pneed_RC = deficit_R[:, None] - (pcum_RC - n_pr_RC)
    prank_RCS = tl.cumsum(pr_RCS, axis=2)
    keep_RCS = keep_RCS | ((pr_RCS != 0) & (prank_RCS <= pneed_RC[:, :, None]))

    # outputs: the mask, and each kept index at its ascending position
    keep_i_RCS = keep_RCS.to(tl.int32)
    tl.store(KEEP + flat_RCS, keep_i_RCS.to(tl.uint8), mask=valid_RCS)
    n_keep_RC = tl.sum(keep_i_RCS, axis=2)
    pos_RCS = (tl.cumsum(n_keep_RC, axis=1) - n_keep_RC)[:, :, None] + tl.cumsum(keep_i_RCS, axis=2) - 1
    ids_RCS = (idx_CS[None, :, :] + rows_R[:, None, None] * 0).to(tl.int64)
    ids_ptrs = IDS + rows_R.to(tl.int64)[:, None, None] * KSEL + pos_RCS
    tl.store(ids_ptrs, ids_RCS, mask=valid_RCS & keep_RCS)


_launch = _utils.Launcher(
    _chunk_select_kernel,
    _utils.configs([{"BLOCK_R": r} for r in (1, 2, 4)], (2, 4)),
    key=["NCH", "S", "KSEL"],
)


def _check(importance: torch.Tensor, pruned: torch.Tensor, k: int, chunk_times: int, freq_patches: int) -> int:
    """Validate and return the chunk size S."""
    if importance.dim() != 2 or pruned.shape != importance.shape:
        raise ValueError(f"importance {tuple(importance.shape)} and pruned {tuple(pruned.shape)} must be one (B, L)")
    if pruned.dtype != torch.bool:
        raise ValueError(f"pruned must be a bool mask, got {pruned.dtype}")
    if chunk_times < 1 or freq_patches < 1:
        raise ValueError(f"chunk_times {chunk_times} and freq_patches {freq_patches} must be >= 1")
    B, L = importance.shape
    S = chunk_times * freq_patches
    if L == 0 or L % S != 0:
        raise ValueError(
            f"L = {L} audio patches is not a whole number of chunks of chunk_times * freq_patches = "
            f"{chunk_times} * {freq_patches} = {S}"
        )
    if not 0 < k <= L:
        raise ValueError(f"k = {k} must satisfy 0 < k <= L = {L}")
    if B * L >= 2**31:
        raise ValueError(f"importance {tuple(importance.shape)}: at most 2**31 elements")
    _utils.assert_same_device(importance=importance, pruned=pruned)
    return S


def chunk_select_triton(
    importance: torch.Tensor,
    pruned: torch.Tensor,
    k: int,
    rng: torch.Tensor,
    *,
    chunk_times: int = 4,
    freq_patches: int = 8,
    stream: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`chunk_select`."""
    S = _check(importance, pruned, k, chunk_times, freq_patches)
    _utils.check_rng(rng)
    _utils.assert_same_device(importance=importance, rng=rng)
    B, L = importance.shape
    nch = L // S
    imp = importance.contiguous()
    if imp.dtype == torch.float64:
        imp = imp.float()
    ids = torch.empty((B, k), device=importance.device, dtype=torch.int64)
    keep = torch.empty((B, L), device=importance.device, dtype=torch.uint8)
    block_c, block_s = _utils.next_pow2(nch), _utils.next_pow2(S)
    _launch(
        lambda meta: (triton.cdiv(B, meta["BLOCK_R"]),),
        (imp, pruned.contiguous().view(torch.uint8), rng, ids, keep, B, nch, S, k, 1.0 / chunk_times),
        {"STREAM": _utils.stream_id(stream, OP_CHUNKS), "BLOCK_C": block_c, "BLOCK_S": block_s},
        {"BLOCK_R": min(_utils.next_pow2(B), max(1, (1 << 15) // (block_c * max(block_c, block_s))))},
    )
    return ids, keep.view(torch.bool)


def chunk_select_given(
    importance: torch.Tensor,
    pruned: torch.Tensor,
    k: int,
    keys: torch.Tensor,
    front: torch.Tensor,
    *,
    chunk_times: int = 4,
    freq_patches: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic part of the reference: selection given the walk keys and the coins.

    Args:
        keys: (B, C) walk keys, larger first (ties -> lower chunk index).
        front: (B, C) bool coin per chunk, used only by a boundary chunk with both or neither neighbour walked:
            True keeps its first unpruned positions.

    Returns:
        (ids (B, k) int64 ascending, keep (B, L) bool).
    """
    S = _check(importance, pruned, k, chunk_times, freq_patches)
    B, L = importance.shape
    nch = L // S
    if tuple(keys.shape) != (B, nch) or tuple(front.shape) != (B, nch):
        raise ValueError(f"keys {tuple(keys.shape)} and front {tuple(front.shape)} must be (B, C) = {(B, nch)}")
    dev = importance.device
    pr_BCS = pruned.view(B, nch, S)
    avail_BCS = ~pr_BCS
    n_avail_BC = avail_BCS.sum(-1)
    n_pr_BC = pr_BCS.sum(-1)

    order_BC = torch.sort(keys.float(), dim=1, descending=True, stable=True).indices  # walk order
    rank_BC = torch.argsort(order_BC, dim=1)  # position of each chunk in the walk
    cum_BC = torch.gather(torch.gather(n_avail_BC, 1, order_BC).cumsum(1), 1, rank_BC)
    prev_BC = cum_BC - n_avail_BC
    full_BC = cum_BC <= k
    boundary_BC = (prev_BC < k) & (cum_BC > k)
    need_BC = k - prev_BC

    no = torch.zeros((B, 1), dtype=torch.bool, device=dev)
    left_BC = torch.cat([no, rank_BC[:, :-1] < rank_BC[:, 1:]], dim=1)
    right_BC = torch.cat([rank_BC[:, 1:] < rank_BC[:, :-1], no], dim=1)
    front_BC = (left_BC & ~right_BC) | ((left_BC == right_BC) & front)
    front_rank_BCS = avail_BCS.long().cumsum(-1)
    back_rank_BCS = n_avail_BC[..., None] - front_rank_BCS + 1
    side_rank_BCS = torch.where(front_BC[..., None], front_rank_BCS, back_rank_BCS)
    keep_BCS = avail_BCS & (full_BC[..., None] | (boundary_BC[..., None] & (side_rank_BCS <= need_BC[..., None])))

    deficit_B = (k - n_avail_BC.sum(1)).clamp_min(0)
    pcum_BC = torch.gather(torch.gather(n_pr_BC, 1, order_BC).cumsum(1), 1, rank_BC)
    pneed_BC = deficit_B[:, None] - (pcum_BC - n_pr_BC)
    keep_BCS |= pr_BCS & (pr_BCS.long().cumsum(-1) <= pneed_BC[..., None])

    keep = keep_BCS.reshape(B, L)
    ids = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :k]
    return ids, keep


def chunk_select_ref(
    importance: torch.Tensor,
    pruned: torch.Tensor,
    k: int,
    rng: torch.Tensor,
    *,
    chunk_times: int = 4,
    freq_patches: int = 8,
    stream: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: chunk scores, Gumbel walk keys and coins, then :func:`chunk_select_given`.

    The keys and coins come from the kernel's draws (Philox counter ``b * C + c``, both words of one draw), so
    the reference keeps the same patches as the kernel for the same ``rng`` and ``stream``.
    """
    S = _check(importance, pruned, k, chunk_times, freq_patches)
    _utils.assert_same_device(importance=importance, rng=rng)
    B, L = importance.shape
    nch = L // S
    score_BC = importance.float().view(B, nch, S).sum(-1) / chunk_times
    counter_BC = _utils.flat_counter((B, nch), importance.device)
    u_BC, coin_BC = _utils.philox_uniform_ref(rng, counter_BC, _utils.stream_id(stream, OP_CHUNKS))
    keys_BC = _utils.gumbel_keys_ref(score_BC, u_BC)
    front_BC = coin_BC < 0.5
    return chunk_select_given(
        importance, pruned, k, keys_BC, front_BC, chunk_times=chunk_times, freq_patches=freq_patches
    )


@torch.no_grad()
def chunk_select(
    importance: torch.Tensor,
    pruned: torch.Tensor,
    k: int,
    rng: torch.Tensor,
    *,
    chunk_times: int = 4,
    freq_patches: int = 8,
    stream: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """STELLA's chunked audio selection: exactly k patches in whole time chunks (module docstring).

    Args:
        importance: (B, L) audio importance I_a, time-major patch order (L = Tp * freq_patches).
        pruned: (B, L) bool Bernoulli(π_a) draws (``bernoulli_prune``).
        k: patches to keep (256 in STELLA).
        rng: int64 (2,) [seed, offset] on the same device.
        chunk_times: time steps per chunk (``num_core_audio_times`` = 4).
        freq_patches: frequency patches per time step (128 mel / 16 = 8).
        stream: call-site id (see ``bernoulli_prune``).

    Returns:
        (ids (B, k) int64 kept indices ascending, keep (B, L) bool).
    """
    if _utils.use_triton(_launch.kernel, importance, pruned, rng):
        return chunk_select_triton(
            importance, pruned, k, rng, chunk_times=chunk_times, freq_patches=freq_patches, stream=stream
        )
    return chunk_select_ref(
        importance, pruned, k, rng, chunk_times=chunk_times, freq_patches=freq_patches, stream=stream
    )
