"""Shared helpers for the fastav kernels: backend switch, launch settings, counter-based randomness.

Backend switch. Every public op in ``kernels`` has two implementations: a Triton kernel (host launcher
``foo_triton``) and a plain-PyTorch reference ``foo_ref`` that is also the specification. ``foo`` dispatches:

- ``"ref"``: always the reference;
- ``"triton"``: always Triton, and a ``RuntimeError`` where Triton cannot run;
- ``"auto"`` (default): Triton where it can run, else the reference.

Triton can run when the kernels were decorated under the interpreter (``TRITON_INTERPRET=1`` set before
``kernels`` was imported; tensors may then live anywhere) or when every tensor is on a CUDA device. The default
comes from the environment variable ``FASTAV_KERNELS`` (auto | triton | ref); ``set_backend`` changes it for the
process and ``use_backend`` for a ``with`` block (tests).

Launch settings. On a GPU the host launchers (``Launcher``) choose block sizes among a short list of candidates per
kernel: benchmarked once per machine and tuning key, the winner kept on disk so that every rank and every resumed
run launches the same config (``FASTAV_KERNEL_TUNING=cache``, the default), or the first candidate without any
benchmark (``fixed``: tests, and runs that must match across machines). ``kernels.aot`` compiles every candidate
for sm_90 in CI. Under the interpreter tuning would only re-run numpy simulations, so the launchers call the plain
kernel with one fixed config sized for the interpreter (large tiles: fewer Python-level loop iterations).

Randomness. Sampling kernels draw from Philox (``tl.philox``) keyed by a device tensor ``rng = [seed, offset]``
(int64, shape (2,)): counter word 0 = flat element index, words 1-2 = ``offset`` (low, high), word 3 = a stream id
``(stream << 4) | op``. A step is reproducible from ``rng`` alone and needs no host value; ``advance_rng`` moves
``offset`` on the device between steps. The references draw the same numbers from the same counters with a
Philox written in torch ops (``philox_uniform_ref``), so a reference op selects exactly what its kernel selects
and, like the kernel, never reads ``rng`` on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BACKENDS = ("auto", "triton", "ref")
TUNING_MODES = ("cache", "fixed")

_backend: str | None = None  # None: not set in this process; the environment variable decides at first use
_tuning: str | None = None


def _from_env(variable: str, default: str, accepted: Sequence[str]) -> str:
    """A setting's environment variable, checked when first used (a bad value fails the call that needs it, with a
    message naming the variable; importing ``kernels`` never fails)."""
    value = os.environ.get(variable, default)
    if value not in accepted:
        raise ValueError(f"{variable}={value!r}: expected one of {', '.join(accepted)} (or unset: {default})")
    return value


# --------------------------------------------------------------------------------------------------------------
# backend switch
# --------------------------------------------------------------------------------------------------------------


def set_backend(name: str) -> None:
    """Set the process-wide kernel backend: "auto" (Triton where it can run, else the reference), "triton", "ref"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    """The process-wide kernel backend ("auto", "triton" or "ref"): the last ``set_backend``, else
    ``$FASTAV_KERNELS``, else "auto"."""
    return _backend if _backend is not None else _from_env("FASTAV_KERNELS", "auto", BACKENDS)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block (restores the previous one on exit)."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (it then runs on numpy, any device)."""
    return isinstance(kernel, InterpretedFunction)


def triton_can_run(tensors: Sequence[torch.Tensor], interpreted: bool) -> bool:
    """Whether a Triton kernel can take ``tensors``: always under the interpreter, else only CUDA tensors."""
    return interpreted or all(t.is_cuda for t in tensors)


def use_triton(kernel: Any, *tensors: torch.Tensor) -> bool:
    """Dispatch decision for one call: True for the Triton path, False for the reference path.

    Raises RuntimeError when the backend is "triton" but Triton cannot run on these tensors.
    """
    if _backend == "ref":
        return False
    runnable = triton_can_run(tensors, is_interpreted(kernel))
    if _backend == "triton" and not runnable:
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"kernels backend is 'triton' but Triton cannot run on tensors on {devices} "
            "(needs CUDA tensors, or TRITON_INTERPRET=1 set before importing kernels)"
        )
    return runnable


# --------------------------------------------------------------------------------------------------------------
# launch settings
# --------------------------------------------------------------------------------------------------------------


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(triton.next_power_of_2(max(int(n), 1)), minimum)


def interp_block(n: int, cap: int, minimum: int = 1) -> int:
    """Interpreter block size: the whole extent rounded up to a power of two, capped (fewer Python-level steps)."""
    return min(next_pow2(n, minimum), cap)


def configs(space: Sequence[dict[str, int]], num_warps: Sequence[int] = (4,), num_stages: Sequence[int] = (2,)):
    """Cartesian product of block-size dicts x warps x stages as ``triton.Config`` objects (the first is the fixed
    config of ``FASTAV_KERNEL_TUNING=fixed``, so list the preferred one first)."""
    return [
        triton.Config(dict(meta), num_warps=w, num_stages=s) for meta in space for w in num_warps for s in num_stages
    ]


def set_tuning(mode: str) -> None:
    """How GPU launchers pick a config: "cache" (benchmark once per machine, kept on disk) or "fixed" (first config)."""
    global _tuning
    if mode not in TUNING_MODES:
        raise ValueError(f"tuning {mode!r}: expected one of {TUNING_MODES}")
    _tuning = mode


def get_tuning() -> str:
    """The process-wide tuning mode ("cache" or "fixed"): the last ``set_tuning``, else ``$FASTAV_KERNEL_TUNING``,
    else "cache"."""
    return _tuning if _tuning is not None else _from_env("FASTAV_KERNEL_TUNING", "cache", TUNING_MODES)


@contextlib.contextmanager
def use_tuning(mode: str) -> Iterator[None]:
    """Use tuning mode ``mode`` inside a ``with`` block."""
    previous = get_tuning()
    set_tuning(mode)
    try:
        yield
    finally:
        set_tuning(previous)


def tuning_dir() -> Path:
    """Where tuned configs are kept: ``$FASTAV_TUNING_DIR``, else ``~/.cache/fastav/tuning``."""
    return Path(os.environ.get("FASTAV_TUNING_DIR") or Path.home() / ".cache" / "fastav" / "tuning")


def config_name(config: Any) -> str:
    """A stable text form of a ``triton.Config`` (block sizes, warps, stages)."""
    meta = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{meta};warps={config.num_warps};stages={config.num_stages}"


def tuned_config(path: Path, key: str, candidates: Sequence[Any], bench: Callable[[Any], float]) -> Any:
    """The config of ``candidates`` with the least ``bench`` time for tuning ``key``, remembered in ``path``.

    The first process to need a key takes an exclusive lock on ``path``, benchmarks every candidate and writes the
    winner; any other process (another rank, a resumed run) waits on the lock and reads the same answer, so all
    processes sharing ``path`` launch the same config. ``path`` is specific to the kernel source, the candidate
    list and the device (see ``Launcher``), so a changed kernel or GPU tunes afresh.
    """
    names = [config_name(c) for c in candidates]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
            entry = table.get(key)
            if entry is None or entry.get("config") not in names:
                timings = {name: float(bench(c)) for name, c in zip(names, candidates, strict=True)}
                best = min(timings, key=timings.__getitem__)
                if not math.isfinite(timings[best]):
                    raise RuntimeError(f"no config of {path.stem} could run for {key}: {timings}")
                table[key] = entry = {"config": best, "ms": timings}
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
                tmp.replace(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return candidates[names.index(entry["config"])]


class Launcher:
    """One kernel, launched plainly with a fixed config under the interpreter, tuned on a GPU.

    A call passes the positional kernel arguments, the constexprs the host fixes (e.g. ``BLOCK_K``), the fixed
    interpreter values of the tuned meta-parameters (``interp_meta``, ignored on a GPU) and ``grid``, a function of
    the meta-parameters (dict) giving the launch grid.

    On a GPU the candidates are ``autotune_configs`` (or, when it is a function, what it returns for the named
    arguments: a space per dtype). With tuning "fixed" (``FASTAV_KERNEL_TUNING=fixed``, ``set_tuning``) the first
    candidate runs, with no benchmarking. With "cache" (default) the first launch of a tuning key (the ``key``
    arguments, the tensor dtypes and the constexprs) benchmarks the candidates once per machine (``tuned_config``,
    in ``tuning_dir()``), and every process then launches that config. Every kernel here is out-of-place and
    deterministic given its inputs, so the benchmark's repeated runs are harmless.
    """

    def __init__(
        self, kernel: Any, autotune_configs: list[Any] | Callable[[dict[str, Any]], list[Any]], key: list[str]
    ) -> None:
        self.kernel = kernel
        self._configs = autotune_configs
        self._key = key
        self._chosen: dict[str, Any] = {}

    @property
    def interpreted(self) -> bool:
        return is_interpreted(self.kernel)

    def _named(self, args: Sequence[Any], constexprs: dict[str, Any]) -> dict[str, Any]:
        return {**dict(zip(self.kernel.arg_names, args, strict=False)), **constexprs}

    def configs_for(self, args: Sequence[Any], constexprs: dict[str, Any]) -> list[Any]:
        """The candidate configs for these arguments; the first is the fixed one."""
        space = self._configs(self._named(args, constexprs)) if callable(self._configs) else self._configs
        if not space:
            raise ValueError(f"{self.name}: no config for these arguments")
        return list(space)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def tuning_key(self, args: Sequence[Any], constexprs: dict[str, Any]) -> str:
        """What a tuned config is remembered under: the ``key`` arguments, tensor dtypes and constexprs."""
        named = self._named(args, constexprs)
        dtypes = [str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)]
        return repr(([named[k] for k in self._key], dtypes, sorted(constexprs.items())))

    def _tuning_path(self, candidates: Sequence[Any], device: torch.device) -> Path:
        source = getattr(self.kernel, "cache_key", None) or inspect.getsource(self.kernel.fn)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            where = f"{props.name} sm_{props.major}{props.minor}"
        else:
            where = device.type
        what = [source, triton.__version__, where]
        digest = hashlib.sha256("\n".join(what + [config_name(c) for c in candidates]).encode()).hexdigest()
        return tuning_dir() / f"{self.name}-{digest[:16]}.json"

    def choose(self, args: Sequence[Any], constexprs: dict[str, Any], bench: Callable[[Any], float]) -> Any:
        """The config to launch (see the class docstring); ``bench(config)`` times one candidate in ms."""
        candidates = self.configs_for(args, constexprs)
        if _tuning == "fixed" or len(candidates) == 1:
            return candidates[0]
        key = self.tuning_key(args, constexprs)
        if key not in self._chosen:
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            self._chosen[key] = tuned_config(self._tuning_path(candidates, device), key, candidates, bench)
        return self._chosen[key]

    def _launch(self, grid: Callable[[dict[str, Any]], tuple[int, ...]], args, constexprs, config) -> None:
        meta = {**constexprs, **config.kwargs}
        self.kernel[grid(meta)](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)

    def _bench(self, grid, args, constexprs, config) -> float:
        import triton.testing
        from triton.runtime.errors import OutOfResources

        try:
            return triton.testing.do_bench(lambda: self._launch(grid, args, constexprs, config))
        except OutOfResources:  # e.g. more shared memory than this GPU has: never the choice
            return math.inf

    def __call__(
        self,
        grid: Callable[[dict[str, Any]], tuple[int, ...]],
        args: Sequence[Any],
        constexprs: dict[str, Any],
        interp_meta: dict[str, int],
    ) -> None:
        if self.interpreted:
            meta = {**constexprs, **interp_meta}
            self.kernel[grid(meta)](*args, **meta)
            return
        config = self.choose(args, constexprs, lambda cfg: self._bench(grid, args, constexprs, cfg))
        self._launch(grid, args, constexprs, config)


# --------------------------------------------------------------------------------------------------------------
# counter-based randomness
# --------------------------------------------------------------------------------------------------------------


def new_rng(seed: int, device: torch.device | str | None = None, offset: int = 0) -> torch.Tensor:
    """A sampling state ``[seed, offset]`` (int64, shape (2,)) on ``device``: pass it to every sampling op."""
    if not 0 <= seed < 2**63 or not 0 <= offset < 2**62:
        raise ValueError(f"seed {seed} / offset {offset}: expected 0 <= seed < 2**63, 0 <= offset < 2**62")
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def advance_rng(rng: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Move the offset of ``rng`` forward in place on its device (no host sync); returns ``rng``."""
    check_rng(rng)
    rng[1:].add_(steps)
    return rng


def check_rng(rng: torch.Tensor) -> None:
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        got = f"{tuple(rng.shape)} {rng.dtype}" if isinstance(rng, torch.Tensor) else type(rng).__name__
        raise ValueError(f"rng must be an int64 tensor of shape (2,) = [seed, offset] (see new_rng), got {got}")


def stream_id(stream: int, op: int) -> int:
    """Philox counter word 3 for one op of one call site: ``(stream << 4) | op`` (op < 16)."""
    if not 0 <= stream < 2**27:
        raise ValueError(f"stream {stream}: expected 0 <= stream < 2**27")
    return (stream << 4) | op


@triton.jit
def philox_uniform(rng_ptr, counter, STREAM: tl.constexpr):
    """Two independent U(0, 1) blocks (open interval) for integer ``counter`` block, from ``rng = [seed, offset]``.

    24 random bits each, mapped to (k + 0.5) / 2**24: never exactly 0 or 1, so log(u) and log(-log(u)) are finite.
    """
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1)
    c0 = counter.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + STREAM
    r0, r1, _, _ = tl.philox(seed, c0, c1, c2, c3)
    u0 = ((r0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    u1 = ((r1 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return u0, u1


# Gumbel keys of zero weights sit in a tier of their own, below every positive weight: log(w) + G lies in about
# [-107, 106] for positive fp32 w (log of the smallest subnormal is -103.3, G = -log(E) with E = -log(u), u in
# (2**-25, 1 - 2**-25)), while zero weights get ZERO_TIER + G, about [-1003, -983]. So zero-weight items come
# after all positive ones, in uniformly random order (what torch.multinomial does in practice, docs/methods/stella.md).
ZERO_TIER_F = -1000.0
ZERO_TIER = tl.constexpr(ZERO_TIER_F)


def assert_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


_M32 = 0xFFFFFFFF
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)


def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the uint32 constant ``a`` and uint32 values ``x`` (int64).

    ``a`` is split into 16-bit halves so that no intermediate leaves int64's positive range.
    """
    hi16 = (a >> 16) * x  # < 2**48
    lo16 = (a & 0xFFFF) * x  # < 2**48
    high = (hi16 + (lo16 >> 16)) >> 16
    low = (((hi16 & 0xFFFF) << 16) + lo16) & _M32
    return high, low


def philox_ref(
    seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, n_rounds: int = 10
) -> tuple[torch.Tensor, ...]:
    """Philox4x32 in torch int64 ops, bit-identical to ``tl.philox(seed, c0, c1, c2, c3)`` with uint32 counters.

    Args:
        seed: int64 scalar tensor (its low and high 32-bit words are the key, as ``tl.philox`` splits it).
        c0..c3: int64 tensors holding uint32 values (broadcastable).

    Returns:
        four int64 tensors holding uint32 values. Runs on the tensors' device; reads nothing on the host.
    """
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY[0]) & _M32
        k1 = (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def philox_uniform_ref(rng: torch.Tensor, counter: torch.Tensor, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``philox_uniform``: the same two U(0, 1) float32 tensors for int64 ``counter`` (any shape).

    Bit-identical to the kernels' draws for the same ``rng``, counter and stream id, so a reference op and its
    kernel select the same items; computed on ``rng``'s device with no host read (no sync on CUDA).
    """
    check_rng(rng)
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream id {stream}: expected a uint32")
    offset = rng[1]
    c0 = counter.to(device=rng.device, dtype=torch.int64) & _M32
    r0, r1, _, _ = philox_ref(rng[0], c0, offset & _M32, (offset >> 32) & _M32, torch.full_like(c0, stream))
    scale = 1.0 / 16777216.0
    return ((r0 >> 8).to(torch.float32) + 0.5) * scale, ((r1 >> 8).to(torch.float32) + 0.5) * scale


def flat_counter(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row-major flat element indices of a ``shape`` tensor: the counter word 0 the kernels use (``b * L + l``)."""
    return torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(tuple(shape))


def gumbel_keys_ref(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Reference Gumbel-top-k keys: log(w) + G for w > 0, ZERO_TIER + G for w <= 0 or NaN (fp32)."""
    w = torch.nan_to_num(weights.float(), nan=0.0).clamp_min(0.0)
    g = -torch.log(-torch.log(u))
    return torch.where(w > 0, torch.log(torch.where(w > 0, w, 1.0)), torch.full_like(w, ZERO_TIER_F)) + g
