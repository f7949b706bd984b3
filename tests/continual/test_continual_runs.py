"""Continual runs through the `deepspeed` launcher on the CPU (2 processes, gloo), on synthetic shards in which one
training clip, read only by rank 1, is corrupt.

- A run killed mid-task and resumed with ``train.resume=auto`` repeats the uninterrupted run: the same losses at
  every step (``metrics.jsonl`` holds each step once), the same retrieval after each task, and every rank ends with
  the same data position, skip counts and replay memory as in the uninterrupted run; only rank 1 skipped a clip.
- The same run as two nodes of one process each (``--no_ssh``, node ranks 0 and 1 on the loopback address) gives
  the same losses as one node with two processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import cpu_launch_env, free_port

from fastav.data.index import SampleStream, ShardIndex
from fastav.log import read_metrics
from shards.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "continual.py"
SEED = 2021
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _args(root: Path, run_dir: Path) -> list[str]:
    return [
        "--recipe", "debug", f"data.root={root}", "data.num_threads=1", "data.max_skip_fraction=0.5",
        "method.name=er", "method.memory_size=32", "continual.epochs_per_task=3",
        "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=0", f"train.seed={SEED}",
        f"train.run_dir={run_dir}",
    ]  # fmt: skip


def _launcher(*extra: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", *extra, str(SCRIPT)]


def run(args: list[str], *, timeout: int = 600) -> None:
    cmd = [*_launcher("--num_gpus", "2", "--master_port", str(free_port())), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def corrupt_dataset(synth_dataset, tmp_path_factory) -> tuple[Path, int]:
    """A copy of the synthetic dataset whose task0 training clip read by rank 1 in all three epochs has a broken mp4."""
    src, _, _ = synth_dataset
    root = tmp_path_factory.mktemp("corrupt") / "data"
    shutil.copytree(src, root)
    index = ShardIndex(root, load_manifest(root), "train", ["pulses"])
    n = len(index)
    per_epoch = []
    for epoch in range(3):
        stream = SampleStream(n, rank=1, world_size=2, seed=SEED, shuffle=True, drop_last=True)
        order = stream._order(epoch)
        per_epoch.append(set(order[1::2][:16].tolist()))  # the 16 positions rank 1's two batches of 8 start with
    sample = min(per_epoch[0] & per_epoch[1] & per_epoch[2])
    offset, _ = index.locs[sample][0]  # the mp4 member
    with open(index.tars[index.shard_of[sample]], "r+b") as f:
        f.seek(int(offset) + 4)
        f.write(b"xxxx")  # no 'ftyp' box: the loader refuses the sample and skips it
    return root, sample


@pytest.fixture(scope="module")
def reference_run(corrupt_dataset, tmp_path_factory) -> Path:
    root, _ = corrupt_dataset
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(_args(root, run_dir))
    return run_dir


def _losses(run_dir: Path) -> dict[int, list[float]]:
    """Each step's loss on rank 0 and on rank 1."""
    records = read_metrics(run_dir / "metrics.jsonl", tag="train")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss_by_rank"] for r in records}


def _rank_states(checkpoint: Path) -> list[dict]:
    return [torch.load(checkpoint / f"rank_{r:05d}.pt", weights_only=True) for r in range(2)]


def test_kill_and_resume_repeats_the_run_on_every_rank(corrupt_dataset, reference_run, tmp_path: Path) -> None:
    root, _ = corrupt_dataset
    full = reference_run
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 19))  # 3 tasks x 3 epochs x 2 batches per rank
    assert all(len(losses) == 2 for losses in reference.values())
    assert sum(a != b for a, b in reference.values()) >= 17  # the ranks train on different clips
    mid_task0 = _rank_states(full / "checkpoints" / "step_00000004")
    assert [s["data"]["skipped"] for s in mid_task0] == [0, 1]  # only rank 1 met the corrupt clip
    assert mid_task0[0]["data"]["stream"] != mid_task0[1]["data"]["stream"]  # rank 1 read one clip more

    run_dir = tmp_path / "killed"
    cmd = [*_launcher("--num_gpus", "2", "--master_port", str(free_port())), *_args(root, run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000004"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # inside task0's last epoch, rank 1 past its skip, the memory full
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at == "step_00000004", f"killed too late ({killed_at}); the test wants a mid-task0 checkpoint"
    resumed_from = _rank_states(run_dir / "checkpoints" / killed_at)
    assert [s["data"] for s in resumed_from] == [s["data"] for s in mid_task0]

    run([*_args(root, run_dir), "train.resume=auto"])
    assert _losses(run_dir) == reference  # every step once, both ranks' losses equal to the uninterrupted run's
    evals = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir / "metrics.jsonl", tag="eval")]
    ref_evals = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(full / "metrics.jsonl", tag="eval")]
    assert evals == ref_evals and len(evals) == 3

    for step in ("step_00000006", "step_00000018"):  # the end of task0, and of the run
        ours, theirs = _rank_states(run_dir / "checkpoints" / step), _rank_states(full / "checkpoints" / step)
        for rank in range(2):
            a, b = ours[rank]["method"]["memory"], theirs[rank]["method"]["memory"]
            assert a["seen"] == b["seen"] and all(torch.equal(a["store"][k], b["store"][k]) for k in a["store"])
    final = _rank_states(run_dir / "checkpoints" / "step_00000018")
    assert final[0]["method"]["memory"]["seen"] == 18 * 8  # every clip a rank trained on was offered
    a0, a1 = (final[r]["method"]["memory"]["store"]["fbank"] for r in range(2))
    assert not torch.equal(a0, a1)  # one memory per rank


def test_two_nodes_on_one_machine_match_one_node(corrupt_dataset, reference_run, tmp_path: Path) -> None:
    root, _ = corrupt_dataset
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir = tmp_path / "two-nodes"
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [*_launcher("--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                          "--master_addr", "127.0.0.1", "--master_port", port), *_args(root, run_dir)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cpu_launch_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    assert _losses(run_dir) == _losses(reference_run)
