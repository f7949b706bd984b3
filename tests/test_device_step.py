"""A training step's device code on fake CUDA tensors: no copy between the host and the device, no read of a device
value, on a machine without a GPU (the ``DeviceSyncs`` recorder and ``fake_cuda`` of tests/conftest.py).

The loader's batch finish is checked in tests/data/test_device_finish.py and STELLA's selection path in
tests/kernels/test_patch_select.py; this file checks the recorder itself and the pre-training model's step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_recorder_sees_copies_and_reads_with_their_line(device_syncs, fake_cuda) -> None:
    host = torch.rand(5)
    with fake_cuda():
        x = torch.rand(5, device="cuda")
        with device_syncs() as rec:
            y = x + host.to("cuda")  # a host-to-device copy of a table made on the CPU
            z = torch.tensor([1.0, 2.0], device="cuda")  # a literal built on the host, then copied
            y.cpu()  # a device-to-host copy
            x[torch.arange(2)]  # host indices: ATen copies them to the device inside the op
            with pytest.raises(AssertionError, match=r"host read: aten._local_scalar_dense.default at tests/test_dev"):
                (y.sum() + z.sum()).item()  # a read of a device value: recorded, then impossible on fake tensors
    kinds = {what.split(":")[0] for what in rec.where}
    assert kinds == {"host-to-device copy", "device-to-host copy", "host tensor copied into a device op", "host read"}
    places = {place for counter in rec.where.values() for place in counter}
    assert all(place.startswith("tests/test_device_step.py:") for place in places), places
    assert len(places) == 5, places


def test_recorder_passes_device_only_code(device_syncs, fake_cuda) -> None:
    with fake_cuda():
        x = torch.rand(4, 10, device="cuda")
        with device_syncs() as rec:
            ids = torch.where(x > 0.5, x, 0.0).topk(3, dim=1).indices
            torch.gather(x, 1, ids).sum()
            (x * torch.tensor(0.5)).softmax(-1)  # a 0-dim host tensor is a scalar argument, not a copy
            x.to("cuda", dtype=torch.bfloat16)
    assert not rec.where, rec.report()


STEP = """
import json, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from conftest import DeviceSyncs, register_fake_accelerator
from fastav.config import load_config
from fastav.models import build_pretrain_model

recipe, device = sys.argv[1], sys.argv[2]
if device != "cuda":
    device = register_fake_accelerator()
cfg, d, out = load_config(recipe), load_config(recipe).data, {}
with FakeTensorMode(allow_non_fake_inputs=True):
    with torch.device(device):
        model = build_pretrain_model(cfg)
    fbank = torch.randn(4, d.target_length, d.num_mel_bins, device=device)
    video = torch.randn(4, d.num_frames, 3, d.frame_size, d.frame_size, device=device)
    sel_a = torch.randperm(model.grid.audio_tokens, device=device)[:40].expand(4, -1).contiguous()
    for name, sel in (("full", None), ("audio selection", sel_a)):
        with DeviceSyncs() as rec:
            loss = model(fbank, video, sel_a_BK=sel).loss
            if device != "cuda":
                loss.backward()
        out[name] = rec.report()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
out["loss_device"] = loss.device.type
out["grads_on_device"] = [len(grads), all(g.device.type == device for g in grads)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("recipe", ["debug", "debug_cavmae"], ids=["stella", "cavmae"])
def test_pretrain_step_copies_and_reads_nothing(recipe: str) -> None:
    """The model's forward on fake CUDA tensors, and forward + backward on a fake accelerator (the autograd engine
    cannot run a backward over "cuda" without a driver; tests/conftest.py ``register_fake_accelerator``), with and
    without an audio selection. Each in a subprocess: the fake accelerator cannot be unregistered."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    for device in ("cuda", "fakegpu"):
        proc = subprocess.run(
            [sys.executable, "-c", STEP, recipe, device], env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["full"] == "" and out["audio selection"] == "", f"{device}: {out}"
        assert out["loss_device"] == device
        count, on_device = out["grads_on_device"]
        assert on_device and (count > 0) == (device != "cuda"), out
