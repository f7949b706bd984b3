"""Bernoulli pruning, weighted sampling without replacement and deterministic top-k.

The sampler is checked against the exact without-replacement inclusion probabilities (enumeration of ordered
draws) with 5-sigma binomial bounds at fixed seeds; the same check is shown to reject wrong samplers (with
replacement, plain top-k, keys w·U) so it is not vacuous.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.weighted_sample import (
    bernoulli_prune_ref,
    bernoulli_prune_triton,
    prune_weights_ref,
    prune_weights_triton,
    topk_indices_ref,
    topk_indices_triton,
    weighted_sample_ref,
    weighted_sample_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DRAWS = 20_000  # rows per statistical check: 5 sigma is about 0.017 at p = 0.5
Z_MAX = 5.0

# skewed weights, so with-replacement / top-k / w·U differ from the right answer by >> 5 sigma
CASES = [([0.5, 0.2, 0.15, 0.1, 0.05], 2), ([6.0, 1.0, 1.0, 3.0, 0.5, 2.0], 3)]


def _inclusion_counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Per item, the number of rows whose draw contains it."""
    hit = torch.zeros(ids.shape[0], n, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
    return hit.sum(0).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Bernoulli pruning
# ---------------------------------------------------------------------------------------------------------------


def test_bernoulli_frequencies_match_pi(device):
    pi_row = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.77, 0.99, 1.0])
    pi = pi_row.repeat(DRAWS, 1).to(device)
    pruned = bernoulli_prune_triton(pi, kernels.new_rng(11, device))
    assert pruned.dtype == torch.bool and pruned.shape == pi.shape
    freq = pruned.float().mean(0).cpu()
    sd = (pi_row * (1 - pi_row) / DRAWS).sqrt().clamp_min(1e-6)
    assert torch.all((freq - pi_row).abs() <= Z_MAX * sd), f"{freq} vs {pi_row}"
    assert freq[0] == 0 and freq[-1] == 1  # π = 0 never prunes, π = 1 always does


def test_bernoulli_is_a_function_of_rng_offset_and_stream(device):
    pi = torch.full((7, 53), 0.5, device=device)
    a = bernoulli_prune_triton(pi, kernels.new_rng(3, device))
    assert torch.equal(a, bernoulli_prune_triton(pi, kernels.new_rng(3, device)))
    assert not torch.equal(a, bernoulli_prune_triton(pi, kernels.new_rng(4, device)))
    assert not torch.equal(a, bernoulli_prune_triton(pi, kernels.new_rng(3, device), stream=1))
    rng = kernels.new_rng(3, device)
    kernels.advance_rng(rng)
    assert rng.tolist() == [3, 1]
    assert not torch.equal(a, bernoulli_prune_triton(pi, rng))
    # rows are independent of each other: no two rows repeat the same pattern
    assert a.unique(dim=0).shape[0] == 7


def test_prune_weights_uses_the_same_draws(device):
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(5, 97, generator=gen).to(device)
    pi = torch.rand(5, 97, generator=gen).to(device)
    rng = kernels.new_rng(8, device)
    kept, pruned = prune_weights_triton(w, pi, rng, stream=2)
    assert torch.equal(pruned, bernoulli_prune_triton(pi, rng, stream=2))
    assert torch.equal(kept, torch.where(pruned, torch.zeros_like(w), w))
    kept_r, pruned_r = prune_weights_ref(w, pi, rng, stream=2)
    assert torch.equal(pruned_r, pruned) and torch.equal(kept_r, kept)


def test_bernoulli_ref_frequencies():
    pi = torch.tensor([0.1, 0.6]).repeat(DRAWS, 1)
    freq = bernoulli_prune_ref(pi, kernels.new_rng(0)).float().mean(0)
    assert torch.all((freq - pi[0]).abs() <= Z_MAX * (pi[0] * (1 - pi[0]) / DRAWS).sqrt())


# ---------------------------------------------------------------------------------------------------------------
# weighted sampling without replacement
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, k", CASES)
def test_inclusion_matches_exact_without_replacement(weights, k, device, inclusion):
    exact_inclusion, inclusion_z = inclusion
    n = len(weights)
    w = torch.tensor(weights).repeat(DRAWS, 1).to(device)
    ids = weighted_sample_triton(w, k, kernels.new_rng(2024, device))
    assert ids.shape == (DRAWS, k) and ids.dtype == torch.int64
    assert torch.all(ids.sort(1).values.diff(dim=1) > 0), "indices within a row must be distinct"
    probs = exact_inclusion(weights, k)
    assert abs(sum(probs) - k) < 1e-9
    z = inclusion_z(_inclusion_counts(ids, n), DRAWS, probs)
    assert z < Z_MAX, f"inclusion frequencies off by {z:.1f} sigma"
    # the first draw is a plain weighted draw: P(first = i) = w_i / Σw
    first = torch.bincount(ids[:, 0].cpu(), minlength=n)
    assert inclusion_z(first, DRAWS, [x / sum(weights) for x in weights]) < Z_MAX


@pytest.mark.parametrize("weights, k", CASES)
def test_inclusion_check_rejects_wrong_samplers(weights, k, inclusion):
    """The same check fails for with-replacement draws, plain top-k and the wrong race key w·U."""
    exact_inclusion, inclusion_z = inclusion
    n = len(weights)
    probs = exact_inclusion(weights, k)
    gen = torch.Generator().manual_seed(7)
    w = torch.tensor(weights).repeat(DRAWS, 1)
    with_replacement = torch.multinomial(w, k, replacement=True, generator=gen)
    plain_topk = w.topk(k, dim=1).indices
    wrong_race = (w * torch.rand(w.shape, generator=gen)).topk(k, dim=1).indices
    for name, ids in [("with replacement", with_replacement), ("top-k", plain_topk), ("w*U", wrong_race)]:
        z = inclusion_z(_inclusion_counts(ids, n), DRAWS, probs)
        assert z > Z_MAX, f"the check cannot tell {name} sampling from the right one (z = {z:.1f})"
    # and the reference and torch.multinomial (the STELLA call) pass it
    for ids in (
        weighted_sample_ref(w, k, kernels.new_rng(7)),
        torch.multinomial(w, k, replacement=False, generator=gen),
    ):
        assert inclusion_z(_inclusion_counts(ids, n), DRAWS, probs) < Z_MAX


def test_zero_weights_come_last_uniformly(device, inclusion):
    """Fewer positive weights than k: every positive item is drawn first, the rest uniformly among the zeros."""
    _, inclusion_z = inclusion
    w = torch.tensor([0.0, 3.0, 0.0, 0.0, 1.0, 0.0, float("nan"), -2.0]).repeat(DRAWS // 2, 1).to(device)
    ids = weighted_sample_triton(w, 4, kernels.new_rng(5, device))
    assert torch.all(ids[:, :2].sort(1).values == torch.tensor([1, 4], device=device))
    counts = _inclusion_counts(ids[:, 2:], 8)
    assert counts[1] == 0 and counts[4] == 0
    # 2 of the 6 zero-weight items (NaN and negatives count as 0) in each row
    zero_items = [0, 2, 3, 5, 6, 7]
    assert inclusion_z(counts[zero_items], DRAWS // 2, [2 / 6] * 6) < Z_MAX


@pytest.mark.parametrize("B, L, k", [(2, 784, 392), (1, 512, 256), (3, 37, 37), (4, 131, 1)])
def test_real_sizes_give_k_distinct_indices(B, L, k, device):
    w = torch.rand(B, L, generator=torch.Generator().manual_seed(L)).to(device)
    w[:, ::3] = 0  # STELLA: pruned entries are zero
    ids = weighted_sample_triton(w, k, kernels.new_rng(1, device))
    assert ids.shape == (B, k)
    assert torch.all((ids >= 0) & (ids < L))
    assert torch.all(ids.sort(1).values.diff(dim=1) > 0)
    positive = (w > 0).sum(1)
    # every drawn zero-weight item comes after all positive items of its row
    drawn_w = torch.gather(w, 1, ids)
    for b in range(B):
        n_pos = min(int(positive[b]), k)
        assert torch.all(drawn_w[b, :n_pos] > 0) and torch.all(drawn_w[b, n_pos:] == 0)


def test_weighted_sample_reproducible_and_dispatch(device):
    w = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)).to(device)
    rng = kernels.new_rng(99, device)
    a = weighted_sample_triton(w, 10, rng)
    assert torch.equal(a, weighted_sample_triton(w, 10, rng))
    assert torch.equal(kernels.weighted_sample(w, 10, rng), a)  # auto / triton path
    with kernels.use_backend("ref"):
        r1 = kernels.weighted_sample(w, 10, rng)
        assert torch.equal(r1, kernels.weighted_sample(w, 10, rng))  # the ref path is seeded from rng too
    assert r1.shape == (3, 10)


def test_sampling_errors():
    rng = kernels.new_rng(0)
    with pytest.raises(ValueError, match="k = 6"):
        weighted_sample_triton(torch.rand(2, 5), 6, rng)
    with pytest.raises(ValueError, match=r"\(2, 5, 1\)"):
        weighted_sample_triton(torch.rand(2, 5, 1), 2, rng)
    with pytest.raises(ValueError, match="rng"):
        weighted_sample_triton(torch.rand(2, 5), 2, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        prune_weights_triton(torch.rand(2, 4), torch.rand(2, 5), rng)


# ---------------------------------------------------------------------------------------------------------------
# deterministic top-k
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, L, k", [(2, 784, 392), (2, 512, 256), (3, 37, 5), (1, 1, 1), (5, 131, 131)])
def test_topk_matches_ref(B, L, k, device):
    s = torch.randn(B, L, generator=torch.Generator().manual_seed(L)).to(device)
    out = topk_indices_triton(s, k)
    assert torch.equal(out, topk_indices_ref(s, k))
    assert torch.equal(torch.gather(s, 1, out), s.topk(k, dim=1).values)


def test_topk_ties_nan_and_inf(device):
    s = torch.tensor(
        [[1.0, 3.0, 3.0, float("nan"), -float("inf"), 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=device
    )
    out = topk_indices_triton(s, 5)
    expected = torch.tensor([[1, 2, 5, 0, 6], [0, 1, 2, 3, 4]], device=device)  # ties -> lower index, NaN last
    assert torch.equal(out, expected)
    assert torch.equal(topk_indices_ref(s, 5), expected)
    mask = kernels.topk_mask(s, 3)
    assert mask.dtype == torch.bool and mask.sum().item() == 6 and mask[0, [1, 2, 5]].all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_at_stella_batch(inclusion):
    """Compiled and autotuned: 96 rows (current + replay) x 784 -> 392, plus the exact-inclusion check."""
    exact_inclusion, inclusion_z = inclusion
    w = torch.rand(96, 784, device="cuda")
    ids = kernels.weighted_sample(w, 392, kernels.new_rng(0, "cuda"))
    assert torch.all(ids.sort(1).values.diff(dim=1) > 0)
    weights, k = CASES[1]
    ids = kernels.weighted_sample(torch.tensor(weights, device="cuda").repeat(DRAWS, 1), k, kernels.new_rng(1, "cuda"))
    assert inclusion_z(_inclusion_counts(ids, len(weights)), DRAWS, exact_inclusion(weights, k)) < Z_MAX
