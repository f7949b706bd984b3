"""End-to-end pre-training runs through ``launch/pretrain.py`` in fresh processes (DeepSpeed on the CPU, gloo).

Each run starts its own process so the test process never holds a DeepSpeed process group.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import cpu_launch_env, free_port

from fastav.config import Config
from fastav.log import read_metrics
from fastav.models import build_pretrain_model, load_weights

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "pretrain.py"


def run(args: list[str], *, procs: int = 0, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """``python launch/pretrain.py ARGS`` (procs=0) or ``deepspeed --num_gpus PROCS launch/pretrain.py ARGS``."""
    if procs:
        launcher = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(procs),
            "--master_port",
            str(free_port()),
        ]
        cmd = [*launcher, str(SCRIPT), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", tag="train")}


@pytest.mark.slow
def test_single_process_bf16_zero2_run_resumes_exactly(tmp_path: Path) -> None:
    """Synthetic in-memory clips, bf16, ZeRO-2, 2-step accumulation, clipping; the resumed run crosses an epoch."""
    common = [
        "--recipe", "debug", "data.source=synthetic", "data.synthetic_clips=48",
        "train.precision=bf16", "distributed.zero_stage=2", "train.grad_accum=2", "train.grad_clip=1.0",
        "train.epochs=5", "train.max_steps=8", "train.log_every=1",
        "train.checkpoint_every=2", "train.keep_checkpoints=3",
    ]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run([*common, f"train.run_dir={full}"])
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000004", "step_00000006", "step_00000008"]  # keep_checkpoints=3 pruned step 2
    assert (full / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    run([*common, f"train.run_dir={resumed}", f"train.resume={full / 'checkpoints' / 'step_00000004'}"])
    before, after = losses(full), losses(resumed)
    assert sorted(after) == [5, 6, 7, 8]  # 6 batches / 2 per step = 3 steps per epoch: 7 and 8 are in epoch 2
    assert [after[s] for s in (5, 6, 7, 8)] == [before[s] for s in (5, 6, 7, 8)]
    cfg = Config.load(full / "config.json")
    model = build_pretrain_model(cfg)
    assert load_weights(model, full / "weights.safetensors").missing == []
    assert model.encoder.embed_a.proj.weight.dtype == torch.float32


@pytest.mark.slow
def test_debug_cavmae_loss_falls_and_retrieval_beats_chance(synth_dataset, tmp_path: Path) -> None:
    """A debug-size CAV-MAE (11+1 layout at width 64) on `python -m shards synth` data through fastav.data."""
    root, _, _ = synth_dataset
    run_dir = tmp_path / "cavmae"
    run(
        [
            "--recipe",
            "debug_cavmae",
            "--eval",
            f"data.root={root}",
            "data.num_threads=1",
            "train.lr=3e-4",
            "train.epochs=30",
            "train.log_every=13",
            f"train.run_dir={run_dir}",
        ]  # fmt: skip
    )
    train = read_metrics(run_dir / "metrics.jsonl", tag="train")
    first, last = train[0], train[-1]
    assert last["loss_mae_a"] < 0.9 * first["loss_mae_a"] and last["loss_mae_v"] < 0.9 * first["loss_mae_v"]
    assert last["loss_nce"] < first["loss_nce"] - 0.2
    (ev,) = read_metrics(run_dir / "metrics.jsonl", tag="eval")
    chance = 100 / ev["gallery"]  # R@1 in percent of a random ranking
    assert (ev["a2v/overall/r1"] + ev["v2a/overall/r1"]) / 2 >= 3 * chance, ev
    assert min(ev["a2v/overall/r10"], ev["v2a/overall/r10"]) >= 1.3 * 10 * chance, ev


@pytest.mark.slow
@pytest.mark.distributed
def test_debug_scratch_learns_the_correspondence_from_a_random_start(synth_dataset, tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2 launch/pretrain.py --recipe debug_scratch --eval` from random weights (issue 11): the
    InfoNCE falls well below ln(16), where the collapsed pooled features of `debug` stay, and retrieval beats chance."""
    root, _, _ = synth_dataset
    run_dir = tmp_path / "scratch"
    run(
        [
            "--recipe", "debug_scratch", "--eval", f"data.root={root}", "data.num_threads=1",
            "train.log_every=6", f"train.run_dir={run_dir}",
        ],
        procs=2,
    )  # fmt: skip
    train = read_metrics(run_dir / "metrics.jsonl", tag="train")
    assert max(r["loss_nce"] for r in train[-4:]) < 2.3, [r["loss_nce"] for r in train]  # ln(16) = 2.77
    (ev,) = read_metrics(run_dir / "metrics.jsonl", tag="eval")
    chance = 100 / ev["gallery"]  # R@1 in percent of a random ranking
    assert (ev["a2v/overall/r1"] + ev["v2a/overall/r1"]) / 2 >= 4 * chance, ev


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_two_cpu_processes_resume_step_for_step(synth_dataset, tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2 launch/pretrain.py --recipe debug` on synthetic shards (gloo): a run resumed from its
    step-4 checkpoint repeats steps 5-8 of the uninterrupted run exactly, across an epoch boundary."""
    root, _, _ = synth_dataset
    common = [
        "--recipe", "debug", f"data.root={root}", "data.num_threads=1",
        "train.max_steps=8", "train.log_every=1", "train.checkpoint_every=4",
    ]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run([*common, f"train.run_dir={full}"], procs=2)
    run([*common, f"train.run_dir={resumed}", f"train.resume={full / 'checkpoints' / 'step_00000004'}"], procs=2)
    before, after = losses(full), losses(resumed)
    assert sorted(before) == list(range(1, 9)) and sorted(after) == [5, 6, 7, 8]
    assert [after[s] for s in (5, 6, 7, 8)] == [before[s] for s in (5, 6, 7, 8)]
    meta = json.loads((full / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2
    epochs = {r["step"]: r["epoch"] for r in read_metrics(full / "metrics.jsonl", tag="train")}
    assert epochs[4] == 0 and epochs[8] == 1  # 6 batches per rank and epoch: the resumed steps cross into epoch 1
