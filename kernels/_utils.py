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

Launch settings. On a GPU the host launchers choose block sizes with ``triton.autotune`` (configs below, keyed on
the problem sizes). Under the interpreter autotuning would only re-run numpy simulations, so the launchers call the
plain kernel with one fixed config sized for the interpreter (large tiles: fewer Python-level loop iterations).

Randomness. Sampling kernels draw from Philox (``tl.philox``) keyed by a device tensor ``rng = [seed, offset]``
(int64, shape (2,)): counter word 0 = flat element index, words 1-2 = ``offset`` (low, high), word 3 = a stream id
``(stream << 4) | op``. A step is reproducible from ``rng`` alone and needs no host value; ``advance_rng`` moves
``offset`` on the device between steps. The references draw the same numbers from the same counters with a
Philox written in torch ops (``philox_uniform_ref``), so a reference op selects exactly what its kernel selects
and, like the kernel, never reads ``rng`` on the host.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

BACKENDS = ("auto", "triton", "ref")

_backend = os.environ.get("FASTAV_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"FASTAV_KERNELS={_backend!r}: expected one of {BACKENDS}")


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
    """The process-wide kernel backend ("auto", "triton" or "ref")."""
    return _backend


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
    """Cartesian product of block-size dicts x warps x stages as ``triton.Config`` objects for ``triton.autotune``."""
    return [
        triton.Config(dict(meta), num_warps=w, num_stages=s) for meta in space for w in num_warps for s in num_stages
    ]


class Launcher:
    """One kernel, launched plainly with a fixed config under the interpreter, autotuned on a GPU.

    A call passes the positional kernel arguments, the constexprs the host fixes (e.g. ``BLOCK_K``), the fixed
    interpreter values of the tuned meta-parameters (``interp_meta``, ignored on a GPU) and ``grid``, a function of
    the meta-parameters (dict) giving the launch grid. The autotuner (keyed on ``key``, plus the argument dtypes,
    as ``triton.autotune`` does) is built on the first GPU launch, so the interpreter never benchmarks. Every
    kernel here is out-of-place and deterministic given its inputs, so the autotuner's repeated runs are harmless.
    """

    def __init__(self, kernel: Any, autotune_configs: list[Any], key: list[str]) -> None:
        self.kernel = kernel
        self._configs = autotune_configs
        self._key = key
        self._tuned: Any = None

    @property
    def interpreted(self) -> bool:
        return is_interpreted(self.kernel)

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
        if self._tuned is None:
            self._tuned = triton.autotune(configs=self._configs, key=self._key)(self.kernel)
        self._tuned[grid](*args, **constexprs)


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
# after all positive ones, in uniformly random order (what torch.multinomial does in practice, stella.md §4.1).
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
