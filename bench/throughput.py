"""End-to-end throughput: fastav against the official way, measured side by side in one run.

    python bench/throughput.py [--recipe NAME] [--device cpu|cuda] [--steps N] [--repeats R] [--methods ...]
                               [--rows data,train,e2e,kernels] [--audio]
    python bench/throughput.py --data-only          (the data row alone)

``--recipe`` defaults to ``stella_vggsound`` (base size: 4 x 224 px, 1024 x 128 fbank, ViT-B 10 + 2 layers,
batch 12) on a GPU and ``debug`` on the CPU; ``make bench`` runs the default. Prints a table per row group as it
is measured, a summary table, then one JSON line last (git SHA, date, device, recipe, every figure below).

Rows and their figures (warm-up steps excluded; "median" is the median over ``--repeats`` timed windows of
``--steps`` steps, with the minimum and maximum beside it):

- ``data``: the DALI pipeline (decode, frame sampling, crop / resize / normalise, Kaldi fbank, augmentation)
  against the reference loader (a DataLoader with PyAV, torchaudio and PIL in worker processes) on the same shards
  (generated once with ``python -m shards synth``: 256 px VP9 + FLAC like real shards) and the same clips, in
  training mode at the sizes and batch of ``--data-recipe`` (default ``base``: 4 x 224 px, 1024 x 128 fbank, batch
  12, whatever ``--recipe``), ``--data-repeats`` times each, alternating, on fresh loaders (their start-up and
  first batch untimed). Figures: clips/s of each (clips delivered / wall seconds, over all repeats, and per repeat),
  and the ratio (median of the per-repeat ratios, with its range).
- ``audio`` (``--audio``): DALI's audio decoder on 10-s clips stored as FLAC and as WAV, one CPU thread, and the
  batched Kaldi fbank on the same waveforms (clips/s).
- ``train``: one training step on device-resident synthetic batches (no loader), the same batch of B clips for
  every method, replay memory filled during the warm-up (``method.memory_size / --memory-share`` clips: one
  process of the official 4-GPU run), the model built from the recipe with the same seed:

  - ``fastav STELLA`` / ``DER++`` / ``Finetune``: fastav's step as the trainer runs it (the DeepSpeed engine's
    forward, backward and optimizer step at the recipe's precision, then ``after_step``: the memory insert);
  - ``official STELLA``: the official formulation of the STELLA step (``bench/stella_official.py``): materialised
    B x H x A x V attention maps with softmax and means in the framework, ``torch.multinomial`` and a Python
    chunk loop for the selection, explicit attention in every block, a replay memory of fp32 tensors on the host
    copied to the device each step, fp16 autocast with a grad scaler on a GPU (on the CPU: fp32, no autocast, the
    scaler disabled; ``--official-precision``), ``torch.optim.Adam``.

  Figures per method: ``clips_per_s`` = new clips per second (B / step time; replayed clips not counted);
  ``step_ms`` = milliseconds per step; memory in MB: ``resting_mb`` (parameters, gradients, optimizer state and
  replay memory between steps) + ``step_mb`` (the peak of one step above that) = ``peak_mb``; on a GPU from the
  caching allocator (``torch.cuda.memory_allocated`` / ``max_memory_allocated``), on the CPU by counting storages
  (the resting ones by enumeration, then the peak of the storages one step's ATen ops create, with their
  lifetimes, through a dispatch mode); ``gflop_per_clip`` = model FLOPs
  of the method's step per new clip, counted from the configuration (``bench/flops.py``: every matrix product,
  forward and backward, 2 FLOPs per multiply-add; the official row uses STELLA's count); ``mfu`` = FLOPs per
  second over the device's dense bf16 peak (H100 / H200 989.4 TFLOP/s, ``--peak-tflops`` to set it; none on a
  CPU). ``ratios``: fastav STELLA / official STELLA clips/s (the headline), STELLA / DER++ and STELLA / Finetune
  clips/s, each taken per repeat (every method is timed once per repeat, one after the other, the first one
  rotating), and STELLA / DER++ peak memory.
- ``e2e``: shards -> fastav's loader -> fastav's STELLA step (the same engine as the train row): clips/s (new
  clips / wall seconds), ``wait_share`` = fraction of the wall time spent waiting for the next batch, and
  ``vs_train`` = e2e clips/s over the train row's STELLA clips/s.
- ``kernels``: ``bench/kernels.py`` in this process (``--quick`` on the CPU, ``--batch B`` on a GPU): median ms and
  peak MB of each fused op against its reference and the naive formulation.

A GPU run's JSON line is kept as ``bench/results/<date>-<gpu>.json``. On a CPU the absolute figures mean little;
the ratios are what counts (fastav's STELLA step vs the official formulation, DALI vs the reference loader). On a
CPU the train rows run one intra-op thread by default (``--threads``): a debug-size model is dominated by per-op
overhead, and OpenMP threads contending on a shared 2-core machine slow it down several times over.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and any(
    a == "--device=cpu" or (a == "--device" and sys.argv[i + 1 : i + 2] == ["cpu"]) for i, a in enumerate(sys.argv)
):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu: hide the GPUs before torch starts (DeepSpeed, DALI too)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastav.config import Config, load_config  # noqa: E402
from fastav.data import build_loader  # noqa: E402
from fastav.data.reference import reference_loader  # noqa: E402
from shards.synth import SynthSpec, generate  # noqa: E402


def _sibling(name: str):
    """bench/<name>.py as a module (bench/ is not a package, and bench/kernels.py would shadow ``kernels``)."""
    key = f"fastav_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


flops = _sibling("flops")

METHODS = ("official", "stella", "derpp", "finetune")
LABELS = {
    "official": "official STELLA",
    "stella": "fastav STELLA",
    "derpp": "fastav DER++",
    "finetune": "fastav Finetune",
}
ROWS = ("data", "train", "e2e", "kernels")


def _git_sha() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _spread(values: list[float], digits: int = 2) -> dict:
    """Median, range and (from 4 values) quartiles of a figure over repeats."""
    out = {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
           "max": round(max(values), digits), "n": len(values)}  # fmt: skip
    if len(values) >= 4:
        q = statistics.quantiles(values, n=4, method="inclusive")
        out.update(p25=round(q[0], digits), p75=round(q[2], digits))
    return out


# --------------------------------------------------------------------------------------------------------------
# data and audio rows
# --------------------------------------------------------------------------------------------------------------


def _time_batches(iterator, batches: int, warmup: int, sync) -> tuple[int, float]:
    """(clips, seconds) of the ``batches`` batches delivered after ``warmup`` untimed ones (the clock starts once
    the last warm-up batch has arrived, so every counted batch is also a timed one)."""
    for _ in range(warmup):
        next(iterator)
    sync()
    start = time.perf_counter()
    clips = 0
    for _ in range(batches):
        clips += int(next(iterator)["index"].shape[0])
    sync()
    return clips, time.perf_counter() - start


def _shard_spec(args: argparse.Namespace) -> SynthSpec:
    return SynthSpec(categories=1, classes_per_category=4, clips_per_class=max(args.clips // 4, 4), size=args.size,
                     duration=args.duration, test_fraction=0.1, retrieval_per_class=0, shard_size=64)  # fmt: skip


def _loader_config(args: argparse.Namespace, cfg: Config, device: torch.device) -> Config:
    data = Path(args.data)
    generate(_shard_spec(args), data, workers=args.workers, show_progress=not args.quiet)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(
            cfg.data, root=str(data), num_threads=args.workers, device="gpu" if device.type == "cuda" else "cpu"
        ),
    )


def bench_data(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict:
    cfg = _loader_config(args, cfg, device)
    spec = _shard_spec(args)
    B = cfg.data.batch_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_batches = max(1, (spec.clips_per_class * 4 * 9 // 10) // B - args.data_warmup)

    def fastav_batches():
        loader = build_loader(cfg, "train")
        while True:
            yield from loader

    def reference_batches():
        loader = reference_loader(cfg, "train", batch_size=B, num_workers=args.workers, train=True)
        while True:
            yield from loader

    loaders = (("fastav (DALI)", fastav_batches), ("reference (PyAV+torchaudio+PIL)", reference_batches))
    timed: dict[str, list[tuple[int, float]]] = {name: [] for name, _ in loaders}
    for _ in range(args.data_repeats):  # alternating, each repeat on fresh loaders (start-up and warm-up untimed)
        for name, make in loaders:
            timed[name].append(_time_batches(make(), n_batches, args.data_warmup, sync))
    rows = {}
    for name, runs in timed.items():
        clips, seconds = sum(c for c, _ in runs), sum(s for _, s in runs)
        rows[name] = {"clips": clips, "seconds": round(seconds, 3), "clips_per_s": round(clips / seconds, 2),
                      "clips_per_s_repeats": _spread([c / s for c, s in runs])}  # fmt: skip
    fast, ref = timed["fastav (DALI)"], timed["reference (PyAV+torchaudio+PIL)"]
    ratios = [(cf / sf) / (cr / sr) for (cf, sf), (cr, sr) in zip(fast, ref, strict=True)]
    return {
        "rows": rows,
        "ratio": round(statistics.median(ratios), 2),
        "ratio_repeats": _spread(ratios),
        "shape": {
            "frames": cfg.data.num_frames,
            "frame_size": cfg.data.frame_size,
            "fbank": [cfg.data.target_length, cfg.data.num_mel_bins],
            "source_px": args.size,
            "batch_size": B,
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


# --------------------------------------------------------------------------------------------------------------
# train rows
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """One method's training step on device-resident batches, with what its memory figures need."""

    name: str
    step: Callable[[dict], object]
    resting_tensors: Callable[[], list[torch.Tensor]]
    """CPU: every tensor the method keeps between steps (parameters, gradients, optimizer state, memory)."""
    flop_method: str
    precision: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    resting_bytes: int = 0
    step_bytes: int = 0


def _tensors_of_optimizer(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _parameters_and_grads(module: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for p in module.parameters():
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
    return out


def _count_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _method_config(cfg: Config, name: str, capacity: int) -> Config:
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=name, memory_size=capacity))


def fastav_runner(name: str, cfg: Config, dist, capacity: int) -> Runner:
    from fastav.continual.methods import ReplayMethod
    from fastav.continual.runner import build_method
    from fastav.train.engine import Engine

    cfg = _method_config(cfg, name, capacity)
    engine = Engine(build_method(cfg, dist), cfg, dist=dist)
    method = engine.module

    def step(batch: dict) -> object:
        out, _, _ = engine.train_step(batch, epoch_progress=0.0)
        method.after_step(batch, out)
        return out

    def resting() -> list[torch.Tensor]:
        memory = list(method.memory.store.values()) if isinstance(method, ReplayMethod) else []
        return _parameters_and_grads(method) + _tensors_of_optimizer(engine.optimizer) + memory

    return Runner(name, step, resting, name, cfg.train.precision)


def official_runner(cfg: Config, dist, capacity: int, precision: str) -> Runner:
    from fastav.continual.runner import build_method

    official_stella = _sibling("stella_official")
    cfg = _method_config(cfg, "stella", capacity)
    fastav_stella = build_method(cfg, dist)  # fastav's modules and initial weights, as the fastav rows build them
    official = official_stella.OfficialSTELLA(
        cfg, fastav_stella.model, fastav_stella.avm, capacity=capacity, precision=precision, seed=cfg.train.seed
    ).to(dist.device)
    official.build_optimizer()

    def resting() -> list[torch.Tensor]:
        return (
            _parameters_and_grads(official)
            + _tensors_of_optimizer(official.optimizer)
            + list(official.buffer.store.values())
        )

    return Runner("official", official.train_step, resting, "stella", precision)


def synthetic_batches(cfg: Config, device: torch.device, count: int = 4) -> list[dict]:
    """``count`` different batches of random frames (ImageNet-normalised range) and fbanks on the device."""
    d, B = cfg.data, cfg.data.batch_size
    g = torch.Generator().manual_seed(0)
    return [
        {
            "video": torch.randn(B, d.num_frames, 3, d.frame_size, d.frame_size, generator=g).to(device),
            "fbank": torch.randn(B, d.target_length, d.num_mel_bins, generator=g).to(device),
            "index": torch.arange(B, device=device),
        }
        for _ in range(count)
    ]


class _StepBytes(TorchDispatchMode):
    """CPU memory of one step: the peak total of the storages its ATen ops create that are alive at the same time.

    Storages that existed before the step (``known``: parameters, optimizer state, replay memory, the batch; the
    caller keeps them alive meanwhile, so their addresses cannot be reused) are not counted. Lifetimes are the
    storages' own (weak references to them), not those of the tensors viewing them.
    """

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known = known
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if not ptr or ptr in self.known:
                continue
            if ptr in self.live:
                if not self.live[ptr][0].expired():
                    continue  # a view of a storage already counted
                self.current -= self.live.pop(ptr)[1]
            self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
            if self.current > self.peak:
                self._sweep()
                self.peak = max(self.peak, self.current)
        return out


def _step_peak_cpu(runner: Runner, batch: dict) -> int:
    keep = runner.resting_tensors() + [t for t in batch.values() if isinstance(t, torch.Tensor)]
    with _StepBytes({t.untyped_storage().data_ptr() for t in keep}) as rec:
        runner.step(batch)
    del keep
    return rec.peak


def bench_train(args: argparse.Namespace, cfg: Config, device: torch.device, dist) -> tuple[dict, dict[str, Runner]]:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    B = cfg.data.batch_size
    capacity = max(cfg.method.memory_size // args.memory_share, B)
    batches = synthetic_batches(cfg, device)
    precision = args.official_precision if args.official_precision != "auto" else ("fp16" if cuda else "fp32")
    runners: dict[str, Runner] = {}
    for name in args.methods:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        runner = (
            official_runner(cfg, dist, capacity, precision)
            if name == "official"
            else fastav_runner(name, cfg, dist, capacity)
        )
        for i in range(args.warmup):
            runner.step(batches[i % len(batches)])
        sync()
        if cuda:
            runner.resting_bytes = torch.cuda.memory_allocated() - before
        else:
            runner.resting_bytes = _count_bytes(runner.resting_tensors())
        runners[name] = runner
        if not args.quiet:
            print(f"train: {LABELS[name]} built and warmed up ({args.warmup} steps)", file=sys.stderr)

    order = list(runners.values())
    for r in range(args.repeats):  # interleaved: every method once per repeat, the start rotating
        for runner in order[r % len(order) :] + order[: r % len(order)]:
            sync()
            start = time.perf_counter()
            for i in range(args.steps):
                runner.step(batches[i % len(batches)])
            sync()
            runner.seconds.append(time.perf_counter() - start)

    for runner in runners.values():  # one more step each, for its memory peak
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runner.step(batches[0])
            torch.cuda.synchronize()
            runner.step_bytes = torch.cuda.max_memory_allocated() - base
        else:
            runner.step_bytes = _step_peak_cpu(runner, batches[0])

    peak = args.peak_tflops if args.peak_tflops else flops.bf16_peak_tflops(_device_name(device))
    rows = {}
    for name, runner in runners.items():
        count = flops.step_flops(cfg, runner.flop_method, B)
        clips = [B * args.steps / s for s in runner.seconds]
        step_ms = [1e3 * s / args.steps for s in runner.seconds]
        median_clips = statistics.median(clips)
        rows[name] = {
            "label": LABELS[name],
            "precision": runner.precision,
            "clips_per_s": _spread(clips),
            "step_ms": _spread(step_ms),
            "resting_mb": round(runner.resting_bytes / 2**20, 1),
            "step_mb": round(runner.step_bytes / 2**20, 1),
            "peak_mb": round((runner.resting_bytes + runner.step_bytes) / 2**20, 1),
            "gflop_per_clip": round(count.per_clip / 1e9, 4),
            "tflops": round(count.per_clip * median_clips / 1e12, 4),
            "mfu": round(count.per_clip * median_clips / (peak * 1e12), 4) if peak else None,
        }
    ratios = {}
    if "stella" in runners and "official" in runners:
        per_repeat = [o / s for s, o in zip(runners["stella"].seconds, runners["official"].seconds, strict=True)]
        ratios["stella_vs_official_clips_per_s"] = _spread(per_repeat)
    for other in ("derpp", "finetune"):
        if "stella" in runners and other in runners:
            per_repeat = [o / s for s, o in zip(runners["stella"].seconds, runners[other].seconds, strict=True)]
            ratios[f"stella_vs_{other}_clips_per_s"] = _spread(per_repeat)
    if "stella" in rows and "derpp" in rows:
        ratios["stella_vs_derpp_peak_memory"] = round(rows["stella"]["peak_mb"] / rows["derpp"]["peak_mb"], 3)
    counts = {m: flops.step_flops(cfg, m, B).summary() for m in ("stella", "derpp", "finetune")}
    result = {
        "batch": B,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory_clips": capacity,
        "threads": torch.get_num_threads(),
        "peak_tflops": peak,
        "memory_measure": "torch.cuda allocator" if cuda else "resting tensors enumerated + storages one step creates",
        "rows": rows,
        "ratios": ratios,
        "flops": counts,
    }
    return result, runners


def _print_train(train: dict) -> None:
    print(f"\ntrain step, batch {train['batch']} new clips (+ as many replayed), medians of {train['repeats']} x "
          f"{train['steps']} steps, {train['memory_clips']} clips of memory")  # fmt: skip
    head = f"{'row':<18}{'precision':>10}{'clips/s':>10}{'(min-max)':>17}{'step ms':>10}{'peak MB':>10}"
    print(f"{head}{'(resting+step)':>16}{'GFLOP/clip':>12}{'MFU':>7}")
    for row in train["rows"].values():
        c, mem = row["clips_per_s"], f"{row['resting_mb']:.0f}+{row['step_mb']:.0f}"
        span = f"({c['min']:.2f}-{c['max']:.2f})"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(
            f"{row['label']:<18}{row['precision']:>10}{c['median']:>10.2f}{span:>17}"
            f"{row['step_ms']['median']:>10.1f}{row['peak_mb']:>10.1f}{mem:>16}{row['gflop_per_clip']:>12.4g}{mfu:>7}"
        )
    for name, value in train["ratios"].items():
        if isinstance(value, dict):
            quartiles = f"quartiles {value['p25']:.2f}-{value['p75']:.2f}, " if "p25" in value else ""
            print(f"ratio {name}: {value['median']:.2f}x ({quartiles}min {value['min']:.2f}, max {value['max']:.2f}, "
                  f"{value['n']} repeats)")  # fmt: skip
        else:
            print(f"ratio {name}: {value:.3f}")
    stella = train["flops"]["stella"]
    parts = ", ".join(f"{k} {v / 1e9:.4g}" for k, v in stella["parts_per_clip"].items())
    print(f"model FLOPs per new clip (GFLOP, bench/flops.py): STELLA {stella['per_clip'] / 1e9:.4g} ({parts}); "
          f"DER++ {train['flops']['derpp']['per_clip'] / 1e9:.4g}; "
          f"Finetune {train['flops']['finetune']['per_clip'] / 1e9:.4g}")  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------------------


def bench_e2e(args: argparse.Namespace, cfg: Config, device: torch.device, runner: Runner, train_rate: float | None):
    cfg = _loader_config(args, cfg, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def batches():
        loader = build_loader(cfg, "train")
        while True:
            yield from loader

    stream = batches()
    for _ in range(args.warmup):
        runner.step(next(stream))
    windows, waits = [], []
    clips = 0
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        waited = 0.0
        for _ in range(args.steps):
            t = time.perf_counter()
            batch = next(stream)
            waited += time.perf_counter() - t
            clips += int(batch["fbank"].shape[0])
            runner.step(batch)
        sync()
        windows.append(time.perf_counter() - start)
        waits.append(waited)
    B = cfg.data.batch_size
    rates = [B * args.steps / s for s in windows]
    out = {
        "clips_per_s": _spread(rates),
        "wait_share": _spread([w / s for w, s in zip(waits, windows, strict=True)], 3),
        "clips": clips,
        "seconds": round(sum(windows), 3),
    }
    if train_rate:
        out["vs_train"] = round(statistics.median(rates) / train_rate, 3)
    return out


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------


def bench_kernel_rows(args: argparse.Namespace, cfg: Config, device: torch.device) -> dict:
    argv = ["--quick"] if device.type == "cpu" else ["--batch", str(cfg.data.batch_size)]
    if args.kernel_ops:
        argv += ["--ops", args.kernel_ops]
    with contextlib.redirect_stdout(io.StringIO()):  # its own table and JSON line; this run prints one of each
        result = _sibling("kernels").main(argv)
    return {k: result[k] for k in ("dtype", "quick", "memory", "rows", "checks") if k in result}


def _print_kernels(k: dict) -> None:
    print(f"\nkernels ({k['dtype']}; bench/kernels.py)")
    print(f"{'op':<20}{'batch':>6}  {'provider':<14}{'median ms':>11}{'peak MB':>10}")
    for r in k["rows"]:
        print(f"{r['op']:<20}{r['batch']:>6}  {r['provider']:<14}{r['ms']:>11.3f}{r['peak_mb']:>10.1f}")


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------


def _summary(result: dict) -> None:
    print("\nsummary")
    train = result.get("train")
    if train:
        ratio = train["ratios"].get("stella_vs_official_clips_per_s")
        if ratio:
            print(f"  fastav STELLA / official STELLA step: {ratio['median']:.2f}x "
                  f"({ratio['min']:.2f}-{ratio['max']:.2f})")  # fmt: skip
        for row in train["rows"].values():
            print(f"  {row['label']:<18} {row['clips_per_s']['median']:>9.2f} clips/s  {row['peak_mb']:>9.1f} MB peak")
        if "stella_vs_derpp_peak_memory" in train["ratios"]:
            print(f"  STELLA / DER++ peak memory: {train['ratios']['stella_vs_derpp_peak_memory']:.3f}")
    if "e2e" in result:
        e = result["e2e"]
        print(f"  end to end (shards -> loader -> STELLA): {e['clips_per_s']['median']:.2f} clips/s, waiting for data "
              f"{100 * e['wait_share']['median']:.1f}% of the time" + (f", {e['vs_train']:.2f}x the train step"
                                                                       if "vs_train" in e else ""))  # fmt: skip
    if "data" in result:
        print(f"  data: DALI / reference loader {result['data']['ratio']:.2f}x")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipe",
        default=None,
        help="config recipe of the train, e2e and kernel rows (default: stella_vggsound on a GPU, debug on the CPU)",
    )
    p.add_argument("--data-recipe", default="base", help="recipe whose data sizes and batch the data row uses")
    p.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for every row (train.precision=fp32)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"train rows: any of {' '.join(METHODS)} (space or comma separated)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (train and e2e rows)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per method; medians over them")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (fill the memory, compile, tune)")
    p.add_argument(
        "--memory-share",
        type=int,
        default=4,
        help="replay memory = method.memory_size / this (4: one process of STELLA's 4-GPU run)",
    )
    p.add_argument(
        "--official-precision",
        choices=["auto", "fp16", "bf16", "fp32"],
        default="auto",
        help="official row: autocast dtype (auto: fp16 + grad scaler on a GPU, fp32 on the CPU)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak for MFU (default: by name)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the train rows (CPU default 1)")
    p.add_argument("--kernel-ops", default="", help="kernel rows: comma-separated ops of bench/kernels.py (all)")
    p.add_argument("--data-only", action="store_true", help="only the data row")
    p.add_argument("--audio", action="store_true", help="also the FLAC / WAV decode and fbank rows")
    p.add_argument("--data", default=str(REPO / "runs" / "bench" / "data-256"), help="where to keep the shards")
    p.add_argument("--clips", type=int, default=96, help="clips in the generated training split")
    p.add_argument("--size", type=int, default=256, help="side of the generated frames")
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=None, help="clips per step (default: the recipe's)")
    p.add_argument("--data-warmup", type=int, default=1, help="untimed batches of each loader in the data row")
    p.add_argument("--data-repeats", type=int, default=3, help="data row: timed passes of each loader, alternating")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.methods = [m for item in args.methods for m in item.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    args.rows = [r for r in args.rows.split(",") if r]
    if set(args.rows) - set(ROWS):
        p.error(f"unknown rows {sorted(set(args.rows) - set(ROWS))}; choose from {list(ROWS)}")
    if args.data_only:
        args.rows = ["data"]
    if min(args.steps, args.repeats) < 1 or args.warmup < 2:
        p.error("--steps and --repeats must be >= 1 and --warmup >= 2 (the first step fills the replay memory)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    recipe = args.recipe or ("stella_vggsound" if cuda else "debug")
    overrides = [*args.override, *([f"data.batch_size={args.batch_size}"] if args.batch_size else [])]
    cfg = load_config(recipe, overrides)
    result: dict = {
        "bench": "throughput",
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": _device_name(device),
        "torch": torch.__version__,
        "recipe": recipe,
        "overrides": overrides,
        "batch": cfg.data.batch_size,
    }
    if "data" in args.rows:
        result["data_recipe"] = args.data_recipe
    if args.audio:
        result["audio"] = bench_audio(args)
        _print_rows(result["audio"]["rows"])
    if "data" in args.rows:
        data = bench_data(args, load_config(args.data_recipe, overrides), device)
        _print_rows(data["rows"])
        r = data["ratio_repeats"]
        print(f"{'ratio fastav / reference':<36} {'':>6} {'':>8} {data['ratio']:>9.2f}x  "
              f"(median of {r['n']} repeats, {r['min']:.2f}-{r['max']:.2f})")  # fmt: skip
        result["data"] = data

    runners: dict[str, Runner] = {}
    if "train" in args.rows or "e2e" in args.rows:
        from fastav.train.engine import init_distributed

        if not cuda:
            torch.set_num_threads(args.threads or 1)
        elif args.threads:
            torch.set_num_threads(args.threads)
        dist = init_distributed(cfg)
        methods = args.methods if "train" in args.rows else ["stella"]
        if "e2e" in args.rows and "stella" not in methods:
            methods = [*methods, "stella"]
        train, runners = bench_train(argparse.Namespace(**{**vars(args), "methods": methods}), cfg, device, dist)
        if "train" in args.rows:
            _print_train(train)
            result["train"] = train
        if "e2e" in args.rows:
            rate = train["rows"]["stella"]["clips_per_s"]["median"] if "train" in args.rows else None
            result["e2e"] = bench_e2e(args, cfg, device, runners["stella"], rate)
            e = result["e2e"]
            print(f"\nend to end (shards -> loader -> fastav STELLA step): {e['clips_per_s']['median']:.2f} clips/s "
                  f"({e['clips_per_s']['min']:.2f}-{e['clips_per_s']['max']:.2f}), waiting for data "
                  f"{100 * e['wait_share']['median']:.1f}% of the time")  # fmt: skip
        runners.clear()
        gc.collect()
    if "kernels" in args.rows:
        result["kernels"] = bench_kernel_rows(args, cfg, device)
        _print_kernels(result["kernels"])
    _summary(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
