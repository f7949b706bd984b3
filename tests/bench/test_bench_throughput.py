"""``python bench/throughput.py`` (what ``make bench`` runs) with every row at debug size and ``--steps 2``: a table
first, then the JSON line last with every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_every_row_and_ends_with_the_json_line(tmp_path: Path) -> None:
    # a fresh process as `make bench` starts it: kernels on their CPU references, not under Triton's interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTAV_NO_PROGRESS"] = "1"
    command = [
        sys.executable, "bench/throughput.py", "--device", "cpu", "--steps", "2", "--repeats", "2",
        "--kernel-ops", "importance", "--clips", "24", "--size", "64", "--duration", "2", "--workers", "2",
        "--data-recipe", "debug", "--data-repeats", "2", "--data", str(tmp_path / "data"), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert not any(line.startswith("{") for line in lines[:-1])  # one JSON line, the last
    table = "\n".join(lines[:-1])
    for heading in ("train step", "official STELLA", "fastav STELLA", "end to end", "kernels", "summary"):
        assert heading in table
    assert (
        result["recipe"] == "debug"
        and result["data_recipe"] == "debug"
        and result["device"].startswith("cpu")
        and result["git_sha"]
    )
    train = result["train"]
    assert set(train["rows"]) == {"official", "stella", "derpp", "finetune"}
    for row in train["rows"].values():
        assert row["clips_per_s"]["n"] == 2 and row["clips_per_s"]["median"] > 0
        assert row["peak_mb"] == pytest.approx(row["resting_mb"] + row["step_mb"], abs=0.11)
        assert row["gflop_per_clip"] > 0 and row["mfu"] is None  # no bf16 peak is known for a CPU
    assert train["rows"]["official"]["precision"] == "fp32"
    assert train["rows"]["official"]["gflop_per_clip"] == train["rows"]["stella"]["gflop_per_clip"]
    assert train["ratios"]["stella_vs_official_clips_per_s"]["median"] > 0
    assert 0 < train["ratios"]["stella_vs_derpp_peak_memory"]
    assert train["flops"]["stella"]["per_clip"] > train["flops"]["finetune"]["per_clip"] > 0
    e2e = result["e2e"]
    assert e2e["clips_per_s"]["median"] > 0 and 0 <= e2e["wait_share"]["median"] <= 1 and e2e["vs_train"] > 0
    data = result["data"]
    assert data["ratio"] > 0 and data["ratio_repeats"]["n"] == 2
    assert set(data["rows"]) == {"fastav (DALI)", "reference (PyAV+torchaudio+PIL)"}
    assert data["shape"]["frame_size"] == 64 and data["shape"]["batch_size"] == 8  # the debug recipe's
    assert {r["provider"] for r in result["kernels"]["rows"]} == {"ref", "stella_naive"}
