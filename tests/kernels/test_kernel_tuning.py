"""How GPU launchers pick a config: a short candidate list, tuned once per machine and kept on disk so that every
process (ranks, resumed runs) launches the same one, or the first candidate with tuning "fixed" (tests).

The benchmark itself needs a GPU; here it is a stand-in function, and the launches are recorded, not run.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import _utils

ai = importlib.import_module("kernels.attention_importance")
ws = importlib.import_module("kernels.weighted_sample")
ROOT = Path(__file__).resolve().parents[2]


def _launch_of(fn, *args, **kwargs) -> tuple[_utils.Launcher, tuple, dict]:
    """(launcher, args, constexprs) of the first launch ``fn`` makes, recorded instead of run."""
    calls = []
    original = _utils.Launcher.__call__
    _utils.Launcher.__call__ = lambda self, grid, a, c, interp: calls.append((self, tuple(a), dict(c)))
    try:
        fn(*args, **kwargs)
    finally:
        _utils.Launcher.__call__ = original
    return calls[0]


def _importance_launch(dtype=torch.bfloat16):
    q, k = torch.randn(2, 12, 512, 64, dtype=dtype), torch.randn(2, 12, 784, 64, dtype=dtype)
    return _launch_of(ai.attention_importance_triton, q, k, 0.125, 0.4)


def test_importance_candidates_are_few_and_per_dtype() -> None:
    """24 tile x warps x stages configs per pass compiled one by one made minutes of compiling on first use."""
    for dtype, most in ((torch.bfloat16, 4), (torch.float32, 3)):
        launcher, args, const = _importance_launch(dtype)
        candidates = launcher.configs_for(args, const)
        assert 1 <= len(candidates) <= most
        assert len({_utils.config_name(c) for c in candidates}) == len(candidates)
    assert ai._ROW_STATS_SPACE["16bit"] != ai._ROW_STATS_SPACE["fp32"]


def test_fixed_tuning_takes_the_first_candidate_without_benchmarking() -> None:
    launcher, args, const = _importance_launch()

    def bench(config):
        raise AssertionError("tuning 'fixed' must not benchmark")

    with _utils.use_tuning("fixed"):
        assert launcher.choose(args, const, bench) is launcher.configs_for(args, const)[0]
    with pytest.raises(ValueError, match="tuning 'often'"):
        _utils.set_tuning("often")


def test_tuned_once_then_read_back_by_a_new_process(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTAV_TUNING_DIR", str(tmp_path))
    launcher, args, const = _importance_launch()
    candidates = launcher.configs_for(args, const)
    timings = {_utils.config_name(c): t for c, t in zip(candidates, (3.0, 1.0, 2.0, 4.0), strict=False)}
    benched: list[str] = []

    def bench(config):
        benched.append(_utils.config_name(config))
        return timings[_utils.config_name(config)]

    with _utils.use_tuning("cache"):
        first = launcher.choose(args, const, bench)
        assert first is candidates[1] and len(benched) == len(candidates)
        assert launcher.choose(args, const, bench) is first and len(benched) == len(candidates)  # remembered
        fresh = _utils.Launcher(launcher.kernel, launcher._configs, launcher._key)  # another process's launcher
        assert _utils.config_name(fresh.choose(args, const, bench)) == _utils.config_name(first)
    assert len(benched) == len(candidates), "a second process benchmarked again"
    saved = json.loads(next(tmp_path.glob("_row_stats_kernel-*.json")).read_text())
    assert [entry["config"] for entry in saved.values()] == [_utils.config_name(first)]


def test_tuning_key_tells_apart_what_compiles_differently() -> None:
    """weighted sampling and top-k share a kernel and sizes (L = 784, k = 392) but not their RANDOM constexpr."""
    w = torch.rand(4, 784)
    sample = _launch_of(ws.weighted_sample_triton, w, 392, _utils.new_rng(0))
    top = _launch_of(ws.topk_indices_triton, w, 392)
    assert sample[0] is top[0]
    assert sample[0].tuning_key(sample[1], sample[2]) != top[0].tuning_key(top[1], top[2])


_WORKER = """
import json, os, random, sys, time
import triton
from kernels import _utils
candidates = [triton.Config({"BLOCK": b}, num_warps=w) for b in (64, 128) for w in (4, 8)]
benched = []
def bench(config):
    benched.append(_utils.config_name(config))
    time.sleep(0.2)
    return random.Random(os.getpid() * 1000 + len(benched)).random()
chosen = _utils.tuned_config(_utils.tuning_dir() / "toy.json", "key", candidates, bench)
print(json.dumps({"chosen": _utils.config_name(chosen), "benched": len(benched)}))
"""


def test_concurrent_processes_agree_on_one_tuning(tmp_path) -> None:
    """Ranks starting together: one benchmarks (with timings of its own), the others wait and take its choice."""
    env = {**os.environ, "FASTAV_TUNING_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)
    ]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({r["chosen"] for r in results}) == 1, results
    assert sorted(r["benched"] for r in results) == [0, 0, 4], results
