"""End-to-end throughput: clips/s of fastav against the plain-PyTorch way, measured side by side in one run.

Rows so far (the training-step rows join when the trainer lands):

- ``audio`` (``--audio``): DALI's audio decoder on 10-s clips stored as FLAC and as WAV, one CPU thread, and
  the batched Kaldi fbank on the same waveforms: whether FLAC decoding can limit the loader (it runs on the host's
  CPU threads even when the video is decoded by NVDEC).
- ``data``: the DALI pipeline (decode, frame sampling, crop/resize/normalise, Kaldi fbank, augmentation) against
  the reference loader (a DataLoader with PyAV, torchaudio and PIL in worker processes), on the same shards and
  the same number of clips, in training mode, at base sizes (4 frames of 224 px, 1024 x 128 fbank) by default.

The shards are generated once (``python -m shards synth``, 256 px VP9 + FLAC like real shards) and reused.
Prints a table, then one JSON line last. On a CPU only the ratio is meaningful; absolute figures count on a GPU.

    python bench/throughput.py --data-only [--clips 96] [--batch-size 12] [--workers N]
    python bench/throughput.py --audio
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastav.config import load_config  # noqa: E402
from fastav.data import build_loader  # noqa: E402
from fastav.data.reference import reference_loader  # noqa: E402
from shards.synth import SynthSpec, generate  # noqa: E402


def _git_sha() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _time_batches(iterator, batches: int, warmup: int, sync) -> tuple[int, float]:
    """(clips, seconds) over ``batches`` batches after ``warmup`` untimed ones."""
    clips = 0
    start = None
    for i, batch in enumerate(iterator):
        if i == warmup:
            sync()
            start = time.perf_counter()
        if i >= warmup:
            clips += int(batch["index"].shape[0])
        if i + 1 == warmup + batches:
            break
    sync()
    if start is None:
        raise RuntimeError("not enough batches for the warm-up; use more --clips")
    return clips, time.perf_counter() - start


def bench_data(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    spec = SynthSpec(categories=1, classes_per_category=4, clips_per_class=max(args.clips // 4, 4),
                     size=args.size, duration=args.duration, test_fraction=0.1, retrieval_per_class=0,
                     shard_size=64)  # fmt: skip
    generate(spec, data, workers=args.workers, show_progress=True)
    cfg = load_config(
        args.recipe,
        [
            f"data.root={data}",
            f"data.batch_size={args.batch_size}",
            f"data.num_threads={args.workers}",
            "data.device=" + ("gpu" if torch.cuda.is_available() else "cpu"),
        ],
    )
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    n_batches = max(1, (spec.clips_per_class * 4 * 9 // 10) // args.batch_size - args.warmup)

    def fastav_batches():
        loader = build_loader(cfg, "train")
        while True:
            yield from loader

    def reference_batches():
        loader = reference_loader(cfg, "train", batch_size=args.batch_size, num_workers=args.workers, train=True)
        while True:
            yield from loader

    rows = {}
    for name, make in (("fastav (DALI)", fastav_batches), ("reference (PyAV+torchaudio+PIL)", reference_batches)):
        clips, seconds = _time_batches(make(), n_batches, args.warmup, sync)
        rows[name] = {"clips": clips, "seconds": round(seconds, 3), "clips_per_s": round(clips / seconds, 2)}
    fast, ref = rows["fastav (DALI)"], rows["reference (PyAV+torchaudio+PIL)"]
    return {
        "rows": rows,
        "ratio": round(fast["clips_per_s"] / ref["clips_per_s"], 2),
        "shape": {
            "frames": cfg.data.num_frames,
            "frame_size": cfg.data.frame_size,
            "fbank": [cfg.data.target_length, cfg.data.num_mel_bins],
            "source_px": args.size,
            "batch_size": args.batch_size,
        },  # fmt: skip
    }


def _cycling_batches(items: list, batch: int):
    """A zero-argument batch source for ``fn.external_source`` that cycles through ``items``."""
    state = {"next": 0}

    def source() -> list:
        start = state["next"]
        state["next"] = (start + batch) % len(items)
        return [items[start + j] for j in range(batch)]

    return source


def _audio_pipeline(source, batch: int):
    """DALI's CPU audio decoder alone, one thread, fed encoded files by ``source``."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, exec_dynamic=True, prefetch_queue_depth=1)
    def pipe():
        wave, _ = fn.decoders.audio(
            fn.external_source(source=source, dtype=types.UINT8), dtype=types.FLOAT, downmix=True
        )
        return fn.pad(wave, axes=[0], fill_value=0.0), fn.cast(wave.shape(), dtype=types.INT64)

    p = pipe()
    p.build()
    return p


def bench_audio(args: argparse.Namespace) -> dict:
    from fastav.data.fbank import kaldi_fbank
    from fastav.data.index import ShardIndex
    from shards.manifest import load_manifest

    rows = {}
    batch = 16
    for fmt in ("flac", "wav"):
        root = Path(args.data).with_name(f"audio-10s-{fmt}")
        spec = SynthSpec(categories=1, classes_per_category=4, clips_per_class=17, size=32, duration=10.0,
                         test_fraction=0.06, retrieval_per_class=0, audio_format=fmt)  # fmt: skip
        generate(spec, root, workers=args.workers, show_progress=False)
        index = ShardIndex(root, load_manifest(root), "train")
        blobs = [index.fetch(i).audio for i in range(len(index))][: (len(index) // batch) * batch]
        p = _audio_pipeline(_cycling_batches(blobs, batch), batch)
        p.run()  # warm-up
        n_batches = len(blobs) // batch
        start = time.perf_counter()
        for _ in range(n_batches):
            wave, length = p.run()
        seconds = time.perf_counter() - start
        size = sum(len(b) for b in blobs) / len(blobs)
        rows[f"decode {fmt} (1 thread)"] = {"clips": n_batches * batch, "seconds": round(seconds, 3),
                                            "clips_per_s": round(n_batches * batch / seconds, 1),
                                            "kb_per_clip": round(size / 1024, 1)}  # fmt: skip
    wave_t = torch.from_numpy(np.array(wave.as_tensor()))
    length_t = torch.from_numpy(np.array(length.as_tensor())).view(-1)
    kaldi_fbank(wave_t, length_t)  # warm-up
    start = time.perf_counter()
    for _ in range(4):
        kaldi_fbank(wave_t, length_t)
    seconds = time.perf_counter() - start
    rows[f"kaldi fbank ({torch.get_num_threads()} torch threads)"] = {
        "clips": 4 * batch, "seconds": round(seconds, 3), "clips_per_s": round(4 * batch / seconds, 1)
    }  # fmt: skip
    return {"rows": rows}


def _print_rows(rows: dict) -> None:
    print(f"\n{'row':<36} {'clips':>6} {'seconds':>8} {'clips/s':>9}")
    for name, row in rows.items():
        print(f"{name:<36} {row['clips']:>6} {row['seconds']:>8.2f} {row['clips_per_s']:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-only", action="store_true", help="only the data-pipeline row (the only row so far)")
    parser.add_argument("--audio", action="store_true", help="also the FLAC / WAV decode and fbank rows")
    parser.add_argument("--recipe", default="base", help="config recipe for sizes (default base: 4 x 224 px)")
    parser.add_argument("--data", default=str(REPO / "runs" / "bench" / "data-256"), help="where to keep the shards")
    parser.add_argument("--clips", type=int, default=96, help="clips in the generated training split")
    parser.add_argument("--size", type=int, default=256, help="side of the generated frames")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    result = {"bench": "throughput", "git_sha": _git_sha(), "device": _device_name(), "recipe": args.recipe}
    if args.audio:
        result["audio"] = bench_audio(args)
        _print_rows(result["audio"]["rows"])
    data = bench_data(args)
    _print_rows(data["rows"])
    print(f"{'ratio fastav / reference':<36} {'':>6} {'':>8} {data['ratio']:>9.2f}x")
    result["data"] = data
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
