"""GPU paths of the data pipeline: NVDEC decode (VP9 and H.264) and device post-processing, against the CPU path."""

from __future__ import annotations

import pytest
import torch

from fastav.config import load_config
from fastav.data import build_loader

pytestmark = pytest.mark.gpu


def _cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _eval_batches(cfg, device):
    out = {}
    for b in build_loader(cfg, "test", device=device):
        for i in torch.nonzero(b["valid"]).view(-1).tolist():
            out[int(b["index"][i])] = (b["video"][i].float().cpu(), b["fbank"][i].float().cpu())
    return out


def _assert_same_batches(cfg) -> None:
    cpu = _eval_batches(cfg, torch.device("cpu"))
    gpu = _eval_batches(cfg, _cuda())
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        assert (cpu[key][0] - gpu[key][0]).abs().mean() < 0.02  # normalised units (~1/255 of pixel range)
        assert (cpu[key][1] - gpu[key][1]).abs().max() < 1e-3


def test_mixed_decode_matches_cpu_decode(synth_dataset) -> None:
    """96-px VP9 (the synthetic default) is below NVDEC's minimum: decoded on the CPU, the rest on the GPU."""
    root, _, _ = synth_dataset
    cfg = load_config("debug", [f"data.root={root}"])
    assert build_loader(cfg, "test", device=_cuda()).video_decode_device == "cpu"
    _assert_same_batches(cfg)


def test_nvdec_decodes_vp9_from_128_px(tmp_path) -> None:
    from shards.synth import SynthSpec, generate  # PyAV: imported here so that collection needs none

    spec = SynthSpec(categories=1, classes_per_category=2, clips_per_class=6, size=128, duration=2.0)
    generate(spec, tmp_path, workers=2, show_progress=False)
    cfg = load_config("debug", [f"data.root={tmp_path}"])
    assert build_loader(cfg, "test", device=_cuda()).video_decode_device == "mixed"
    _assert_same_batches(cfg)


def test_h264_shards_decode_on_the_gpu(tmp_path) -> None:
    from shards.synth import SynthSpec, generate  # PyAV: imported here so that collection needs none

    spec = SynthSpec(categories=1, classes_per_category=2, clips_per_class=6, codec="h264", size=64, duration=2.0)
    generate(spec, tmp_path, workers=2, show_progress=False)
    cfg = load_config("debug", [f"data.root={tmp_path}", "data.batch_size=4", "data.device=gpu"])
    batch = next(iter(build_loader(cfg, "train")))
    assert batch["video"].is_cuda and batch["video"].shape == (4, 4, 3, 64, 64)
    assert batch["video"].std() > 0.1


def test_training_batches_need_no_host_sync(synth_dataset) -> None:
    """The device stage of the loader (fbank, augmentation, labels) reads nothing back to the host."""
    root, _, _ = synth_dataset
    cfg = load_config("debug", [f"data.root={root}", "data.mixup=0.5", "data.specaug_time=20"])
    loader = build_loader(cfg, "train", device=torch.device("cuda", torch.cuda.current_device()))
    raw = loader._next_raw()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loader._finish(raw, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
