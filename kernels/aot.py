"""Ahead-of-time compile of every kernel config for a GPU that is not there, and what its machine code says.

The interpreter runs a kernel's Python, not Triton's compiler, so the CPU suite alone cannot see whether a
kernel compiles, spills registers or reaches the tensor cores. This module compiles each launch the way the JIT
would on an H100 / H200 (sm_90), without a GPU:

1. **Launches**: the host wrappers (``*_triton``) are called at STELLA's sizes on empty CPU tensors laid out as
   the model makes them (Q and K as head views of a (B, L, H*E) projection), with ``Launcher.__call__``
   intercepted, so each kernel's arguments are exactly those a training step passes (:func:`stella_launches`).
2. **Specialisation**: the arguments go through the JIT's own binder for the target (``native_specialize_impl``):
   an integer equal to 1 becomes a constant, integers and pointers divisible by 16 get the alignment hint, as at
   run time. Launches that specialise identically are compiled once.
3. **Compile**: ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` with each config the launcher may pick,
   bypassing the cache, timed. ptxas runs with ``-v`` (Triton always passes it); its log gives registers and
   spill bytes.
4. **Machine code**: the cubin's SASS (``cuobjdump -sass``; Triton ships cuobjdump) is counted by opcode, over
   the whole kernel and over the body of its main loop (what a thread runs per iteration): tensor-core MMAs
   (``HGMMA`` on sm_90, ``HMMA``), MUFU, shuffles, shared stores, barriers, local loads / stores. Without
   cuobjdump the PTX stands in (``wgmma`` / ``mma`` instructions; no loop counts).

``python bench/kernels.py --compile`` prints the table; ``tests/kernels/test_compile_sm90.py`` fails on a config
that spills or uses local memory, exceeds an H100 block's shared memory, or, for the matrix kernels (attention
importance, bf16 and fp32), has no MMA or more than ``LOOP_BARRIERS`` barriers per loop iteration.
Import this module without ``TRITON_INTERPRET`` (the kernels must be JIT functions, not interpreter objects).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kernels import _utils

H, E, L_A, L_V, K_A, K_V = 12, 64, 512, 784, 256, 392
SCALE, TAU = 0.125, 0.4
H100_SHARED_BYTES = 227 * 1024  # the most dynamic shared memory one block may use on sm_90
MATRIX_KERNELS = ("_row_stats_kernel", "_col_accum_kernel")  # the tl.dot kernels: must use tensor cores
LOOP_BARRIERS = 2
"""Block-wide barriers a matrix kernel's main loop may execute per iteration: the two of its software pipeline
(operand tile ready, stage released). A sum across warps (down the MMA rows) adds shared-memory stores and
barriers every iteration: 3 to 5 in the importance kernel's second pass before its keys moved onto the rows."""

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;\n]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
_PTX_MMA = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async|mma\.sync)", re.MULTILINE)


@dataclass
class Launch:
    """One kernel launch as a host wrapper makes it: the launcher, its positional arguments and constexprs."""

    case: str
    launcher: _utils.Launcher
    args: tuple[Any, ...]
    constexprs: dict[str, Any]

    @property
    def kernel_name(self) -> str:
        return self.launcher.kernel.fn.__name__


@dataclass
class Compiled:
    """What one (kernel specialisation, config) compiled to."""

    kernel: str
    cases: list[str]
    dtype: str
    config: str
    warps: int
    stages: int
    seconds: float
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    stack: int = 0
    """Per-thread stack frame (local memory) bytes."""
    ops: dict[str, int] = field(default_factory=dict)
    """Static SASS opcode counts (or PTX when no cuobjdump): mma, shfl, sts, bar, local."""
    source: str = "sass"

    @property
    def spills(self) -> bool:
        """Register spills or any other local-memory use (stack frame, LDL / STL in the SASS)."""
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack > 0 or self.ops.get("local", 0) > 0

    def row(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "cases": self.cases,
            "dtype": self.dtype,
            "config": self.config,
            "registers": self.registers,
            "spill_bytes": self.spill_stores + self.spill_loads,
            "stack_bytes": self.stack,
            "shared_bytes": self.shared,
            "compile_s": round(self.seconds, 2),
            "counted_in": self.source,
            **self.ops,
        }


# --------------------------------------------------------------------------------------------------------------
# launches
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture() -> Iterator[list[tuple[_utils.Launcher, tuple, dict]]]:
    """Inside the block, ``Launcher`` calls record (launcher, args, constexprs) instead of launching."""
    calls: list[tuple[_utils.Launcher, tuple, dict]] = []
    original = _utils.Launcher.__call__

    def record(self, grid, args, constexprs, interp_meta):  # noqa: ARG001 - same signature as Launcher.__call__
        calls.append((self, tuple(args), dict(constexprs)))

    _utils.Launcher.__call__ = record  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        _utils.Launcher.__call__ = original  # type: ignore[method-assign]


def _heads(B: int, L: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, L, E) as the AVM makes it: a head view of a (B, L, H*E) projection (fastav/models/avm.py)."""
    return torch.empty(B, L, H * E, dtype=dtype).view(B, L, H, E).transpose(1, 2)


def stella_launches(batch: int = 48, dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32)) -> list[Launch]:
    """Every kernel launch of one STELLA step's selection path (tests/kernels/test_patch_select.py ``_stella_step``)
    with ``batch`` current samples and as many replayed ones, per Q / K / pixel dtype."""
    # the package exports functions under the module names, so import the modules by path
    ai = importlib.import_module("kernels.attention_importance")
    cs = importlib.import_module("kernels.chunk_select")
    pg = importlib.import_module("kernels.patch_gather")
    rc = importlib.import_module("kernels.replay_correlation")
    ws = importlib.import_module("kernels.weighted_sample")

    B, rows = batch, 2 * batch
    f32 = torch.float32
    out: list[Launch] = []

    def run(case: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with capture() as calls:
            fn(*args, **kwargs)
        out.extend(Launch(f"{case} B={batch}", launcher, a, c) for launcher, a, c in calls)

    rng = torch.zeros(2, dtype=torch.int64)
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        q_a, k_a, q_v, k_v = _heads(B, L_A, dt), _heads(B, L_A, dt), _heads(B, L_V, dt), _heads(B, L_V, dt)
        i_a, i_v = torch.empty(B, L_A), torch.empty(B, L_V)
        c_a, c_v = torch.empty(B, L_A, dtype=torch.bool), torch.empty(B, L_V, dtype=torch.bool)
        past, cur = torch.empty(B, H, E), torch.empty(B, H, E)
        run(f"importance I_v {name}", ai.attention_importance_triton, q_a, k_v, SCALE, TAU)
        run(f"importance I_a {name}", ai.attention_importance_triton, q_v, k_a, SCALE, TAU)
        run(f"pooled query a {name}", ai.pooled_query_triton, q_a, i_a, c_a)
        run(f"pooled query v {name}", ai.pooled_query_triton, q_v, i_v, c_v)
        run(f"replay correlation v {name}", rc.replay_correlation_triton, past, cur, k_v, SCALE, c_v)
        run(f"replay correlation a {name}", rc.replay_correlation_triton, past, cur, k_a, SCALE, c_a)
        video, fbank = torch.empty(rows, 4, 3, 224, 224, dtype=dt), torch.empty(rows, 1024, 128, dtype=dt)
        ids_v, ids_a = torch.empty(rows, K_V, dtype=torch.int64), torch.empty(rows, K_A, dtype=torch.int64)
        run(f"gather video {name}", pg.gather_video_patches_triton, video, ids_v)
        run(f"gather audio {name}", pg.gather_audio_patches_triton, fbank, ids_a)
    imp_v, imp_a = torch.empty(rows, L_V, dtype=f32), torch.empty(rows, L_A, dtype=f32)
    run("candidates C_v", ws.topk_indices_triton, imp_v[:B], K_V)
    run("candidates C_a", ws.topk_indices_triton, imp_a[:B], K_A)
    run("first step video", ws.topk_indices_triton, imp_v, K_V)
    run("prune video", ws.prune_weights_triton, imp_v, torch.empty_like(imp_v), rng)
    run("sample video", ws.weighted_sample_triton, imp_v, K_V, rng)
    run("prune audio", ws.bernoulli_prune_triton, torch.empty_like(imp_a), rng)
    run("chunk select audio", cs.chunk_select_triton, imp_a, torch.empty(rows, L_A, dtype=torch.bool), K_A, rng)
    return out


# --------------------------------------------------------------------------------------------------------------
# specialisation and compile
# --------------------------------------------------------------------------------------------------------------


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def specialize(launch: Launch, config: Any, target: Any = None) -> tuple[Any, Any, str]:
    """(ASTSource, options, cache key) the JIT would build for ``launch`` run with ``config`` on ``target``.

    The same steps as ``JITFunction.run``: bind the arguments with the target backend's specialisation, then
    ``_pack_args`` into signature, constexprs and attributes.
    """
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.launcher.kernel
    if _utils.is_interpreted(fn):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1: nothing to compile")
    backend = make_backend(target or _target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, **config.all_kwargs()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = repr((fn.fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items())))
    return ASTSource(fn, signature, constexprs, attrs), options, key + str(options)


def _tool(name: str) -> str | None:
    from triton import knobs

    try:
        path = getattr(knobs.nvidia, name).path
    except (AttributeError, RuntimeError):
        path = None
    return path if path and os.access(path, os.X_OK) else shutil.which(name)


def sass_ops(cubin: bytes) -> dict[str, int] | None:
    """Opcode counts of a cubin's SASS (None when no cuobjdump is available): static counts over the whole kernel,
    and ``loop_*`` counts over the body of its main loop (the backward branch's span holding the most MUFU, i.e.
    the exp2 of the logits tile), which a thread executes once per iteration."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    program = [(int(addr, 16), op, rest) for addr, op, rest in _INSTRUCTION.findall(sass)]

    def count(ops: Sequence[str]) -> dict[str, int]:
        def n(*names: str) -> int:
            return sum(op in names for op in ops)

        return {"mma": n("HGMMA", "HMMA"), "mufu": n("MUFU"), "shfl": n("SHFL"), "sts": n("STS"), "bar": n("BAR")}

    ops = [op for _, op, _ in program]
    out = {**count(ops), "local": sum(op in ("LDL", "STL") for op in ops)}
    loops = []
    for addr, op, rest in program:
        target = _BRANCH_TARGET.search(rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loops.append(count([o for a, o, _ in program if int(target.group(1), 16) <= a <= addr]))
    if loops:
        main = max(loops, key=lambda c: c["mufu"])
        out |= {f"loop_{k}": v for k, v in main.items()}
    return out


def ptx_ops(ptx: str) -> dict[str, int]:
    """Fallback counts from the PTX: tensor-core instructions only (registers and spills come from ptxas -v)."""
    return {"mma": len(_PTX_MMA.findall(ptx))}


def _ptxas_figures(log: str) -> tuple[int, int, int, int]:
    """(registers, stack frame bytes, spill store bytes, spill load bytes) from ptxas -v."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise RuntimeError(f"no ptxas -v figures in its log:\n{log[-2000:]}")
    return int(regs.group(1)), int(frame.group(1)), int(frame.group(2)), int(frame.group(3))


def compile_one(launch: Launch, config: Any, target: Any = None, sass: bool = True) -> Compiled:
    """Compile ``launch`` with ``config`` for sm_90 (no cache) and read its resources back; ``sass=False`` skips
    the disassembly (about a second per kernel), leaving the PTX's tensor-core count and ptxas's figures."""
    import triton
    from triton import knobs

    src, options, _ = specialize(launch, config, target)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        try:
            compiled = triton.compile(src, target=target or _target(), options=options.__dict__)
        except Exception as exc:
            raise RuntimeError(f"{launch.kernel_name} {config}: {exc}") from exc
        seconds = time.perf_counter() - start
    regs, frame, spill_st, spill_ld = _ptxas_figures(log.getvalue())
    ops = sass_ops(compiled.asm["cubin"]) if sass else None
    largest = max((a for a in launch.args if isinstance(a, torch.Tensor)), key=torch.Tensor.numel)
    dtype = str(largest.dtype).removeprefix("torch.")  # the data the kernel streams (Q / K, pixels, weights)
    return Compiled(
        kernel=launch.kernel_name,
        cases=[launch.case],
        dtype=dtype,
        config=_config_name(config),
        warps=config.num_warps,
        stages=config.num_stages,
        seconds=seconds,
        registers=regs,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared=int(compiled.metadata.shared),
        stack=frame,
        ops=ops if ops is not None else ptx_ops(compiled.asm["ptx"]),
        source="sass" if ops is not None else "ptx",
    )


def _config_name(config: Any) -> str:
    meta = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in config.kwargs.items())
    return f"{meta} w{config.num_warps} s{config.num_stages}".strip()


def compile_all(
    launches: Sequence[Launch],
    progress: Callable[[Compiled], None] | None = None,
    target: Any = None,
    sass: Callable[[Launch], bool] = lambda launch: True,
) -> list[Compiled]:
    """Every config of every distinct launch specialisation, compiled once each (launches that specialise alike,
    e.g. I_v and I_a, share a row that lists both cases); ``sass(launch)`` says whether to disassemble it."""
    done: dict[str, Compiled] = {}
    for launch in launches:
        for config in launch.launcher.configs_for(launch.args, launch.constexprs):
            _, _, key = specialize(launch, config, target)
            if key in done:
                done[key].cases.append(launch.case)
                continue
            done[key] = compile_one(launch, config, target, sass=sass(launch))
            if progress is not None:
                progress(done[key])
    return list(done.values())


def problems(results: Sequence[Compiled]) -> list[str]:
    """What would make a config unusable or slow on an H100: spills, too much shared memory, no tensor cores."""
    out = []
    for r in results:
        name = f"{r.kernel} [{r.config}] ({', '.join(r.cases)})"
        if r.spills:
            out.append(
                f"{name}: spills ({r.spill_stores} B stored, {r.spill_loads} B loaded, {r.stack} B stack frame, "
                f"{r.ops.get('local', 0)} local-memory instructions)"
            )
        if r.shared > H100_SHARED_BYTES:
            out.append(f"{name}: {r.shared} bytes of shared memory, more than an H100 block may use")
        if r.kernel in MATRIX_KERNELS and r.ops.get("loop_bar", 0) > LOOP_BARRIERS:
            out.append(
                f"{name}: {r.ops['loop_bar']} barriers per iteration of the main loop (at most {LOOP_BARRIERS}: a "
                f"reduction across warps or operands staged through shared memory; {r.ops.get('loop_shfl')} "
                f"shuffles, {r.ops.get('loop_sts')} shared stores per iteration)"
            )
        if r.kernel in MATRIX_KERNELS and r.ops.get("mma", 0) == 0:
            where = "no HGMMA / HMMA in the SASS" if r.source == "sass" else "no wgmma / mma in the PTX"
            out.append(f"{name}: no tensor-core instruction ({where})")
    return out


def format_table(results: Sequence[Compiled]) -> str:
    head = (
        f"{'kernel':<28}{'dtype':<10}{'config':<26}{'regs':>5}{'spill B':>8}{'stack':>6}{'shared':>8}{'mma':>5}"
        f"{'loop: shfl':>11}{'sts':>5}{'bar':>5}{'compile s':>10}  cases"
    )
    lines = [head]
    for r in results:
        o = r.ops
        lines.append(
            f"{r.kernel:<28}{r.dtype:<10}{r.config:<26}{r.registers:>5}{r.spill_stores + r.spill_loads:>8}{r.stack:>6}"
            f"{r.shared:>8}{o.get('mma', 0):>5}{o.get('loop_shfl', '-'):>11}{o.get('loop_sts', '-'):>5}"
            f"{o.get('loop_bar', '-'):>5}{r.seconds:>10.2f}  {', '.join(r.cases)}"
        )
    return "\n".join(lines)
