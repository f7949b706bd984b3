"""MLA's alternating steps through the real engine (DeepSpeed on the CPU, in a fresh process): each step changes
its own encoder and the shared head only, also in the second batch, when both encoders hold momentum, and under
ZeRO-2 in bf16, where every parameter group is a flat partition whose gradient always exists."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import cpu_launch_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import torch
from fastav.config import load_config
from fastav.data import build_loader
from fastav.finetune import build_method
from fastav.train.engine import Engine, init_distributed

cfg = load_config("debug_mla", ["data.source=synthetic", "data.synthetic_clips=16", "data.batch_size=4",
                                "model.embed_dim=32", "model.num_heads=2", "method.mla.encoders=backbone",
                                "train.lr=0.05", "train.weight_decay=0.01", *sys.argv[1:]])
dist = init_distributed(cfg)
method = build_method(cfg)
method.batches_per_epoch = 4
engine = Engine(method, cfg, dist=dist)
model = engine.module.model
parts = ("encoders.audio", "encoders.video", "heads.shared")

def snapshot():
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}

record = []
inner = engine.step

def step(groups=None):
    before = snapshot()
    inner(groups)
    after = snapshot()
    changed = {p for p in parts for k in before if k.startswith(p) and not torch.equal(before[k], after[k])}
    record.append({"groups": sorted(groups or []), "changed": sorted(changed)})

engine.step = step
for i, batch in zip(range(2), build_loader(cfg, "train")):
    engine.train_step(batch, epoch_progress=(i + 1) / 4)
print("RESULT " + json.dumps({"steps": record, "global_step": engine.global_step,
                              "P_is_identity": bool(torch.equal(engine.module.projector.P, torch.eye(32)))}))
"""


@pytest.mark.parametrize(
    "overrides",
    [["distributed.zero_stage=0", "train.precision=fp32"], ["distributed.zero_stage=2", "train.precision=bf16"]],
    ids=["zero0-fp32", "zero2-bf16"],
)
def test_each_alternating_step_changes_only_its_encoder_and_the_head(overrides: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *overrides],
        cwd=ROOT,
        env=cpu_launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["global_step"] == 4  # two optimizer steps per batch
    assert not result["P_is_identity"]  # the projector was updated after the first step
    expected = [
        {"groups": ["audio", "head"], "changed": ["encoders.audio", "heads.shared"]},
        {"groups": ["head", "video"], "changed": ["encoders.video", "heads.shared"]},
    ] * 2
    assert result["steps"] == expected
