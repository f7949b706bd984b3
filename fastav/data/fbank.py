"""Kaldi fbank exactly as CAV-MAE computes it, batched on the device.

CAV-MAE (``src/dataloader.py``) computes, per clip on the CPU::

    waveform = waveform - waveform.mean()
    fbank = torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
                                              window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)

then pads (zero rows at the end) or trims to ``target_length`` frames and normalises with (x - mean) / std.
DALI's own ``mel_filter_bank`` only approximates this (triangles linear in Hz, no per-frame DC removal or
per-frame pre-emphasis), so fastav computes the same arithmetic with torch ops on a padded batch of decoded
waveforms: frames of 25 ms every 10 ms with ``snip_edges`` (only whole frames), per-frame DC removal,
pre-emphasis 0.97 with the first sample replicated, a symmetric Hann window, a 512-point power spectrum, Kaldi's
mel triangles (linear in mel, 20 Hz to Nyquist, Nyquist bin weighted 0), natural log floored at float eps.
Rows past each clip's own frame count are zero, exactly as CAV-MAE's padding. Parity with torchaudio is a test
(max |difference| <= 1e-3 on the normalised scale).

Shapes: wave_BN (B, N) float32 padded with anything past ``lengths_B``; output (B, target_length, n_mel).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def _mel(freq: Tensor) -> Tensor:
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def _build_mel_banks(
    num_bins: int, n_fft: int, sample_rate: float, low_freq: float, high_freq: float, device: torch.device
) -> Tensor:
    """Kaldi's triangular mel filters, (num_bins, n_fft // 2 + 1) float32 with the Nyquist column 0, built with
    torch ops on ``device`` (Python scalars and device tensors only: nothing is copied from the host)."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not 0.0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"mel range {low_freq}-{high_freq} Hz must lie within 0-{nyquist} Hz")
    mel_low, mel_high = (1127.0 * math.log(1.0 + f / 700.0) for f in (low_freq, high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32, device=device).unsqueeze(1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    freqs = (sample_rate / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32, device=device)
    mel = _mel(freqs).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


_BANKS: dict[tuple, Tensor] = {}


def mel_banks(
    num_bins: int, n_fft: int, sample_rate: float, device: torch.device, low_freq: float = 20.0, high_freq: float = 0.0
) -> Tensor:
    """The mel filters on ``device``: built there on first use, then kept per device and parameters, so a batch
    neither copies them from the host (a blocking copy that synchronises the stream) nor rebuilds them."""
    key = (num_bins, n_fft, float(sample_rate), float(low_freq), float(high_freq), torch.device(device))
    banks = _BANKS.get(key)
    if banks is None:
        banks = _build_mel_banks(*key[:5], key[5])
        if not is_fake(banks):  # never keep a tracing placeholder (FakeTensorMode, torch.compile) for real batches
            _BANKS[key] = banks
    return banks


def kaldi_fbank(
    wave_BN: Tensor,
    lengths_B: Tensor,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    target_length: int = 1024,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    mean_B: Tensor | None = None,
) -> Tensor:
    """CAV-MAE's log-mel fbank of each waveform, padded with zero rows or trimmed to ``target_length`` frames.

    ``wave_BN`` holds float samples in [-1, 1] (as ``torchaudio.load`` and DALI's audio decoder give them);
    ``lengths_B`` the number of valid samples of each row. The waveform mean over the valid samples is removed
    first, as CAV-MAE does; pass ``mean_B`` when the rows were cut from longer clips (the mean of the whole
    clip). Returns float32 (B, target_length, num_mel_bins), unnormalised.
    """
    if wave_BN.dim() != 2 or lengths_B.shape != wave_BN.shape[:1]:
        raise ValueError(
            f"expected wave (B, N) and lengths (B,), got {tuple(wave_BN.shape)} and {tuple(lengths_B.shape)}"
        )
    win = int(sample_rate * frame_length_ms / 1000)
    hop = int(sample_rate * frame_shift_ms / 1000)
    n_fft = 1 << (win - 1).bit_length()
    B, N = wave_BN.shape
    device = wave_BN.device
    wave_BN = wave_BN.float()
    lengths_B = lengths_B.to(device=device, dtype=torch.long).clamp(max=N)

    # CAV-MAE removes the mean of the whole clip, then only the first target_length frames are ever kept
    if mean_B is None:
        valid_BN = torch.arange(N, device=device).unsqueeze(0) < lengths_B.unsqueeze(1)
        mean_B = (wave_BN * valid_BN).sum(1) / lengths_B.clamp(min=1)
    n_used = min(N, (target_length - 1) * hop + win)
    wave_BN = wave_BN[:, :n_used] - mean_B.unsqueeze(1)
    if n_used < win:
        wave_BN = torch.nn.functional.pad(wave_BN, (0, win - n_used))

    frames_BMW = wave_BN.unfold(1, win, hop)  # (B, M, win), M = 1 + (n_used - win) // hop
    frames_BMW = frames_BMW - frames_BMW.mean(dim=2, keepdim=True)  # per-frame DC removal
    prev_BMW = torch.cat([frames_BMW[..., :1], frames_BMW[..., :-1]], dim=2)  # first sample replicated
    frames_BMW = frames_BMW - preemphasis * prev_BMW
    frames_BMW = frames_BMW * torch.hann_window(win, periodic=False, device=device, dtype=torch.float32)
    power_BMF = torch.view_as_real(torch.fft.rfft(frames_BMW, n=n_fft)).pow(2).sum(-1)  # |X|^2 without a sqrt
    banks_KF = mel_banks(num_mel_bins, n_fft, sample_rate, device)
    logmel_BMK = torch.matmul(power_BMF, banks_KF.T).clamp(min=torch.finfo(torch.float32).eps).log()

    # rows past each clip's own whole frames are zero (CAV-MAE pads the fbank with zero rows)
    frames_B = torch.where(lengths_B >= win, 1 + (lengths_B - win) // hop, torch.zeros_like(lengths_B))
    M = logmel_BMK.shape[1]
    keep_BM = torch.arange(M, device=device).unsqueeze(0) < frames_B.unsqueeze(1)
    logmel_BMK = logmel_BMK * keep_BM.unsqueeze(2)
    if M >= target_length:
        return logmel_BMK[:, :target_length].contiguous()
    return torch.nn.functional.pad(logmel_BMK, (0, 0, 0, target_length - M))


def normalize_fbank(fbank: Tensor, mean: float = -5.081, std: float = 4.4849) -> Tensor:
    """CAV-MAE's normalisation, (x - mean) / std; padded zero rows become (0 - mean) / std (+1.13)."""
    return (fbank - mean) / std


def kaldi_fbank_ref(wave_N: Tensor, sample_rate: int = 16000, num_mel_bins: int = 128, target_length: int = 1024):
    """The per-clip CAV-MAE computation with torchaudio (the oracle of the tests and the reference loader).

    A clip shorter than one 25-ms frame has no frames: torchaudio refuses it (and CAV-MAE's loader then
    substitutes a constant tensor); here, as in :func:`kaldi_fbank`, its fbank is all padding rows.
    """
    import torchaudio.compliance.kaldi as kaldi

    if wave_N.numel() < int(sample_rate * 0.025):
        return torch.zeros(target_length, num_mel_bins)
    wave_1N = (wave_N.float() - wave_N.float().mean()).unsqueeze(0)
    fbank = kaldi.fbank(
        wave_1N,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )
    n = fbank.shape[0]
    if n < target_length:
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, target_length - n))
    return fbank[:target_length]
