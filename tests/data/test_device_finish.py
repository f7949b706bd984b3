"""The loader's GPU side without a GPU: the device stage on fake CUDA tensors (no copy from the host, no read of a
device value), the decoder choice for frames NVDEC cannot take, and the data threads sized from the machine."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from fastav.config import DataConfig, load_config
from fastav.data import DataError, build_loader
from fastav.data.fbank import kaldi_fbank
from fastav.data.loader import MAX_LABELS, video_decoder


def test_kaldi_fbank_copies_nothing_to_the_device(device_syncs, fake_cuda) -> None:
    """The mel filters are made on the device and kept there: no host table copied in per batch."""
    with fake_cuda():
        wave = torch.zeros(3, 41_000, device="cuda")
        lengths = torch.full((3,), 41_000, device="cuda", dtype=torch.long)
        for _ in range(2):  # the first batch builds the filters, the second reuses them: neither copies
            with device_syncs() as rec:
                fbank = kaldi_fbank(wave, lengths, num_mel_bins=64, target_length=256)
            assert not rec.where, rec.report()
            assert fbank.device.type == "cuda" and fbank.shape == (3, 256, 64)


def _fake_dali_batch(cfg, batch: int, frames: int) -> dict[str, torch.Tensor]:
    """What the DALI iterator hands over on a GPU: every output already on the device (see AVLoader._build)."""
    d = cfg.data
    n = (d.target_length - 1) * 160 + 400
    return {
        "video": torch.randn(batch, frames, 3, d.frame_size, d.frame_size, device="cuda"),
        "wave": torch.randn(batch, n, device="cuda"),
        "length": torch.full((batch, 1), n, device="cuda", dtype=torch.int64),
        "wave_mean": torch.zeros(batch, 1, device="cuda"),
        "aug": torch.rand(batch, 8, device="cuda"),
        "labels": torch.zeros(batch, MAX_LABELS, device="cuda", dtype=torch.int32),
        "task": torch.zeros(batch, 1, device="cuda", dtype=torch.int32),
        "index": torch.zeros(batch, 1, device="cuda", dtype=torch.int64),
        "valid": torch.ones(batch, 1, device="cuda", dtype=torch.uint8),
    }


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_finish_copies_and_reads_nothing(synth_dataset, device_syncs, fake_cuda, train: bool) -> None:
    """AVLoader._finish (mixup, fbank, SpecAugment, noise and roll, labels) on fake CUDA outputs of DALI. A fake
    device cannot create a CUDA generator, so the loader's own (CPU) one seeds the noise draw, as on the CPU path."""
    root, _, _ = synth_dataset
    over = ["data.mixup=0.5", "data.specaug_freq=8", "data.specaug_time=20", "data.label_smoothing=0.1"]
    cfg = load_config("debug", [f"data.root={root}", "data.batch_size=6", "data.dtype=bfloat16", *over])
    loader = build_loader(cfg, "train", train=train, device=torch.device("cpu"))
    loader.device = torch.device("cuda", 0)
    with fake_cuda():
        out = _fake_dali_batch(cfg, loader.batch_size, loader.num_frames)
        for number in range(2):
            with device_syncs() as rec:
                batch = loader._finish(out, number)
            assert not rec.where, rec.report()
    assert all(t.device.type == "cuda" for t in batch.values())
    B = loader.batch_size
    assert batch["video"].dtype == torch.bfloat16 and batch["fbank"].shape == (B, 256, 64)
    assert batch["labels"].shape == (B, loader.num_classes) and batch["valid"].dtype == torch.bool


def test_frames_below_nvdec_minimum_decode_on_the_cpu_said_once(caplog) -> None:
    logger = logging.getLogger("fastav.data")
    logger.addHandler(caplog.handler)
    try:
        assert video_decoder("vp9", 96, gpu=True) == "cpu"  # the synthetic default: NVDEC refuses VP9 < 128 px
        assert video_decoder("vp9", 96, gpu=True) == "cpu"
    finally:
        logger.removeHandler(caplog.handler)
    said = [r.getMessage() for r in caplog.records if "NVDEC" in r.getMessage()]
    assert len(said) == 1 and "vp9 frames of 96 px" in said[0] and "on the CPU" in said[0]
    assert video_decoder("vp9", 128, gpu=True) == "mixed"
    assert video_decoder("vp9", 256, gpu=True) == "mixed"
    assert video_decoder("h264", 64, gpu=True) == "mixed"
    assert video_decoder("vp9", 96, gpu=False) == "cpu"
    with pytest.raises(DataError, match="h264 frames of 32 px are below NVDEC's minimum of 48 px"):
        video_decoder("h264", 32, gpu=True)


def test_data_threads_default_to_the_cores_per_local_process(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert DataConfig().num_threads == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert DataConfig().num_threads == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert DataConfig().num_threads == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert DataConfig().num_threads == 4
    assert load_config("debug", ["data.num_threads=3"]).data.num_threads == 3
