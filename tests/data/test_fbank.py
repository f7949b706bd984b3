"""fastav's batched Kaldi fbank against torchaudio's, as CAV-MAE calls it, on speech-, music- and noise-like audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastav.data.fbank import kaldi_fbank, kaldi_fbank_ref, normalize_fbank

SR = 16000


def _speech(n: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced syllables: a 90-160 Hz glottal pulse train through three moving formant resonators."""
    t = np.arange(n) / SR
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    pulses = (np.diff(np.floor(np.cumsum(f0) / SR), prepend=0) > 0).astype(np.float64)
    out = np.zeros(n)
    for base, swing in ((500, 200), (1500, 400), (2500, 300)):
        f = base + swing * np.sin(2 * np.pi * rng.uniform(1, 3) * t)
        r = 0.97
        y1 = y2 = 0.0
        y = np.empty(n)
        c = 2 * r * np.cos(2 * np.pi * f / SR)
        for i in range(n):
            y0 = pulses[i] + c[i] * y1 - r * r * y2
            y[i], y2, y1 = y0, y1, y0
        out += y
    syllables = 0.5 * (1 + np.sign(np.sin(2 * np.pi * 3.1 * t)))
    return out / np.abs(out).max() * 0.6 * syllables + 0.003 * rng.standard_normal(n)


def _music(n: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / SR
    out = np.zeros(n)
    for start in np.arange(0, n / SR, 0.5):
        notes = 220 * 2 ** (rng.integers(0, 24, size=3) / 12)
        env = np.where(t >= start, np.exp(-(t - start) * 3), 0)
        for f in notes:
            out += env * sum(np.sin(2 * np.pi * h * f * t) / h**1.5 for h in range(1, 6) if h * f < SR / 2)
    return out / np.abs(out).max() * 0.8


def _noise(n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(white) / np.sqrt(np.arange(1, n // 2 + 2))  # pink
    pink = np.fft.irfft(spectrum, n)
    bursts = (np.sin(2 * np.pi * 0.9 * np.arange(n) / SR) > 0.3).astype(float)
    return 0.3 * pink / np.abs(pink).max() * bursts + 0.05 * white + 0.2  # with a DC offset


KINDS = {"speech": _speech, "music": _music, "noise": _noise}
LENGTHS = [399, 400, 16000, 4 * SR + 123, 10 * SR, 12 * SR]


def _quantise(x: np.ndarray) -> torch.Tensor:
    """As decoded from 16-bit audio: multiples of 1/32768."""
    return torch.from_numpy(np.round(np.clip(x, -1, 1) * 32767) / 32768).float()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_batched_fbank_matches_torchaudio(kind: str) -> None:
    rng = np.random.default_rng(sorted(KINDS).index(kind))
    waves = [_quantise(KINDS[kind](n, rng)) for n in LENGTHS]
    batch = torch.zeros(len(waves), max(LENGTHS))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    batch[0, len(waves[0]) :] = 0.5  # junk past a sample's length must not matter
    ours = normalize_fbank(kaldi_fbank(batch, torch.tensor(LENGTHS)))
    assert ours.shape == (len(LENGTHS), 1024, 128)
    for i, w in enumerate(waves):
        ref = normalize_fbank(kaldi_fbank_ref(w))
        diff = (ours[i] - ref).abs().max().item()
        assert diff <= 1e-3, f"{kind} length {LENGTHS[i]}: max |diff| {diff}"
        frames = 0 if len(w) < 400 else 1 + (len(w) - 400) // 160
        assert torch.all(ours[i, frames:] == normalize_fbank(torch.zeros(1))), "padding rows must be zeros before norm"


@pytest.mark.parametrize("bins, target", [(64, 256), (128, 300), (80, 1024)])
def test_other_sizes(bins: int, target: int) -> None:
    rng = np.random.default_rng(1)
    w = _quantise(_music(3 * SR + 7, rng))
    ours = kaldi_fbank(w[None], torch.tensor([len(w)]), num_mel_bins=bins, target_length=target)[0]
    ref = kaldi_fbank_ref(w, num_mel_bins=bins, target_length=target)
    assert ours.shape == (target, bins)
    assert (normalize_fbank(ours) - normalize_fbank(ref)).abs().max() <= 1e-3


def test_waveform_mean_is_removed_per_clip() -> None:
    rng = np.random.default_rng(2)
    w = _quantise(_speech(SR, rng))
    a = kaldi_fbank(w[None], torch.tensor([SR]))
    b = kaldi_fbank((w + 0.25)[None], torch.tensor([SR]))
    assert (a - b).abs().max() < 1e-3


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="expected wave \\(B, N\\) and lengths \\(B,\\)"):
        kaldi_fbank(torch.zeros(2, 100), torch.tensor([100]))
