"""Batched augmentation against CAV-MAE's per-clip definitions."""

from __future__ import annotations

import numpy as np
import torch

from fastav.data.augment import (
    draw_aug,
    mix_inputs,
    multi_hot,
    noise_and_roll,
    smooth_and_mix_labels,
    spec_augment,
)


def _aug(**kw):
    base = dict(train=True, noise=True, target_length=100, num_mel_bins=16, specaug_freq=8, specaug_time=30,
                mixup=0.0, batch_size=4)  # fmt: skip
    seed = kw.pop("seed", 0)
    base.update(kw)
    return draw_aug(np.random.default_rng(seed), **base)


def test_draws_are_in_range_and_off_when_not_training() -> None:
    rows = np.stack([_aug(seed=i, mixup=0.5) for i in range(500)])
    assert (0 <= rows[:, 0]).all() and (rows[:, 0] < 1).all()
    assert (-100 <= rows[:, 1]).all() and (rows[:, 1] < 100).all() and len(np.unique(rows[:, 1])) > 100
    assert (rows[:, 2] + rows[:, 3] <= 16).all() and (rows[:, 3] < 8).all()
    assert (rows[:, 4] + rows[:, 5] <= 100).all() and (rows[:, 5] < 30).all()
    mixed = rows[:, 6] >= 0
    assert 0.4 < mixed.mean() < 0.6 and (rows[mixed, 7] >= 1).all() and (rows[mixed, 7] <= 3).all()
    assert abs(rows[mixed, 6].mean() - 0.5) < 0.03  # Beta(10, 10)
    off = _aug(train=False)
    assert off[:6].tolist() == [0] * 6 and off[6] == -1


def test_noise_and_roll_equal_torch_roll_per_sample() -> None:
    fbank = torch.randn(3, 50, 8)
    aug = torch.zeros(3, 8)
    aug[:, 1] = torch.tensor([0, 7, -13])
    out = noise_and_roll(fbank, aug, None)  # r = 0: no noise
    for b in range(3):
        assert torch.equal(out[b], torch.roll(fbank[b], int(aug[b, 1]), 0))
    aug[:, 0] = 1.0
    g = torch.Generator().manual_seed(3)
    noisy = noise_and_roll(fbank, aug, g) - torch.stack([torch.roll(fbank[b], int(aug[b, 1]), 0) for b in range(3)])
    assert 0 <= noisy.min() and noisy.max() <= 0.1 and noisy.mean() > 0.03


def test_spec_augment_masks_one_band_and_one_span() -> None:
    fbank = torch.ones(2, 20, 10)
    aug = torch.zeros(2, 8)
    aug[0, 2:6] = torch.tensor([3, 2, 5, 4])  # freq 3-4, time 5-8
    out = spec_augment(fbank, aug)
    assert torch.equal(out[1], fbank[1])
    zero = out[0] == 0
    assert zero[:, 3:5].all() and zero[5:9, :].all()
    assert zero.sum() == 20 * 2 + 4 * 10 - 4 * 2


def test_mixup_mixes_waveforms_frames_and_labels_like_cavmae() -> None:
    wave = torch.zeros(2, 10)
    wave[0, :6] = torch.tensor([1.0, 2, 3, 4, 5, 6])
    wave[1, :] = 2.0
    lengths = torch.tensor([6, 10])
    video = torch.stack([torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)])
    aug = torch.zeros(2, 8)
    aug[0, 6], aug[0, 7] = 0.75, 1  # sample 0 mixed with sample 1
    aug[1, 6] = -1
    mixed, video_m, lam, partner = mix_inputs(wave, lengths, video, aug)
    centred0 = wave[0, :6] - 3.5
    assert torch.allclose(mixed[0, :6], 0.75 * centred0 + 0.25 * 0.0)  # partner is constant: 0 after DC removal
    assert torch.all(mixed[0, 6:] == 0)  # cut to the first sample's length
    assert torch.allclose(video_m[0], torch.full_like(video[0], 0.25)) and torch.equal(video_m[1], video[1])
    labels = multi_hot(torch.tensor([[0, -1], [2, 1]]), 4)
    assert labels.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    targets = smooth_and_mix_labels(labels, 0.1, lam, partner)
    eps = 0.1 / 4
    assert torch.allclose(targets[0], torch.tensor([0.75 * 0.9 + eps, 0.25 * 0.9 + eps, 0.25 * 0.9 + eps, eps]))
    assert torch.allclose(targets[1], torch.tensor([eps, 0.9, 0.9, eps]))
