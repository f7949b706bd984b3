"""The trainer over a method it does not know: extra loss terms, the after_step hook, the non-finite-loss skip and the
stop after too many in a row. The toy method lives in tests/train/toy_run.py and runs in a fresh process (DeepSpeed on
the CPU, one process) so the test process never holds a process group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launching import cpu_launch_env

from fastav.log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "tests" / "train" / "toy_run.py"


def toy(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "toy.json"
    cmd = [sys.executable, str(TOY), str(out), *args, f"train.run_dir={tmp_path / 'run'}", "train.log_every=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=300)
    assert out.is_file(), done.stderr[-4000:]
    return done, json.loads(out.read_text())


def test_method_with_extra_term_and_after_step_trains_through_the_engine(tmp_path: Path) -> None:
    done, rec = toy(tmp_path, "train.max_steps=6", "train.epochs=5", "train.lr=0.05")
    assert done.returncode == 0, done.stderr[-4000:]
    assert rec["after_step"] == rec["forward_calls"] == 6  # the hook ran once per step, after the step
    steps = [r["opt_step"] for r in rec["records"]]
    assert steps == [1, 2, 3, 4, 5, 6]  # after_step sees the optimizer step already taken
    weights = [r["weight_sum"] for r in rec["records"]]
    assert len(set(weights)) == 6  # every step moved the weights
    train = read_metrics(tmp_path / "run" / "metrics.jsonl", tag="train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for r in train:
        assert abs(r["loss"] - (r["main"] + r["extra"])) < 1e-5 and r["extra"] > 0 and r["bad_steps"] == 0
    assert (tmp_path / "run" / "weights.safetensors").is_file()


def test_non_finite_loss_is_skipped_on_the_device_and_counted(tmp_path: Path) -> None:
    done, rec = toy(tmp_path, "--nan-steps", "3", "train.max_steps=5", "train.epochs=5", "train.lr=0.05")
    assert done.returncode == 0, done.stderr[-4000:]
    weights = [r["weight_sum"] for r in rec["records"]]
    steps = [r["opt_step"] for r in rec["records"]]
    assert weights[2] == weights[1] and weights[3] != weights[2]  # step 3 changed nothing, step 4 trained again
    assert steps == [1, 2, 2, 3, 4]  # the skipped step left the optimizer's moments and step count alone
    train = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl", tag="train")}
    assert [train[s]["bad_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert "loss" not in train[3] and train[3]["finite_steps"] == 0  # a window of only the skipped step: no terms
    assert all(train[s]["loss"] > 0 and train[s]["finite_steps"] == 1 for s in (1, 2, 4, 5))


def test_run_stops_after_too_many_non_finite_steps_in_a_row(tmp_path: Path) -> None:
    nan = ",".join(str(s) for s in range(3, 20))
    done, rec = toy(tmp_path, "--nan-steps", nan, "train.max_bad_steps=4", "train.max_steps=30", "train.epochs=10")
    assert done.returncode == 1
    assert "the loss was NaN or infinite for 4 steps in a row (train.max_bad_steps=4)" in done.stderr
    assert rec["forward_calls"] == 6  # stopped at the logging step that saw the 4th skip in a row
    assert len({r["weight_sum"] for r in rec["records"][1:]}) == 1  # nothing moved after step 2
