"""Batched audio-video augmentation and label handling on the device (CAV-MAE's loader, vectorised).

Every random choice is an input: the per-sample numbers come from the data source (drawn from the sample's own
seeded RNG) and the elementwise noise from a generator seeded per batch, so a batch is reproducible and no value
is read back from the device.

Per-sample augmentation vector ``aug_BA`` (float32), columns:

====  ==========================================================================================
0     noise scale r ~ U(0, 1): fbank += U(0, 1) * r / 10 (CAV-MAE ``noise``)
1     circular time roll of the fbank, integer in [-target_length, target_length)
2, 3  SpecAugment frequency mask start and width (width 0 = none)
4, 5  SpecAugment time mask start and width (width 0 = none)
6     mixup weight lambda ~ Beta(10, 10) of this sample, or -1 for no mixup
7     mixup partner: offset in [1, B) to the partner's position in the batch
====  ==========================================================================================
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

AUG_COLUMNS = 8


def draw_aug(
    rng: np.random.Generator,
    *,
    train: bool,
    noise: bool,
    target_length: int,
    num_mel_bins: int,
    specaug_freq: int,
    specaug_time: int,
    mixup: float,
    batch_size: int,
) -> np.ndarray:
    """The augmentation vector of one sample (see the module docstring); zeros / -1 when not training."""
    aug = np.zeros(AUG_COLUMNS, dtype=np.float32)
    aug[6] = -1.0
    if not train:
        return aug
    if noise:
        aug[0] = rng.random()
        aug[1] = rng.integers(-target_length, target_length)
    if specaug_freq:  # torchaudio's FrequencyMasking / TimeMasking: width U(0, param), start U(0, size - width)
        w = int(rng.random() * specaug_freq)
        aug[2], aug[3] = int(rng.random() * (num_mel_bins - w)), w
    if specaug_time:
        w = int(rng.random() * specaug_time)
        aug[4], aug[5] = int(rng.random() * (target_length - w)), w
    if mixup > 0 and batch_size > 1 and rng.random() < mixup:
        aug[6] = rng.beta(10.0, 10.0)
        aug[7] = rng.integers(1, batch_size)
    return aug


def mix_inputs(
    wave_BN: Tensor, lengths_B: Tensor, video: Tensor, aug_BA: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CAV-MAE mixup: waveforms mixed after DC removal (partner cut or zero-padded to the sample's length),
    frames mixed in the normalised domain. Returns (wave, video, lambda_B, partner_B); lambda is 1 where a
    sample is not mixed."""
    B, N = wave_BN.shape
    pos = torch.arange(B, device=wave_BN.device)
    lam_B = torch.where(aug_BA[:, 6] >= 0, aug_BA[:, 6], torch.ones_like(aug_BA[:, 6]))
    partner_B = (pos + aug_BA[:, 7].long()) % B
    valid_BN = torch.arange(N, device=wave_BN.device).unsqueeze(0) < lengths_B.unsqueeze(1)
    centred = (wave_BN - (wave_BN * valid_BN).sum(1, keepdim=True) / lengths_B.clamp(min=1).unsqueeze(1)) * valid_BN
    mixed = lam_B.unsqueeze(1) * centred + (1 - lam_B).unsqueeze(1) * centred[partner_B]
    mixed = mixed * valid_BN  # cut to the first sample's length
    lam_v = lam_B.view(B, *([1] * (video.dim() - 1))).to(video.dtype)
    video = lam_v * video + (1 - lam_v) * video[partner_B]
    return mixed, video, lam_B, partner_B


def spec_augment(fbank_BTK: Tensor, aug_BA: Tensor) -> Tensor:
    """Zero one frequency band and one time span per sample (before normalisation, as CAV-MAE)."""
    B, T, K = fbank_BTK.shape
    k = torch.arange(K, device=fbank_BTK.device).unsqueeze(0)
    t = torch.arange(T, device=fbank_BTK.device).unsqueeze(0)
    f0, fw, t0, tw = (aug_BA[:, i : i + 1] for i in (2, 3, 4, 5))
    mask_K = (k >= f0) & (k < f0 + fw)
    mask_T = (t >= t0) & (t < t0 + tw)
    keep = ~(mask_T.unsqueeze(2) | mask_K.unsqueeze(1))
    return fbank_BTK * keep


def noise_and_roll(fbank_BTK: Tensor, aug_BA: Tensor, generator: torch.Generator | None) -> Tensor:
    """fbank + U(0, 1) * r / 10, then a circular roll along time by the sample's shift."""
    B, T, K = fbank_BTK.shape
    u = torch.rand(fbank_BTK.shape, generator=generator, device=fbank_BTK.device, dtype=fbank_BTK.dtype)
    fbank_BTK = fbank_BTK + u * (aug_BA[:, 0] / 10).view(B, 1, 1)
    src_BT = (torch.arange(T, device=fbank_BTK.device).unsqueeze(0) - aug_BA[:, 1:2].long()) % T
    return torch.gather(fbank_BTK, 1, src_BT.unsqueeze(2).expand(B, T, K))


def multi_hot(labels_BL: Tensor, num_classes: int) -> Tensor:
    """(B, C) float multi-hot from label ids padded with -1."""
    valid = labels_BL >= 0
    out = torch.zeros(labels_BL.shape[0], num_classes, device=labels_BL.device)
    out.scatter_add_(1, labels_BL.clamp(min=0).long(), valid.float())
    return out.clamp_(max=1.0)


def smooth_and_mix_labels(
    multi_BC: Tensor, smoothing: float, lam_B: Tensor | None = None, partner_B: Tensor | None = None
) -> Tensor:
    """CAV-MAE targets: positives 1 - eps, others eps / C; mixed samples lambda (1 - eps) y1 + (1 - lambda)
    (1 - eps) y2 + eps / C."""
    C = multi_BC.shape[1]
    if lam_B is None or partner_B is None:
        return multi_BC * (1 - smoothing) + (1 - multi_BC) * (smoothing / C)
    lam = lam_B.unsqueeze(1)
    mixed = (lam * multi_BC + (1 - lam) * multi_BC[partner_B]) * (1 - smoothing) + smoothing / C
    plain = multi_BC * (1 - smoothing) + (1 - multi_BC) * (smoothing / C)
    return torch.where((lam_B < 1).unsqueeze(1), mixed, plain)
