"""Which frames and which crop each clip contributes: CAV-MAE's and STELLA's rules, as plain functions.

Frame indices are computed per sample from the clip's own fps and frame count (the shard JSON), so clips
shorter than requested are handled the same way everywhere (the DALI pipeline and the reference loader call
these functions).

- **CAV-MAE** uses a 1-fps grid over at most the first 10 s: ``n = clamp(floor(total / fps), 1, 10)`` positions
  ``floor(i * total / n)`` with ``total = min(num_frames, 10 * fps)`` (for a 10-s clip: frames 0, fps, 2 fps ...,
  the frames the official extraction keeps). Train: one grid frame chosen uniformly. Eval: the middle one,
  ``grid[n // 2]`` (frame 5 of 10), or all of them for multi-frame evaluation, padded to 10 by repeating the last
  grid frame (so every clip yields the same number of frames).
- **STELLA** takes ``T`` frames 1 s apart (stride ``fps``). At train the start is uniform on the 1/fps grid over
  ``[0, num_frames - T * fps)``: the ``T``-second window stays inside the clip, as in STELLA's dataset (a 10-s clip
  at 8 fps starts at frames 0-47, 0 to 5.875 s, so its last second is never sampled). A clip too short for that
  (fewer than ``T * fps + 1`` frames) starts anywhere its ``(T - 1) * fps + 1`` frames fit. At eval the start is
  fixed at ``eval_start`` seconds (3 s in STELLA), clamped so the frames fit.
  **Padding rule** for clips shorter than the frames' span: the window starts at 0 and indices past the last
  frame repeat the last frame.

Crops (on frames that are square in the shards, but any size works):

- eval: the centre square of side ``min(H, W)``, then resized to the model's size (CAV-MAE's Resize + CenterCrop);
- STELLA train: ``GroupMultiScaleCrop`` (TSN): crop sides from ``short_side * {1, .875, .75}`` (snapped to the
  output size when within 3 px), aspect pairs at most one scale step apart, offsets from the fixed 13-position grid,
  the same crop for every frame of the clip;
- CAV-MAE train: no crop augmentation (the official loader has none), so the eval crop.
"""

from __future__ import annotations

import numpy as np

MULTI_FRAMES = 10


def cavmae_grid(num_frames: int, fps: float, max_seconds: float = 10.0) -> list[int]:
    """Frame indices of the clip's 1-fps grid over at most its first ``max_seconds``."""
    if num_frames <= 0:
        raise ValueError(f"clip has {num_frames} frames")
    total = min(num_frames, int(round(max_seconds * fps)))
    n = int(min(max(total // max(int(round(fps)), 1), 1), int(max_seconds)))
    return [i * total // n for i in range(n)]


def cavmae_frames(
    num_frames: int, fps: float, *, train: bool, rng: np.random.Generator, multi: bool = False
) -> list[int]:
    grid = cavmae_grid(num_frames, fps)
    if train:
        return [grid[int(rng.integers(len(grid)))]]
    if multi:
        return grid + [grid[-1]] * (MULTI_FRAMES - len(grid))
    return [grid[len(grid) // 2]]


def stella_frames(
    num_frames: int, fps: float, num_out: int, *, train: bool, rng: np.random.Generator, eval_start: float = 3.0
) -> list[int]:
    if num_frames <= 0:
        raise ValueError(f"clip has {num_frames} frames")
    stride = max(int(round(fps)), 1)
    span = (num_out - 1) * stride + 1
    last_start = num_frames - span
    if last_start < 0:
        start = 0
    elif train:
        starts = num_frames - num_out * stride  # the T-second window inside the clip (STELLA's rule)
        start = int(rng.integers(starts if starts > 0 else last_start + 1))
    else:
        start = min(max(int(round(eval_start * fps)), 0), last_start)
    return [min(start + i * stride, num_frames - 1) for i in range(num_out)]


def center_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the centred square of side min(height, width)."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def multiscale_crop(
    height: int,
    width: int,
    out_size: int,
    rng: np.random.Generator,
    scales: tuple[float, ...] = (1.0, 0.875, 0.75),
    max_distort: int = 1,
) -> tuple[int, int, int, int]:
    """TSN / STELLA ``GroupMultiScaleCrop`` with the fixed offset grid (``more_fix_crop``): (y0, x0, h, w)."""
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    snap = [out_size if abs(s - out_size) < 3 else s for s in sizes]
    pairs = [(w, h) for i, h in enumerate(snap) for j, w in enumerate(snap) if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    offsets = [
        (0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),
        (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),
        (1 * ws, 1 * hs), (3 * ws, 1 * hs), (1 * ws, 3 * hs), (3 * ws, 3 * hs),
    ]  # fmt: skip
    x0, y0 = offsets[int(rng.integers(len(offsets)))]
    return y0, x0, crop_h, crop_w
