"""Every kernel, every config its launcher may pick, compiled for an H100 / H200 (sm_90) without a GPU, as the JIT
would specialise the arguments a STELLA step passes; the machine code must not spill, must fit an H100 block's
shared memory, and the matrix kernels must run on the tensor cores with their reductions inside warps (at most the
software pipeline's two barriers per loop iteration; ``kernels/aot.py`` explains how).

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every CPU test and still fail
to compile, spill registers every iteration or miss the tensor cores. The compile runs in a subprocess because the
test session imports the kernels under ``TRITON_INTERPRET=1``, where ``@triton.jit`` gives interpreter objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SKIP_CODE = 77  # the subprocess's "cannot compile here" exit status
BATCHES = (12, 48)  # STELLA's per-GPU batch and the total batch of its runs (B current + B replayed rows)
ROOT = Path(__file__).resolve().parents[2]


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        env=_subprocess_env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode == SKIP_CODE:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # 126 compiles: 1.6 min on 2 CPU cores, 5 to 7 min when other jobs share them
def test_every_config_compiles_for_sm90_without_spills_and_with_tensor_cores(tmp_path):
    out = tmp_path / "compiled.json"
    proc = _run(tmp_path, "compile", str(out))
    print(proc.stdout)  # the per-config table (pytest -s)
    report = json.loads(out.read_text())
    assert not report["problems"], "\n".join(report["problems"])
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == set(report["launchers"]), f"kernels never compiled: {set(report['launchers']) - kernels}"
    for row in rows:
        if row["kernel"] in ("_row_stats_kernel", "_col_accum_kernel"):
            assert row["mma"] > 0 and row["counted_in"] == "sass" and "loop_bar" in row, row
    assert report["compiled"] == report["expected"], "a candidate config of a launch was not compiled"


def test_arguments_are_specialised_as_the_jit_does(tmp_path):
    """A stride of 1 is a constant and sizes divisible by 16 carry the alignment hint, as at run time: compiling
    every integer as a plain i32 would check variants the JIT never launches."""
    proc = _run(tmp_path, "specialise")
    spec = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = spec["importance I_v bfloat16 B=48 _row_stats_kernel"]
    assert rows["signature"]["stride_qk"] == "constexpr" and rows["constexprs"]["stride_qk"] == 1
    assert rows["signature"]["stride_qm"] == "i32" and "stride_qm" in rows["aligned"]  # 768: divisible by 16
    assert rows["signature"]["H"] == "i32" and "H" not in rows["aligned"]  # 12 heads
    assert {"Q", "Kt", "LSE", "M", "N", "K"} <= set(rows["aligned"])
    sample = spec["sample video B=48 _rank_select_kernel"]
    assert "KSEL" not in sample["aligned"]  # 392 is not a multiple of 16


def _compile(out: str) -> None:
    from kernels import _utils, aot

    launches = [launch for b in BATCHES for launch in aot.stella_launches(b)]
    expected = {
        aot.specialize(launch, cfg)[2]
        for launch in launches
        for cfg in launch.launcher.configs_for(launch.args, launch.constexprs)
    }
    results = aot.compile_all(
        launches,
        progress=lambda r: print(aot.format_table([r]).splitlines()[1], flush=True),
        sass=lambda launch: launch.kernel_name in aot.MATRIX_KERNELS,  # the rest: ptxas's spill and stack figures
    )
    print(aot.format_table(results))
    launchers = {
        obj.name
        for mod in ("attention_importance", "chunk_select", "patch_gather", "replay_correlation", "weighted_sample")
        for obj in vars(__import__(f"kernels.{mod}", fromlist=["_"])).values()
        if isinstance(obj, _utils.Launcher)
    }
    report = {
        "rows": [r.row() for r in results],
        "problems": aot.problems(results),
        "launchers": sorted(launchers),
        "compiled": len(results),
        "expected": len(expected),
    }
    Path(out).write_text(json.dumps(report))
    print(f"compiled {len(results)} kernel variants for sm_90; {len(report['problems'])} problems")


def _specialise() -> None:
    from kernels import aot

    out = {}
    for launch in aot.stella_launches(48):
        config = launch.launcher.configs_for(launch.args, launch.constexprs)[0]
        src, _, _ = aot.specialize(launch, config)
        names = launch.launcher.kernel.arg_names
        aligned = [names[path[0]] for path, attr in src.attrs.items() if ["tt.divisibility", 16] in attr]
        out[f"{launch.case} {launch.kernel_name}"] = {
            "signature": src.signature,
            "constexprs": {names[path[0]]: v for path, v in src.constants.items() if isinstance(v, int | bool)},
            "aligned": aligned,
        }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        print(f"no NVIDIA backend in this Triton build: {exc}")
        sys.exit(SKIP_CODE)
    {"compile": lambda: _compile(sys.argv[2]), "specialise": _specialise}[sys.argv[1]]()
