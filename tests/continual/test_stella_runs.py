"""A STELLA continual run through the `deepspeed` launcher on the CPU (2 processes, gloo), killed mid-task and resumed
with ``train.resume=auto``: the same loss at every step as the uninterrupted run, the same retrieval after each task,
and on every rank the same replay memory (clips, importance, pi, pooled queries, embeddings) and kernel rng."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import cpu_launch_env, free_port

from fastav.log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "continual.py"
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _command(root: Path, run_dir: Path, *extra: str) -> list[str]:
    port = str(free_port())
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port]
    return [
        *launcher, str(SCRIPT), "--recipe", "debug", f"data.root={root}", "data.num_threads=1",
        "method.name=stella", "method.memory_size=32", "continual.task_order=pulses,chimes",
        "continual.epochs_per_task=3", "model.kernels=ref", "train.log_every=1", "train.checkpoint_every=2",
        "train.keep_checkpoints=0", f"train.run_dir={run_dir}", *extra,
    ]  # fmt: skip


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir / "metrics.jsonl", tag="train")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: (r["loss"], r["loss_avm"], r["loss_der"]) for r in records}


def _evals(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir / "metrics.jsonl", tag="eval")]


def _rank_states(checkpoint: Path) -> list[dict]:
    return [torch.load(checkpoint / f"rank_{r:05d}.pt", weights_only=True)["method"] for r in range(2)]


def test_stella_killed_mid_task_resumes_like_the_uninterrupted_run(synth_dataset, tmp_path: Path) -> None:
    root, _, _ = synth_dataset
    full = tmp_path / "full"
    _run(_command(root, full))
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 13))  # 2 tasks x 3 epochs x 2 batches per rank
    assert all(der > 0 for step, (_, _, der) in reference.items() if step > 1)  # replay from the second step on

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_command(root, run_dir), cwd=ROOT, env=cpu_launch_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not latest.is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at in ("step_00000002", "step_00000004"), f"killed at {killed_at}, not inside the first task"

    _run([*_command(root, run_dir), "train.resume=auto"])
    assert _losses(run_dir) == reference
    assert _evals(run_dir) == _evals(full) and len(_evals(full)) == 2
    for step in ("step_00000006", "step_00000012"):  # the end of each task
        ours, theirs = _rank_states(run_dir / "checkpoints" / step), _rank_states(full / "checkpoints" / step)
        for rank in range(2):
            a, b = ours[rank]["memory"], theirs[rank]["memory"]
            assert a["seen"] == b["seen"] == int(step[-2:]) * 8
            assert set(a["store"]) >= {"video", "fbank", "imp_v", "imp_a", "pi_v", "pi_a", "q_a", "q_v", "pooled_a"}
            assert all(torch.equal(a["store"][k], b["store"][k]) for k in a["store"]), rank
            assert torch.equal(ours[rank]["kernel_rng"], theirs[rank]["kernel_rng"])
    final = _rank_states(run_dir / "checkpoints" / "step_00000012")
    assert not torch.equal(final[0]["memory"]["store"]["pi_v"], final[1]["memory"]["store"]["pi_v"])  # per rank
    assert float(final[0]["memory"]["store"]["pi_v"].max()) > 0
    assert (run_dir / "avm.safetensors").is_file() and (run_dir / "report.json").is_file()
