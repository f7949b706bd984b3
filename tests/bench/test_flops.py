"""bench/flops.py counts every matrix product of a step: equal to torch's FLOP counter on real debug-size steps of
STELLA, DER++ and Finetune (forward and backward, replay rows joined), and the base-size figures the README quotes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import kernels
from fastav.config import load_config
from fastav.continual import build_method
from fastav.train.engine import DistInfo

ROOT = Path(__file__).resolve().parents[2]
CPU = DistInfo(0, 1, 0, torch.device("cpu"), "gloo")
B = 4


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"fastav_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


flops = _bench_module("flops")


@pytest.mark.parametrize("name", ["stella", "derpp", "finetune"])
def test_count_equals_torchs_flop_counter_on_a_real_step(name: str) -> None:
    cfg = load_config("debug", [f"method.name={name}", "method.memory_size=8", f"data.batch_size={B}"])
    method = build_method(cfg, CPU)
    d = cfg.data
    batch = {
        "video": torch.randn(B, d.num_frames, 3, d.frame_size, d.frame_size),
        "fbank": torch.randn(B, d.target_length, d.num_mel_bins),
    }
    # the math attention is made of bmm calls the counter sees (the CPU flash kernel is not counted); the kernels'
    # references are torch ops (the interpreted Triton kernels would not be)
    with kernels.use_backend("ref"), sdpa_kernel(SDPBackend.MATH):
        first = method(batch)
        first.loss.backward()
        method.after_step(batch, first)  # replay methods now draw as many replayed rows as current ones
        method.zero_grad()
        with FlopCounterMode(display=False) as counter:
            method(batch).loss.backward()
    count = flops.step_flops(cfg, name, B)
    assert count.total == counter.get_total_flops()
    assert count.rows == (B if name == "finetune" else 2 * B)


def test_base_size_counts_per_new_clip() -> None:
    cfg = load_config("stella_vggsound")
    stella = flops.step_flops(cfg, "stella")
    parts = stella.summary()["parts_per_clip"]
    nograd = sum(v for k, v in parts.items() if k.endswith("_nograd"))
    assert round(stella.per_clip / 1e9) == 871
    assert round(nograd / 1e9) == 311
    assert round((parts["avm_forward"] + parts["avm_backward"]) / 1e9) == 21
    assert round((parts["mae_forward"] + parts["mae_backward"] + parts["infonce"]) / 1e9) == 539
    assert round(flops.step_flops(cfg, "derpp").per_clip / 1e9) == 801
    assert round(flops.step_flops(cfg, "finetune").per_clip / 1e9) == 401
    assert round(flops.step_flops(load_config("debug"), "stella").per_clip / 1e6) == 200


def test_bf16_peaks_by_device_name() -> None:
    assert flops.bf16_peak_tflops("NVIDIA H200") == 989.4
    assert flops.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert flops.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.bf16_peak_tflops("cpu (2 cores, x86_64)") is None
