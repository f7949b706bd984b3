"""Bernoulli pruning, weighted sampling without replacement, deterministic top-k: fused, static-shape, sync-free.

Legend (shape suffixes): B = batch rows, L = items (patches) per row, R / I / J = row / item tiles.

- ``bernoulli_prune(pi, rng)``: pruned[b, l] ~ Bernoulli(pi[b, l]) independently (docs/methods/stella.md steps 1-2).
  ``prune_weights(w, pi, rng)`` returns w with the pruned entries zeroed, from the same draws.
- ``weighted_sample(w, k, rng)``: k distinct indices per row, drawn sequentially with probability proportional
  to the remaining weights (Plackett–Luce; the distribution of ``torch.multinomial(w, k, replacement=False)``),
  returned in draw order. Gumbel-top-k: key = log(w) + Gumbel, the k largest keys in decreasing order are a
  sample of that distribution (Gumbel-max trick applied k times; equivalently the exponential race w / Exp(1)).
  Zero weights sit in a lower tier (``_utils.ZERO_TIER``), so when fewer than k weights are positive the
  remaining slots are filled uniformly at random from the zero-weight items, as STELLA's multinomial call does.
- ``topk_indices(scores, k)``: the deterministic top-k (first step, docs/methods/stella.md), in
  decreasing score order, ties to the lower index; ``topk_mask`` is its (B, L) bool form.

The selection kernel ranks by counting instead of sorting: rank[i] = #{j : key_j > key_i, or key_j == key_i and
j < i}, a strict total order, so ranks are a permutation and out[rank[i]] = i for rank[i] < k writes each output
slot exactly once. Work is O(L^2) per row in tiles of (BLOCK_I x BLOCK_J) comparisons: cheap at patch counts
(L = 784 is 0.6 M comparisons a row), one launch, no host value, no data-dependent shape. The random keys of a
j-tile are recomputed from the counter-based RNG rather than stored.

Randomness: ``rng = [seed, offset]`` (int64 (2,), ``_utils.new_rng``), Philox counter = (b * L + l, offset,
stream). The ``*_ref`` functions take the same ``rng`` and ``stream`` and draw the same numbers
(``_utils.philox_uniform_ref``), so reference and kernel make the same draws, up to float rounding of the keys.

References:
    Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment",
    ICML 2024, arXiv 2310.08204 (§4.1 video selection, §4.3 first step).
    Kool, van Hoof, Welling, "Stochastic Beams and Where to Find Them: The Gumbel-Top-k Trick for Sampling
    Sequences Without Replacement", ICML 2019, arXiv 1903.06059.
    Efraimidis, Spirakis, "Weighted random sampling with a reservoir", IPL 2006 (the exponential race).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _utils
from kernels._utils import ZERO_TIER, philox_uniform

__all__ = [
    "bernoulli_prune",
    "bernoulli_prune_ref",
    "bernoulli_prune_triton",
    "prune_weights",
    "prune_weights_ref",
    "prune_weights_triton",
    "topk_indices",
    "topk_indices_ref",
    "topk_indices_triton",
    "topk_mask",
    "weighted_sample",
    "weighted_sample_ref",
    "weighted_sample_triton",
]

OP_PRUNE = 0  # philox stream op ids (``_utils.stream_id``)
OP_SAMPLE = 1
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _bernoulli_kernel(
    PI,  # (N,) float probabilities, contiguous (B * L flattened)
    W,  # (N,) float weights (read only when HAS_W)
    PRUNED,  # (N,) uint8 out: 1 where pruned
    WOUT,  # (N,) fp32 out: W with pruned entries zeroed (written only when HAS_W)
    RNG,  # (2,) int64 [seed, offset]
    N,
    STREAM: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    pi = tl.load(PI + offs, mask=mask, other=0.0).to(tl.float32)
    u, _ = philox_uniform(RNG, offs, STREAM)
    pruned = u < pi  # u in (0, 1): pi <= 0 never prunes, pi >= 1 always does
    tl.store(PRUNED + offs, pruned.to(tl.uint8), mask=mask)
    if HAS_W:
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(WOUT + offs, tl.where(pruned, 0.0, w), mask=mask)


@triton.jit
def _select_keys(W, RNG, rows, cols, B, L, STREAM: tl.constexpr, RANDOM: tl.constexpr):
    """Keys of a (rows, cols) tile: Gumbel keys log(w) + G (two tiers) when RANDOM, else the scores (NaN -> -inf)."""
    flat = rows.to(tl.int64)[:, None] * L + cols[None, :]
    mask = (rows < B)[:, None] & (cols < L)[None, :]
    w = tl.load(W + flat, mask=mask, other=0.0).to(tl.float32)
    if RANDOM:
        w = tl.minimum(tl.where(w > 0, w, 0.0), _FP32_MAX)  # NaN and negatives -> 0, inf -> fp32 max
        u, _ = philox_uniform(RNG, flat, STREAM)
        key = tl.where(w > 0, tl.log(tl.where(w > 0, w, 1.0)), ZERO_TIER) - tl.log(-tl.log(u))
    else:
        key = tl.where(w == w, w, float("-inf"))
    return key


@triton.jit
def _rank_select_kernel(
    W,  # (B, L) float weights (RANDOM) or scores, contiguous
    RNG,  # (2,) int64 [seed, offset]
    OUT,  # (B, KSEL) int64 out: the selected item indices in decreasing key order
    B,
    L,
    KSEL,
    STREAM: tl.constexpr,
    RANDOM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    rows_R = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j0 = tl.arange(0, BLOCK_J)
    key_RI = _select_keys(W, RNG, rows_R, offs_i, B, L, STREAM, RANDOM)

    rank_RI = tl.zeros([BLOCK_R, BLOCK_I], dtype=tl.int32)
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + offs_j0
        key_RJ = _select_keys(W, RNG, rows_R, offs_j, B, L, STREAM, RANDOM)
        kj = key_RJ[:, None, :]
        ki = key_RI[:, :, None]
        earlier = (offs_j[None, None, :] < offs_i[None, :, None]) & (offs_j < L)[None, None, :]
        before_RIJ = ((kj > ki) & (offs_j < L)[None, None, :]) | ((kj == ki) & earlier)
        rank_RI += tl.sum(before_RIJ.to(tl.int32), axis=2)

    sel = (rows_R < B)[:, None] & (offs_i < L)[None, :] & (rank_RI < KSEL)
    out_ptrs = OUT + rows_R.to(tl.int64)[:, None] * KSEL + rank_RI
    tl.store(out_ptrs, (offs_i[None, :] + rank_RI * 0).to(tl.int64), mask=sel)


# --------------------------------------------------------------------------------------------------------------
# host launchers
# --------------------------------------------------------------------------------------------------------------

_bernoulli = _utils.Launcher(_bernoulli_kernel, _utils.configs([{"BLOCK": b} for b in (256, 1024)], (4,)), ["N"])
_rank_select = _utils.Launcher(
    _rank_select_kernel,
    _utils.configs(
        [
            {"BLOCK_R": 1, "BLOCK_I": 64, "BLOCK_J": 64},
            {"BLOCK_R": 1, "BLOCK_I": 128, "BLOCK_J": 32},
            {"BLOCK_R": 1, "BLOCK_I": 32, "BLOCK_J": 128},
            {"BLOCK_R": 8, "BLOCK_I": 16, "BLOCK_J": 16},
        ],
        (4, 8),
    ),
    key=["L", "KSEL"],
)


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be (B, L) with L > 0, got {tuple(x.shape)}")
    if x.shape[0] * x.shape[1] >= 2**32:
        raise ValueError(f"{name} {tuple(x.shape)}: at most 2**32 elements (Philox counter width)")


def _check_k(k: int, L: int) -> None:
    if not 0 < k <= L:
        raise ValueError(f"k = {k} must satisfy 0 < k <= L = {L}")


def _check_prune(pi: torch.Tensor, weights: torch.Tensor | None, rng: torch.Tensor) -> None:
    _check_rows("pi", pi)
    if weights is not None and weights.shape != pi.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and pi {tuple(pi.shape)} must have the same (B, L) shape")
    _utils.check_rng(rng)
    _utils.assert_same_device(pi=pi, rng=rng, **({} if weights is None else {"weights": weights}))


def _bernoulli_launch(pi: torch.Tensor, weights: torch.Tensor | None, rng: torch.Tensor, stream: int):
    _check_prune(pi, weights, rng)
    n = pi.numel()
    pi_c = pi.contiguous()
    pruned = torch.empty(pi.shape, device=pi.device, dtype=torch.uint8)
    w_c = pi_c if weights is None else weights.contiguous()
    w_out = pruned if weights is None else torch.empty(pi.shape, device=pi.device, dtype=torch.float32)
    _bernoulli(
        lambda meta: (triton.cdiv(n, meta["BLOCK"]),),
        (pi_c, w_c, pruned, w_out, rng, n),
        {"STREAM": _utils.stream_id(stream, OP_PRUNE), "HAS_W": weights is not None},
        {"BLOCK": _utils.interp_block(n, 1 << 16)},
    )
    return pruned.view(torch.bool), (None if weights is None else w_out)


def bernoulli_prune_triton(pi: torch.Tensor, rng: torch.Tensor, *, stream: int = 0) -> torch.Tensor:
    """Triton path of :func:`bernoulli_prune`."""
    return _bernoulli_launch(pi, None, rng, stream)[0]


def _uniforms(x: torch.Tensor, rng: torch.Tensor, stream: int, op: int) -> torch.Tensor:
    """The kernels' uniforms for a (B, L) operand: Philox counter = flat index ``b * L + l``."""
    _utils.assert_same_device(operand=x, rng=rng)
    u, _ = _utils.philox_uniform_ref(rng, _utils.flat_counter(x.shape, x.device), _utils.stream_id(stream, op))
    return u


def bernoulli_prune_ref(pi: torch.Tensor, rng: torch.Tensor, *, stream: int = 0) -> torch.Tensor:
    """Reference: u < pi with u uniform on (0, 1), the same u as the kernel's for this ``rng`` and ``stream``."""
    _check_rows("pi", pi)
    return _uniforms(pi, rng, stream, OP_PRUNE) < pi.float()


@torch.no_grad()
def bernoulli_prune(pi: torch.Tensor, rng: torch.Tensor, *, stream: int = 0) -> torch.Tensor:
    """Independent Bernoulli(pi) draws: True = pruned (docs/methods/stella.md).

    Args:
        pi: (B, L) probabilities (values <= 0 never prune, >= 1 always prune).
        rng: int64 (2,) [seed, offset] on the same device (``kernels.new_rng``).
        stream: call-site id, so two calls in one step with the same ``rng`` draw independent numbers.

    Returns:
        (B, L) bool.
    """
    if _utils.use_triton(_bernoulli.kernel, pi, rng):
        return bernoulli_prune_triton(pi, rng, stream=stream)
    return bernoulli_prune_ref(pi, rng, stream=stream)


def prune_weights_triton(
    weights: torch.Tensor, pi: torch.Tensor, rng: torch.Tensor, *, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`prune_weights`."""
    pruned, w_out = _bernoulli_launch(pi, weights, rng, stream)
    return w_out, pruned


def prune_weights_ref(
    weights: torch.Tensor, pi: torch.Tensor, rng: torch.Tensor, *, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (weights zeroed where pruned, pruned) with pruned = ``bernoulli_prune_ref(pi, rng, stream=...)``."""
    if weights.shape != pi.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and pi {tuple(pi.shape)} must have the same (B, L) shape")
    pruned = bernoulli_prune_ref(pi, rng, stream=stream)
    return weights.float().masked_fill(pruned, 0.0), pruned


@torch.no_grad()
def prune_weights(
    weights: torch.Tensor, pi: torch.Tensor, rng: torch.Tensor, *, stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights of Bernoulli(pi)-pruned items (docs/methods/stella.md: I_v * !Bern(pi_v)).

    Uses the same draws as ``bernoulli_prune(pi, rng, stream=stream)``.

    Returns:
        (kept weights (B, L) float32, pruned (B, L) bool).
    """
    if _utils.use_triton(_bernoulli.kernel, weights, pi, rng):
        return prune_weights_triton(weights, pi, rng, stream=stream)
    return prune_weights_ref(weights, pi, rng, stream=stream)


def _rank_select_launch(w: torch.Tensor, k: int, rng: torch.Tensor | None, stream: int) -> torch.Tensor:
    B, L = w.shape
    w_c = w.contiguous()
    if w_c.dtype == torch.float64:
        w_c = w_c.float()
    out = torch.empty((B, k), device=w.device, dtype=torch.int64)
    random = rng is not None
    rng_arg = rng if random else out  # unused pointer when not RANDOM
    block_ij = _utils.interp_block(L, 1024)
    _rank_select(
        lambda meta: (triton.cdiv(B, meta["BLOCK_R"]), triton.cdiv(L, meta["BLOCK_I"])),
        (w_c, rng_arg, out, B, L, k),
        {"STREAM": _utils.stream_id(stream, OP_SAMPLE), "RANDOM": random},
        {
            "BLOCK_R": min(_utils.next_pow2(B), max(1, (1 << 18) // (block_ij * block_ij))),
            "BLOCK_I": block_ij,
            "BLOCK_J": block_ij,
        },
    )
    return out


def weighted_sample_triton(weights: torch.Tensor, k: int, rng: torch.Tensor, *, stream: int = 0) -> torch.Tensor:
    """Triton path of :func:`weighted_sample`."""
    _check_rows("weights", weights)
    _check_k(k, weights.shape[1])
    _utils.check_rng(rng)
    _utils.assert_same_device(weights=weights, rng=rng)
    return _rank_select_launch(weights, k, rng, stream)


def weighted_sample_ref(weights: torch.Tensor, k: int, rng: torch.Tensor, *, stream: int = 0) -> torch.Tensor:
    """Reference: Gumbel-top-k in torch (keys ``_utils.gumbel_keys_ref``, stable descending sort, first k)."""
    _check_rows("weights", weights)
    _check_k(k, weights.shape[1])
    keys = _utils.gumbel_keys_ref(weights, _uniforms(weights, rng, stream, OP_SAMPLE))
    return torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :k]


@torch.no_grad()
def weighted_sample(weights: torch.Tensor, k: int, rng: torch.Tensor, *, stream: int = 0) -> torch.Tensor:
    """k indices per row without replacement, drawn in proportion to the weights (Plackett–Luce order).

    Args:
        weights: (B, L) non-negative weights (NaN and negatives count as 0). Zero-weight items are drawn only
            after every positive one, uniformly at random among themselves.
        k: number of draws, 0 < k <= L (a static size).
        rng: int64 (2,) [seed, offset] on the same device.
        stream: call-site id (see ``bernoulli_prune``).

    Returns:
        (B, k) int64 indices in draw order.
    """
    if _utils.use_triton(_rank_select.kernel, weights, rng):
        return weighted_sample_triton(weights, k, rng, stream=stream)
    return weighted_sample_ref(weights, k, rng, stream=stream)


def topk_indices_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Triton path of :func:`topk_indices`."""
    _check_rows("scores", scores)
    _check_k(k, scores.shape[1])
    return _rank_select_launch(scores, k, None, 0)


def topk_indices_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: stable descending sort (ties to the lower index, NaN last), first k."""
    _check_rows("scores", scores)
    _check_k(k, scores.shape[1])
    s = scores.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]


@torch.no_grad()
def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic top-k per row: (B, k) int64 indices in decreasing score order, ties to the lower index."""
    if _utils.use_triton(_rank_select.kernel, scores):
        return topk_indices_triton(scores, k)
    return topk_indices_ref(scores, k)


@torch.no_grad()
def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, L) bool mask of the top-k per row (STELLA's candidate sets C_v, C_a, docs/methods/stella.md)."""
    ids = topk_indices(scores, k)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, ids, True)
