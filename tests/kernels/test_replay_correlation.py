"""replay_correlation: Triton vs reference, the STELLA identity it encodes, errors, dispatch."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.replay_correlation import replay_correlation_ref, replay_correlation_triton

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

SCALE = 0.125

# (B, H, L, D): STELLA video and audio keys, primes, a single patch, D not a power of two
SHAPES = [(2, 12, 784, 64), (2, 12, 512, 64), (3, 5, 37, 24), (1, 1, 1, 8), (1, 7, 131, 33)]
DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-2, 1e-3)]


def _inputs(B, H, L, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    qp = torch.randn(B, H, D, generator=gen).to(device=device, dtype=dtype)
    qc = torch.randn(B, H, D, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
    cand = (torch.rand(B, L, generator=gen) < 0.5).to(device)
    return qp, qc, k, cand


@pytest.mark.parametrize("B, H, L, D", SHAPES)
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_matches_ref(B, H, L, D, dtype, rtol, atol, device, close):
    qp, qc, k, cand = _inputs(B, H, L, D, dtype, device, seed=L + D)
    out = replay_correlation_triton(qp, qc, k, SCALE, cand)
    assert out.shape == (B, L) and out.dtype == torch.float32
    close(out, replay_correlation_ref(qp, qc, k, SCALE, cand), rtol=rtol, atol=atol)
    assert torch.all(out[~cand] == 0)
    assert torch.all((out[cand] > 0) & (out[cand] < 1))


def test_equals_two_way_softmax_of_logits(device, close):
    """π = mean_h softmax([s_past, s_cur])_0 with s = <q̄, k>·scale, as STELLA computes it (docs/methods/stella.md)."""
    qp, qc, k, cand = _inputs(2, 3, 23, 16, torch.float32, device, seed=5)
    s_past = torch.einsum("bhd,bhld->bhl", qp, k) * SCALE
    s_cur = torch.einsum("bhd,bhld->bhl", qc, k) * SCALE
    pi = torch.stack([s_past, s_cur], dim=-1).softmax(-1)[..., 0].mean(1) * cand
    close(replay_correlation_triton(qp, qc, k, SCALE, cand), pi, rtol=1e-5, atol=1e-6)


def test_strided_inputs(device, close):
    qp, qc, k, cand = _inputs(2, 4, 40, 16, torch.float32, device, seed=9)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, L, H, D) memory
    q2 = torch.stack([qp, qc], dim=-1)  # q_past / q_cur as strided views
    out = replay_correlation_triton(q2[..., 0], q2[..., 1], k_t, SCALE, cand)
    close(out, replay_correlation_ref(qp, qc, k, SCALE, cand), rtol=1e-5, atol=1e-6)


def test_errors():
    qp, qc, k, cand = _inputs(2, 3, 10, 8, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match=r"\(2, 3, 7\).*\(2, 3, 8\)"):
        replay_correlation_triton(qp[..., :7], qc, k, SCALE, cand)
    with pytest.raises(ValueError, match=r"\(2, 10\).*\(2, 9\)"):
        replay_correlation_triton(qp, qc, k, SCALE, cand[:, :9])
    with pytest.raises(ValueError, match="bool"):
        replay_correlation_triton(qp, qc, k, SCALE, cand.float())


def test_public_api_dispatch(device):
    qp, qc, k, cand = _inputs(1, 2, 17, 8, torch.float32, device, seed=1)
    with kernels.use_backend("ref"):
        assert torch.equal(
            kernels.replay_correlation(qp, qc, k, SCALE, cand), replay_correlation_ref(qp, qc, k, SCALE, cand)
        )
    with kernels.use_backend("triton"):
        got = kernels.replay_correlation(qp, qc, k, SCALE, cand)
    assert torch.equal(got, replay_correlation_triton(qp, qc, k, SCALE, cand))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES)
def test_cuda_stella_base_batch(dtype, rtol, atol, close):
    qp, qc, k, cand = _inputs(48, 12, 784, 64, dtype, "cuda", seed=0)
    close(
        kernels.replay_correlation(qp, qc, k, SCALE, cand), replay_correlation_ref(qp, qc, k, SCALE, cand), rtol, atol
    )
