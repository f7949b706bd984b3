"""Every kernel compiles for an H100 (sm_90) down to a cubin, for every block config the autotuner may pick,
and fits in the shared memory one H100 block may use (a config over it could never be chosen).

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every CPU test and still
fail to compile (unsupported op, dtype mismatch in ``tl.dot``, shape rules). Triton compiles ahead of time
without a GPU (``triton.compile`` with a ``GPUTarget``; ptxas ships with the wheel), so this test catches those
errors on a CPU-only machine (about 20 s on 2 cores, most of the kernel suite's time; not marked slow since the
whole suite stays well inside its budget). It runs in a subprocess because the test session imports the kernels under
``TRITON_INTERPRET=1``, where ``@triton.jit`` gives interpreter objects instead of compilable ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SKIP_CODE = 77  # the subprocess's "cannot compile here" exit status
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90 (opt-in limit)


def _compile_all() -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("must run without TRITON_INTERPRET")
    ai = importlib.import_module("kernels.attention_importance")
    rc = importlib.import_module("kernels.replay_correlation")
    ws = importlib.import_module("kernels.weighted_sample")
    cs = importlib.import_module("kernels.chunk_select")
    pg = importlib.import_module("kernels.patch_gather")
    target = GPUTarget("cuda", 90, 32)

    def blocks(launcher) -> list[tuple[dict, int, int]]:
        """The distinct block configs of a launcher, each with the largest warps / stages it is tried with."""
        best: dict[tuple, tuple[dict, int, int]] = {}
        for cfg in launcher._configs:
            key = tuple(sorted(cfg.kwargs.items()))
            _, w, s = best.get(key, (None, 0, 0))
            best[key] = (dict(cfg.kwargs), max(w, cfg.num_warps), max(s, cfg.num_stages))
        return list(best.values())

    def compile_each(launcher, signature: dict[str, str], constexprs: dict) -> int:
        n = 0
        for meta, warps, stages in blocks(launcher):
            const = {**constexprs, **meta}
            full = {**signature, **{name: "constexpr" for name in const}}
            sig = {name: full[name] for name in launcher.kernel.arg_names}  # KeyError: the signature is stale
            src = ASTSource(fn=launcher.kernel, signature=sig, constexprs=const)
            name = f"{launcher.kernel.fn.__name__} {const} warps={warps} stages={stages}"
            try:
                compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
            except Exception as exc:
                raise RuntimeError(f"{name}: {exc}") from exc
            shared = compiled.metadata.shared
            if shared > H100_SHARED_BYTES:  # the autotuner would drop it at run time; a config that can never run
                raise RuntimeError(f"{name}: {shared} bytes of shared memory, more than an H100 block may use")
            print(f"{name}: {shared} bytes shared")
            n += 1
        return n

    i32 = "i32"
    count = 0
    for dt in ("fp32", "bf16"):
        qk_strides = {n: i32 for n in ("stride_qb", "stride_qh", "stride_qm", "stride_qk")}
        qk_strides |= {n: i32 for n in ("stride_kb", "stride_kh", "stride_kn", "stride_kk")}
        sizes = {"H": i32, "M": i32, "N": i32, "K": i32, "qk_scale": "fp32"}
        flags = {"BLOCK_K": 64, "IEEE": dt == "fp32", "UPCAST": False}
        sig = {"Q": f"*{dt}", "Kt": f"*{dt}", "LSE": "*fp32", **qk_strides, **sizes}
        count += compile_each(ai._row_stats, sig, flags)
        sig = {"Q": f"*{dt}", "Kt": f"*{dt}", "LSE": "*fp32", "OUT": "*fp32", **qk_strides, **sizes}
        count += compile_each(ai._col_accum, sig, flags)
        sig = {"Q": f"*{dt}", "W": "*fp32", "C": "*u8", "OUT": "*fp32"}
        sig |= {n: i32 for n in ("stride_qb", "stride_qh", "stride_ql", "stride_qk", "H", "L", "K")}
        count += compile_each(ai._pooled, sig, {"BLOCK_K": 64})
        sig = {"QP": f"*{dt}", "QC": f"*{dt}", "Kp": f"*{dt}", "C": "*u8", "OUT": "*fp32"}
        sig |= {f"stride_{a}{b}": i32 for a in "pck" for b in ("b", "h", "k")}
        sig |= {"stride_kl": i32, "H": i32, "L": i32, "K": i32, "scale": "fp32"}
        count += compile_each(rc._launch, sig, {"BLOCK_K": 64})
        sig = {"X": f"*{dt}", "IDS": "*i64", "OUT": f"*{dt}"}
        sig |= {f"stride_x{a}": i32 for a in "btchw"} | {"stride_ib": i32, "stride_is": i32}
        sig |= {"NSEL": i32, "NPATCH": i32, "HPWP": i32, "WP": i32}
        count += compile_each(pg._launch, sig, {"C": 3, "P": 16, "BLOCK_PP": 256})
    sig = {"PI": "*fp32", "W": "*fp32", "PRUNED": "*u8", "WOUT": "*fp32", "RNG": "*i64", "N": i32}
    count += compile_each(ws._bernoulli, sig, {"STREAM": 16, "HAS_W": True})
    sig = {"W": "*fp32", "RNG": "*i64", "OUT": "*i64", "B": i32, "L": i32, "KSEL": i32}
    for random in (True, False):
        count += compile_each(ws._rank_select, sig, {"STREAM": 17, "RANDOM": random})
    sig = {"IMP": "*fp32", "PR": "*u8", "RNG": "*i64", "IDS": "*i64", "KEEP": "*u8"}
    sig |= {"B": i32, "NCH": i32, "S": i32, "KSEL": i32, "inv_times": "fp32"}
    count += compile_each(cs._launch, sig, {"STREAM": 34, "BLOCK_C": 16, "BLOCK_S": 32})
    print(f"compiled {count} kernel variants for sm_90")
    return count


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from an earlier cache
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode == SKIP_CODE:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel variants for sm_90" in proc.stdout


if __name__ == "__main__":
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        print(f"no NVIDIA backend in this Triton build: {exc}")
        sys.exit(SKIP_CODE)
    _compile_all()
