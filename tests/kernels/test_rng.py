"""Counter-based randomness shared by the kernels and their references.

The references draw from a Philox4x32-10 written in torch ops (``_utils.philox_uniform_ref``). It is checked
against the Random123 known-answer vectors and, bit for bit, against ``tl.philox`` inside a Triton kernel; the
sampling references are then checked to select exactly what their kernels select for the same ``rng``.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import _utils
from kernels.chunk_select import chunk_select_ref, chunk_select_triton
from kernels.weighted_sample import (
    OP_SAMPLE,
    bernoulli_prune_ref,
    bernoulli_prune_triton,
    prune_weights_ref,
    prune_weights_triton,
    weighted_sample_ref,
    weighted_sample_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

M32 = 0xFFFFFFFF


def _fresh_rng(device: str) -> torch.Tensor:
    """A random [seed, offset] over the whole accepted range (offsets past 2**32 use both counter words)."""
    seed, offset = (int(torch.randint(0, high, ())) for high in (2**63 - 1, 2**62))
    return kernels.new_rng(seed, device, offset=offset)


# ---------------------------------------------------------------------------------------------------------------
# Philox itself
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, counter, expected",
    [  # Random123 known-answer tests for philox4x32-10 (kat_vectors)
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32, M32), (M32, M32, M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0xA4093822, 0x299F31D0),
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_ref_known_answers(key, counter, expected):
    seed = key[0] | (key[1] << 32)
    seed = torch.tensor(seed - 2**64 if seed >= 2**63 else seed)  # the int64 whose two words are the key
    out = _utils.philox_ref(seed, *(torch.tensor([c], dtype=torch.int64) for c in counter))
    assert tuple(int(v) & M32 for v in out) == expected


@triton.jit
def _uniform_kernel(RNG, CTR, U0, U1, N, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    u0, u1 = _utils.philox_uniform(RNG, tl.load(CTR + offs, mask=mask, other=0), STREAM)
    tl.store(U0 + offs, u0, mask=mask)
    tl.store(U1 + offs, u1, mask=mask)


@pytest.mark.parametrize("stream", [0, 1, 37, 2**31 - 1])
def test_reference_uniforms_are_the_kernels_bit_for_bit(stream, device):
    n = 3001  # odd: a partial last block
    counter = torch.cat([torch.arange(1000), torch.randint(0, 2**62, (n - 1000,))]).to(device)
    for rng in (kernels.new_rng(0, device), _fresh_rng(device), _fresh_rng(device)):
        u0, u1 = torch.empty(n, device=device), torch.empty(n, device=device)
        _uniform_kernel[(triton.cdiv(n, 1024),)](rng, counter, u0, u1, n, STREAM=stream, BLOCK=1024)
        r0, r1 = _utils.philox_uniform_ref(rng, counter, stream)
        assert torch.equal(u0, r0) and torch.equal(u1, r1)
        assert float(r0.min()) > 0 and float(r0.max()) < 1


def test_reference_uniforms_are_uniform_and_independent():
    rng = _fresh_rng("cpu")
    u0, u1 = _utils.philox_uniform_ref(rng, torch.arange(200_000), 5)
    for u in (u0, u1):
        counts = torch.histc(u, bins=20, min=0, max=1)
        expected = u.numel() / 20
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 60, f"chi2 {chi2:.1f} with 19 degrees of freedom"  # p < 1e-5 under uniformity
    assert abs(float(torch.corrcoef(torch.stack([u0, u1]))[0, 1])) < 0.015  # 5 sigma at n = 2e5
    other_stream, _ = _utils.philox_uniform_ref(rng, torch.arange(200_000), 6)
    assert abs(float(torch.corrcoef(torch.stack([u0, other_stream]))[0, 1])) < 0.015


def test_uniform_ref_checks_its_arguments():
    with pytest.raises(ValueError, match="rng must be an int64"):
        _utils.philox_uniform_ref(torch.zeros(2), torch.arange(3), 0)
    with pytest.raises(ValueError, match="stream id"):
        _utils.philox_uniform_ref(kernels.new_rng(0), torch.arange(3), -1)


# ---------------------------------------------------------------------------------------------------------------
# the references draw what the kernels draw
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, L", [(48, 784), (48, 512), (3, 97), (1, 13)])
def test_pruning_ref_equals_kernel(B, L, device):
    rng = _fresh_rng(device)
    pi = torch.rand(B, L, device=device)
    w = torch.rand(B, L, device=device)
    assert torch.equal(bernoulli_prune_ref(pi, rng, stream=2), bernoulli_prune_triton(pi, rng, stream=2))
    kept_r, pruned_r = prune_weights_ref(w, pi, rng, stream=4)
    kept_t, pruned_t = prune_weights_triton(w, pi, rng, stream=4)
    assert torch.equal(pruned_r, pruned_t) and torch.equal(kept_r, kept_t)


@pytest.mark.parametrize("B, L, k", [(8, 784, 392), (5, 97, 31), (1, 13, 13), (4, 64, 1)])
def test_weighted_sample_ref_equals_kernel(B, L, k, device):
    """Same draws, same order; only keys within float rounding of each other may come out swapped."""
    rng = _fresh_rng(device)
    w = torch.rand(B, L, device=device).softmax(-1)
    w[0, : L // 3] = 0.0  # a zero tier too
    ids_r = weighted_sample_ref(w, k, rng, stream=3)
    ids_t = weighted_sample_triton(w, k, rng, stream=3)
    u, _ = _utils.philox_uniform_ref(rng, _utils.flat_counter(w.shape, w.device), _utils.stream_id(3, OP_SAMPLE))
    keys = _utils.gumbel_keys_ref(w, u)
    torch.testing.assert_close(keys.gather(1, ids_t), keys.gather(1, ids_r), rtol=1e-5, atol=1e-5)
    assert (ids_r == ids_t).all(1).float().mean() >= 0.75


@pytest.mark.parametrize("B, L, k, chunk_times, freq", [(24, 512, 256, 4, 8), (5, 3 * 7 * 2, 17, 3, 2)])
def test_chunk_select_ref_equals_kernel(B, L, k, chunk_times, freq, device):
    rng = _fresh_rng(device)
    imp = torch.rand(B, L, device=device)
    pruned = torch.rand(B, L, device=device) < 0.3
    pruned[0] = True  # deficit row
    ids_r, keep_r = chunk_select_ref(imp, pruned, k, rng, chunk_times=chunk_times, freq_patches=freq, stream=1)
    ids_t, keep_t = chunk_select_triton(imp, pruned, k, rng, chunk_times=chunk_times, freq_patches=freq, stream=1)
    assert torch.equal(ids_r, ids_t) and torch.equal(keep_r, keep_t)


def test_stella_selection_is_the_same_on_both_backends(device):
    """select_video / select_audio at STELLA sizes (current + replay rows): the same patches either way."""
    B = 6
    rng = _fresh_rng(device)
    imp_v, imp_a = torch.rand(B, 784, device=device).softmax(-1), torch.rand(B, 512, device=device).softmax(-1)
    pi_v = torch.rand(B, 784, device=device) * kernels.topk_mask(imp_v, 392)
    pi_a = torch.rand(B, 512, device=device) * kernels.topk_mask(imp_a, 256)
    out = {}
    for backend in ("ref", "triton"):
        with kernels.use_backend(backend):
            out[backend] = (kernels.select_video(imp_v, pi_v, 392, rng), kernels.select_audio(imp_a, pi_a, 256, rng))
    assert torch.equal(out["ref"][1], out["triton"][1])
    same_rows = (out["ref"][0] == out["triton"][0]).all(1)
    assert same_rows.float().mean() >= 5 / 6  # video keys may tie within rounding; audio chunk keys do not
