"""gather_video_patches / gather_audio_patches: bit-exact against patchify-then-gather, canonical orders."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.patch_gather import (
    gather_audio_patches_ref,
    gather_audio_patches_triton,
    gather_video_patches_ref,
    gather_video_patches_triton,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _ids(B, n_patches, k, gen, dtype=torch.int64):
    return torch.stack([torch.randperm(n_patches, generator=gen)[:k] for _ in range(B)]).to(dtype)


@pytest.mark.parametrize(
    "B, T, C, H, W, k, patch",
    [
        (2, 4, 3, 224, 224, 392, 16),  # STELLA video: 784 patches, keep 392
        (1, 1, 3, 224, 224, 49, 16),  # CAV-MAE: one frame
        (3, 2, 3, 48, 80, 7, 16),  # non-square, odd counts
        (1, 3, 1, 24, 40, 13, 8),  # one channel, patch 8
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_video_matches_ref(B, T, C, H, W, k, patch, dtype, device):
    gen = torch.Generator().manual_seed(H + W + k)
    video = torch.randn(B, T, C, H, W, generator=gen).to(device=device, dtype=dtype)
    ids = _ids(B, T * (H // patch) * (W // patch), k, gen).to(device)
    out = gather_video_patches_triton(video, ids, patch)
    assert out.shape == (B, k, patch * patch * C) and out.dtype == dtype
    assert torch.equal(out, gather_video_patches_ref(video, ids, patch))


@pytest.mark.parametrize("B, Tf, F, k", [(2, 1024, 128, 256), (1, 48, 32, 5), (3, 16, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_audio_matches_ref(B, Tf, F, k, dtype, device):
    gen = torch.Generator().manual_seed(Tf + k)
    fbank = torch.randn(B, Tf, F, generator=gen).to(device=device, dtype=dtype)
    ids = _ids(B, (Tf // 16) * (F // 16), k, gen, torch.int32).to(device)
    out = gather_audio_patches_triton(fbank, ids)
    assert out.shape == (B, k, 256) and out.dtype == dtype
    assert torch.equal(out, gather_audio_patches_ref(fbank, ids))


def test_canonical_orders_by_hand(device):
    """Video j = frame*Hp*Wp + row*Wp + col flattened (p, q, c); audio i = t*Fp + f flattened (dt, df)."""
    video = torch.randn(1, 2, 3, 32, 48).to(device)  # Hp = 2, Wp = 3
    j = 1 * 6 + 1 * 3 + 2  # frame 1, row 1, col 2
    got = gather_video_patches_triton(video, torch.tensor([[j]], device=device))[0, 0]
    block = video[0, 1, :, 16:32, 32:48]  # (c, p, q)
    assert torch.equal(got, block.permute(1, 2, 0).reshape(-1))
    assert got[(3 * 16 + 5) * 3 + 2] == video[0, 1, 2, 16 + 3, 32 + 5]

    fbank = torch.randn(1, 1024, 128).to(device)  # Tp = 64, Fp = 8
    i = 10 * 8 + 3  # time patch 10, frequency patch 3
    got = gather_audio_patches_triton(fbank, torch.tensor([[i]], device=device))[0, 0]
    assert torch.equal(got, fbank[0, 160:176, 48:64].reshape(-1))


def test_strided_inputs_and_int32_ids(device):
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 4, 32, 32, generator=gen).to(device).permute(0, 1, 3, 4, 2)  # channels-last storage
    video = video.contiguous().permute(0, 1, 4, 2, 3)  # (B, T, C, H, W) view, non-contiguous
    assert not video.is_contiguous()
    ids = _ids(2, 12, 5, gen, torch.int32).to(device)
    assert torch.equal(gather_video_patches_triton(video, ids), gather_video_patches_ref(video, ids))
    fbank = torch.randn(2, 128, 64, generator=gen).to(device).transpose(1, 2).contiguous().transpose(1, 2)
    ids = _ids(2, 32, 9, gen).to(device)
    assert torch.equal(gather_audio_patches_triton(fbank, ids), gather_audio_patches_ref(fbank, ids))


def test_out_of_range_ids_read_zero(device):
    fbank = torch.randn(1, 32, 32).to(device)
    out = gather_audio_patches_triton(fbank, torch.tensor([[0, 4, -1]], device=device))
    assert torch.equal(out[0, 0], fbank[0, :16, :16].reshape(-1))
    assert torch.all(out[0, 1:] == 0)


def test_errors_and_dispatch(device):
    video = torch.randn(1, 1, 3, 40, 32)
    with pytest.raises(ValueError, match="40x32"):
        gather_video_patches_triton(video, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"B = 2"):
        gather_audio_patches_triton(torch.randn(2, 32, 32), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="int32 or int64"):
        gather_audio_patches_triton(torch.randn(1, 32, 32), torch.zeros(1, 2))
    fbank = torch.randn(2, 64, 32).to(device)
    ids = torch.tensor([[0, 7], [3, 1]], device=device)
    with kernels.use_backend("ref"):
        ref = kernels.gather_audio_patches(fbank, ids)
    assert torch.equal(kernels.gather_audio_patches(fbank, ids), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gather_stella_batch():
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(96, 4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    ids = _ids(96, 784, 392, gen).cuda()
    assert torch.equal(kernels.gather_video_patches(video, ids), gather_video_patches_ref(video, ids))
    fbank = torch.randn(96, 1024, 128, device="cuda")
    ids = _ids(96, 512, 256, gen).cuda()
    assert torch.equal(kernels.gather_audio_patches(fbank, ids), gather_audio_patches_ref(fbank, ids))
