"""Kernel benchmark: each fused op against its plain-PyTorch reference (and importance against naive STELLA).

What is measured, per op and shape, per provider:
- median / p20 / p80 time of one call (GPU: ``triton.testing.do_bench``; CPU: wall clock over repeated calls);
- peak memory of one call above what was allocated before it (GPU: ``torch.cuda.max_memory_allocated``; CPU:
  live bytes of the tensors the call creates, tracked with a TorchDispatchMode, since CPU has no allocator stats).

Providers: ``triton`` (the fused kernels; only where CUDA exists: under the interpreter timings mean nothing),
``ref`` (the ``*_ref`` functions), and for importance ``stella_naive``: the official formulation, which
materialises the B x 12 x 512 x 784 logits and softmax in both directions (input-dtype matmul, fp32 softmax as
under autocast). For video selection ``stella_naive`` is STELLA's ``torch.multinomial(w, 784)[:, :392]``.

On a GPU the JSON ``checks`` hold the issue's acceptance at STELLA base size (B = 48): importance (both
directions) at least 5x faster and with at least 10x less peak memory than ``stella_naive``.

Prints a table, then one JSON line last. ``--quick`` uses small batches (seconds on 2 CPU cores).

``--compile`` needs no GPU: it compiles every candidate config of every kernel for sm_90 (H100 / H200) with the
arguments a STELLA step passes at ``--batch`` (``kernels/aot.py``) and prints, per config, registers, spilled and
stack bytes, shared memory, tensor-core MMAs, the shuffles, shared stores and barriers of one main-loop iteration
(SASS) and the compile time, then the JSON line with every row (whole-kernel counts too) and the problems found
(spills, shared memory, no tensor cores, barriers per iteration); exit status 1 when there is one.

Usage: python bench/kernels.py [--quick] [--dtype bf16|fp32] [--ops importance,gather_video,...]
       python bench/kernels.py --batch 48   (one batch size only)
       python bench/kernels.py --compile [--batch 48]   (without TRITON_INTERPRET)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import kernels  # noqa: E402

SCALE, TAU = 0.125, 0.4
H, D, L_A, L_V, K_A, K_V = 12, 64, 512, 784, 256, 392
Op = Callable[[], object]


# --------------------------------------------------------------------------------------------------------------
# setups: (batch, device, dtype) -> {provider: zero-argument callable}
# --------------------------------------------------------------------------------------------------------------


def _qk(B: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"q_a": (B, H, L_A, D), "k_a": (B, H, L_A, D), "q_v": (B, H, L_V, D), "k_v": (B, H, L_V, D)}
    return {n: torch.randn(s, generator=g).to(device=device, dtype=dtype) for n, s in shapes.items()}


def stella_naive_importance(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """STELLA's official computation: both logit maps and their softmaxes materialised, then averaged."""
    out = []
    for q, k in ((t["q_a"], t["k_v"]), (t["q_v"], t["k_a"])):
        s = torch.matmul(q, k.transpose(-2, -1)) * SCALE
        out.append((s.float() / TAU).softmax(dim=-1).mean(dim=(1, 2)))
    return out[0], out[1]


def setup_importance(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    t = _qk(B, device, dtype)
    return {
        "triton": lambda: (
            kernels.attention_importance_triton(t["q_a"], t["k_v"], SCALE, TAU),
            kernels.attention_importance_triton(t["q_v"], t["k_a"], SCALE, TAU),
        ),
        "ref": lambda: (
            kernels.attention_importance_ref(t["q_a"], t["k_v"], SCALE, TAU),
            kernels.attention_importance_ref(t["q_v"], t["k_a"], SCALE, TAU),
        ),
        "stella_naive": lambda: stella_naive_importance(t),
    }


def setup_pooled_query(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    t = _qk(B, device, dtype)
    w = torch.rand(B, L_V, device=device).softmax(-1)
    cand = kernels.topk_mask(w, K_V)
    return {
        "triton": lambda: kernels.pooled_query_triton(t["q_v"], w, cand),
        "ref": lambda: kernels.pooled_query_ref(t["q_v"], w, cand),
    }


def setup_replay_correlation(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    t = _qk(B, device, dtype)
    qp, qc = torch.randn(B, H, D, device=device), torch.randn(B, H, D, device=device)
    cand = torch.rand(B, L_V, device=device) < 0.5
    return {
        "triton": lambda: kernels.replay_correlation_triton(qp, qc, t["k_v"], SCALE, cand),
        "ref": lambda: kernels.replay_correlation_ref(qp, qc, t["k_v"], SCALE, cand),
    }


def setup_select_video(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    rows = 2 * B  # current + replay
    imp = torch.rand(rows, L_V, device=device).softmax(-1)
    pi = torch.rand(rows, L_V, device=device) * kernels.topk_mask(imp, K_V)
    rng = kernels.new_rng(0, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def naive() -> torch.Tensor:
        # STELLA draws multinomial(w, 784) and keeps 392; torch 2.x refuses more draws than non-zero weights,
        # so draw the 392 directly (the same distribution for the kept set)
        w = imp * (torch.rand(rows, L_V, device=device, generator=gen) >= pi)
        return torch.multinomial(w, K_V, replacement=False, generator=gen)

    def fused() -> torch.Tensor:
        kept, _ = kernels.prune_weights_triton(imp, pi, rng)
        return kernels.weighted_sample_triton(kept, K_V, rng).sort(dim=1).values

    return {
        "triton": fused,
        "ref": lambda: kernels.select_video_ref(imp, pi, K_V, rng),
        "stella_naive": naive,
    }


def setup_select_audio(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    rows = 2 * B
    imp = torch.rand(rows, L_A, device=device).softmax(-1)
    pi = torch.rand(rows, L_A, device=device) * kernels.topk_mask(imp, K_A)
    rng = kernels.new_rng(0, device)
    return {
        "triton": lambda: kernels.chunk_select_triton(imp, kernels.bernoulli_prune_triton(pi, rng), K_A, rng),
        "ref": lambda: kernels.select_audio_ref(imp, pi, K_A, rng),
    }


def setup_gather_video(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    rows = 2 * B
    video = torch.randn(rows, 4, 3, 224, 224, device=device, dtype=dtype)
    ids = torch.rand(rows, L_V, device=device).argsort(1)[:, :K_V].sort(1).values
    return {
        "triton": lambda: kernels.gather_video_patches_triton(video, ids),
        "ref": lambda: kernels.gather_video_patches_ref(video, ids),
    }


def setup_gather_audio(B: int, device: str, dtype: torch.dtype) -> dict[str, Op]:
    rows = 2 * B
    fbank = torch.randn(rows, 1024, 128, device=device, dtype=dtype)
    ids = torch.rand(rows, L_A, device=device).argsort(1)[:, :K_A].sort(1).values
    return {
        "triton": lambda: kernels.gather_audio_patches_triton(fbank, ids),
        "ref": lambda: kernels.gather_audio_patches_ref(fbank, ids),
    }


SETUPS = {
    "importance": setup_importance,
    "pooled_query": setup_pooled_query,
    "replay_correlation": setup_replay_correlation,
    "select_video": setup_select_video,
    "select_audio": setup_select_audio,
    "gather_video": setup_gather_video,
    "gather_audio": setup_gather_audio,
}


# --------------------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------------------


class _LiveBytes(TorchDispatchMode):
    """CPU peak memory: bytes of the storages the ops create while alive (views of known storages not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                ptr = t.untyped_storage().data_ptr()
                if ptr and ptr not in self.live:
                    self.live[ptr] = t.untyped_storage().nbytes()
                    self.current += self.live[ptr]
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._release, ptr)
        return out


def measure(fn: Op, device: str) -> tuple[float, float, float, float]:
    """(median ms, p20 ms, p80 ms, peak MB above the baseline) of one call."""
    if device == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the timing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return med, p20, p80, (torch.cuda.max_memory_allocated() - base) / 2**20
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < 1.0 and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive")  # >= 3 samples
    with _LiveBytes() as rec:
        fn()
    return statistics.median(times), q[0], q[3], rec.peak / 2**20


def _git_sha() -> str | None:
    """The checkout's commit, read from .git without running git (None outside a checkout)."""
    git = Path(__file__).resolve().parents[1] / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        return (git / head[5:]).read_text().strip() if head.startswith("ref: ") else head
    except OSError:
        return None


def compile_report(batch: int) -> dict:
    """Every kernel config compiled for sm_90 at STELLA's sizes: the table, then the JSON line (see the docstring)."""
    import importlib

    from kernels import _utils, aot

    if _utils.is_interpreted(importlib.import_module("kernels.attention_importance")._row_stats.kernel):
        raise SystemExit("--compile needs the kernels compiled, not interpreted: run without TRITON_INTERPRET=1")
    start = time.perf_counter()
    results = aot.compile_all(aot.stella_launches(batch))
    print(aot.format_table(results))
    problems = aot.problems(results)
    for line in problems:
        print(f"PROBLEM {line}")
    result = {
        "bench": "kernels-compile",
        "target": "sm_90",
        "batch": batch,
        "configs": len(results),
        "compile_s_total": round(sum(r.seconds for r in results), 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "git_sha": _git_sha(),
        "rows": [r.row() for r in results],
        "problems": problems,
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="compile every config for sm_90 and report (no GPU)")
    p.add_argument("--batch", type=int, default=None, help="one batch size (current samples; as many replayed)")
    p.add_argument("--quick", action="store_true", help="small batches (CPU: a few seconds on 2 cores)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--ops", default=",".join(SETUPS), help=f"comma-separated subset of {','.join(SETUPS)}")
    args = p.parse_args(argv)
    if args.compile:
        result = compile_report(args.batch or 48)
        if result["problems"]:
            raise SystemExit(1)
        return result

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    if args.batch:
        batches = [args.batch]
    elif cuda:
        batches = [12] if args.quick else [12, 48]  # per-GPU batch, and STELLA's total batch (the acceptance)
    else:
        batches = [2] if args.quick else [12]
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(SETUPS))
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(SETUPS)}")

    rows = []
    for op in ops:
        for B in batches:
            providers = SETUPS[op](B, device, dtype)
            for provider, fn in providers.items():
                if provider == "triton" and not cuda:
                    continue
                med, p20, p80, mem = measure(fn, device)
                rows.append(
                    {"op": op, "batch": B, "provider": provider, "ms": med, "p20": p20, "p80": p80, "peak_mb": mem}
                )
            del providers
            if cuda:
                torch.cuda.empty_cache()

    ref_ms = {(r["op"], r["batch"]): r["ms"] for r in rows if r["provider"] == "ref"}
    head = f"{'op':<20}{'batch':>6}  {'provider':<14}{'median ms':>11}{'p20':>10}{'p80':>10}{'peak MB':>10}"
    print(f"{head}{'vs ref':>8}")
    for r in rows:
        speed = ref_ms.get((r["op"], r["batch"]), float("nan")) / r["ms"]
        print(
            f"{r['op']:<20}{r['batch']:>6}  {r['provider']:<14}{r['ms']:>11.3f}{r['p20']:>10.3f}{r['p80']:>10.3f}"
            f"{r['peak_mb']:>10.1f}{speed:>7.1f}x"
        )

    checks = {}
    by = {(r["op"], r["batch"], r["provider"]): r for r in rows}
    tri, naive = by.get(("importance", 48, "triton")), by.get(("importance", 48, "stella_naive"))
    if tri and naive:
        checks = {
            "importance_b48_speedup_vs_naive": naive["ms"] / tri["ms"],
            "importance_b48_memory_ratio_vs_naive": naive["peak_mb"] / max(tri["peak_mb"], 1e-6),
        }
        checks["pass_5x_faster"] = checks["importance_b48_speedup_vs_naive"] >= 5
        checks["pass_10x_less_memory"] = checks["importance_b48_memory_ratio_vs_naive"] >= 10
    result = {
        "bench": "kernels",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "quick": args.quick,
        "memory": "cuda.max_memory_allocated" if cuda else "live bytes of created tensors (dispatch mode)",
        "kernel_tuning": kernels.get_tuning(),
        "torch": torch.__version__,
        "git_sha": _git_sha(),
        "rows": rows,
        "checks": checks,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
