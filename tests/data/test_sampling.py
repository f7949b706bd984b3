"""Frame-index and crop rules for a table of clip lengths (CAV-MAE grid, STELLA window, padding rule)."""

from __future__ import annotations

import numpy as np
import pytest

from fastav.data.sampling import MULTI_FRAMES, cavmae_frames, cavmae_grid, center_crop, multiscale_crop, stella_frames


@pytest.mark.parametrize(
    "num_frames, fps, grid",
    [
        (80, 8, [0, 8, 16, 24, 32, 40, 48, 56, 64, 72]),  # 10 s at 8 fps: the official 10 frames
        (100, 10, [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
        (96, 8, [0, 8, 16, 24, 32, 40, 48, 56, 64, 72]),  # 12 s: only the first 10 s
        (32, 8, [0, 8, 16, 24]),  # 4 s
        (31, 8, [0, 10, 20]),  # 3.9 s: 3 whole seconds spread over the clip
        (5, 8, [0]),  # shorter than a second
        (250, 25, [0, 25, 50, 75, 100, 125, 150, 175, 200, 225]),
    ],
)
def test_cavmae_grid(num_frames: int, fps: int, grid: list[int]) -> None:
    assert cavmae_grid(num_frames, fps) == grid
    rng = np.random.default_rng(0)
    assert cavmae_frames(num_frames, fps, train=False, rng=rng) == [grid[len(grid) // 2]]
    multi = cavmae_frames(num_frames, fps, train=False, rng=rng, multi=True)
    assert len(multi) == MULTI_FRAMES and multi[: len(grid)] == grid and set(multi[len(grid) :]) <= {grid[-1]}
    drawn = {cavmae_frames(num_frames, fps, train=True, rng=rng)[0] for _ in range(400)}
    assert drawn == set(grid)


@pytest.mark.parametrize(
    "num_frames, fps, eval_start, eval_frames, train_starts",
    [
        (80, 8, 3.0, [24, 32, 40, 48], range(0, 48)),  # 10 s: fixed window at 3 s, train start 0-5.875 s (STELLA)
        (33, 8, 3.0, [8, 16, 24, 32], range(0, 1)),  # 4 s + 1 frame: the 4-s window fits once
        (32, 8, 3.0, [7, 15, 23, 31], range(0, 8)),  # 4 s: too short for the 4-s window; wherever the frames fit
        (25, 8, 3.0, [0, 8, 16, 24], range(0, 1)),  # exactly the window
        (20, 8, 3.0, [0, 8, 16, 19], range(0, 1)),  # shorter: starts at 0, the last frame repeats
        (3, 8, 0.0, [0, 2, 2, 2], range(0, 1)),
        (300, 30, 3.0, [90, 120, 150, 180], range(0, 180)),
    ],
)
def test_stella_frames(num_frames, fps, eval_start, eval_frames, train_starts) -> None:
    rng = np.random.default_rng(0)
    assert stella_frames(num_frames, fps, 4, train=False, rng=rng, eval_start=eval_start) == eval_frames
    starts = set()
    for _ in range(3000):
        frames = stella_frames(num_frames, fps, 4, train=True, rng=rng)
        assert all(0 <= f < num_frames for f in frames)
        if num_frames >= 3 * fps + 1:
            assert np.all(np.diff(frames) == fps)
        starts.add(frames[0])
    assert starts == set(train_starts)


def test_errors_on_empty_clips() -> None:
    with pytest.raises(ValueError, match="0 frames"):
        cavmae_grid(0, 8)
    with pytest.raises(ValueError, match="0 frames"):
        stella_frames(0, 8, 4, train=False, rng=np.random.default_rng(0))


def test_multiscale_crop_matches_stellas_rule() -> None:
    rng = np.random.default_rng(0)
    boxes = {multiscale_crop(256, 256, 224, rng) for _ in range(4000)}
    sizes = {(h, w) for _, _, h, w in boxes}
    # sides 256, 224 (224 snapped), 192; aspect pairs at most one scale step apart
    assert sizes == {(256, 256), (256, 224), (224, 256), (224, 224), (224, 192), (192, 224), (192, 192)}
    for y0, x0, h, w in boxes:
        assert 0 <= y0 <= 256 - h and 0 <= x0 <= 256 - w
        assert x0 in {k * ((256 - w) // 4) for k in range(5)} and y0 in {k * ((256 - h) // 4) for k in range(5)}
    assert center_crop(256, 320) == (0, 32, 256, 256)
