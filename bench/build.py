"""Shard-builder throughput: clips/s of ``python -m shards build`` from real H.264 + AAC sources, per worker count.

Generates ``--clips`` source videos once (cached under ``--cache``: 128x96 H.264 + AAC 48 kHz stereo, 25 fps,
``--duration`` seconds, two classes), then runs one full build per worker count into a fresh directory as a
subprocess and reports its wall time, clips/s, the CPU seconds its process tree used (the builder, the
forkserver and the workers, sampled from /proc every 50 ms), the average number of cores that tree kept busy,
and the busy cores of the whole machine over the same time (other tenants included), so that a speed-up below
the worker count can be told apart from a machine shared with other work. Prints a table, then one JSON line.

    python bench/build.py --clips 200 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.sample_media import MediaSpec, write_media  # noqa: E402


def _write(args: tuple[str, int, float]) -> str:
    path, seed, duration = args
    write_media(path, MediaSpec(video="h264", audio="aac", width=128, height=96, duration=duration, seed=seed))
    return path


def make_sources(root: Path, clips: int, duration: float) -> Path:
    """``clips`` sources in root/class_a and root/class_b (kept between runs)."""
    jobs = []
    for i in range(clips):
        path = root / ("class_a" if i % 2 else "class_b") / f"clip{i:04d}.mp4"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((str(path), i, duration))
    if jobs:
        with ProcessPoolExecutor() as pool:
            list(pool.map(_write, jobs, chunksize=8))
    return root


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int, seen: dict[int, float]) -> None:
    """Update ``seen`` (pid -> CPU seconds) with every live process descending from ``root``."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    for pid in tree & stats.keys():
        seen[pid] = max(seen.get(pid, 0.0), stats[pid][1])


def _machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, all processes)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_build(src: Path, out: Path, workers: int, args: argparse.Namespace) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "shards",
        "build",
        "--input",
        str(src),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--size",
        str(args.size),
        "--fps",
        "8",
        "--duration",
        str(args.duration),
        "--shard-size",
        "64",
        "--quiet",
    ]
    cpu: dict[int, float] = {}
    machine0, start = _machine_busy(), time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FASTAV_NO_PROGRESS": "1"},
    )
    while proc.poll() is None:
        _tree_cpu(proc.pid, cpu)
        time.sleep(0.05)
    wall = time.monotonic() - start
    machine = _machine_busy() - machine0
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"build with {workers} workers failed ({proc.returncode}):\n{stderr}")
    manifest = json.loads((out / "manifest.json").read_text())
    built = manifest["counts"]["train"] + manifest["counts"]["test"]
    used = sum(cpu.values())
    return {
        "workers": workers,
        "clips": built,
        "wall_s": round(wall, 2),
        "clips_per_s": round(built / wall, 2),
        "cpu_s": round(used, 2),
        "busy_cores": round(used / wall, 2),
        "machine_busy_cores": round(machine / wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per source and per clip")
    parser.add_argument("--size", type=int, default=96, help="output frame side (the synthetic dataset's)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--cache", default="/tmp/fastav-bench-build", help="where sources and outputs go")
    args = parser.parse_args()
    cache = Path(args.cache)
    start = time.monotonic()
    src = make_sources(cache / f"src-{args.clips}-{args.duration:g}s", args.clips, args.duration)
    print(f"sources: {args.clips} x 128x96 h264+aac {args.duration:g} s in {src} ({time.monotonic() - start:.1f} s)")
    rows = [run_build(src, cache / f"out-w{w}", int(w), args) for w in args.workers.split(",")]
    print(f"{'workers':>7} {'clips':>6} {'wall s':>8} {'clips/s':>8} {'cpu s':>7} {'busy cores':>10} {'machine':>8}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['clips']:>6} {r['wall_s']:>8.2f} {r['clips_per_s']:>8.2f} {r['cpu_s']:>7.2f} "
            f"{r['busy_cores']:>10.2f} {r['machine_busy_cores']:>8.2f}"
        )
    speedup = rows[-1]["clips_per_s"] / rows[0]["clips_per_s"] if len(rows) > 1 else 1.0
    print(f"speed-up {rows[-1]['workers']} vs {rows[0]['workers']} workers: {speedup:.2f}x")
    print(
        json.dumps(
            {
                "bench": "shards_build",
                "rows": rows,
                "speedup": round(speedup, 2),
                "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "out_size": args.size,
                "duration": args.duration,
            }
        )
    )


if __name__ == "__main__":
    main()
