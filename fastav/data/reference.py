"""The plain-PyTorch loader, the way the official CAV-MAE / STELLA repositories work: the oracle and the baseline.

A ``torch.utils.data.DataLoader`` over the same shards (read with the ``webdataset`` library), decoding each
clip with PyAV on the CPU, computing the fbank per clip with ``torchaudio.compliance.kaldi.fbank`` and
transforming frames with PIL, one sample at a time in worker processes. It applies the same frame and crop rules
(:mod:`fastav.data.sampling`) as the DALI pipeline, so in evaluation mode both must give the same tensors (the
parity tests), and ``bench/throughput.py`` measures fastav against it.

Frames are converted from the decoder's yuv420p with BT.601 limited-range coefficients and bilinear chroma
up-sampling, which is what DALI does: FFmpeg's default ``rgb24`` conversion (swscale) differs from it by about
1.5/255 on average.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from fastav.config import Config
from fastav.data.fbank import kaldi_fbank_ref, normalize_fbank
from fastav.data.sampling import cavmae_frames, center_crop, multiscale_crop, stella_frames
from shards.manifest import load_manifest, shard_paths
from shards.media import decode_audio

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def yuv420p_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 to RGB uint8 with bilinear chroma up-sampling (as DALI's decoder)."""
    h, w = y.shape
    chroma = torch.from_numpy(np.stack([u, v]).astype(np.float32))[None]
    chroma = torch.nn.functional.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()
    yy = (y.astype(np.float32) - 16.0) * (255.0 / 219.0)
    cb, cr = (chroma - 128.0) * (255.0 / 224.0)
    rgb = np.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], axis=-1)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def decode_frames(data: bytes, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of an in-memory video as (len, H, W, 3) uint8 RGB."""
    wanted = set(indices)
    last = max(indices)
    got: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                planes = frame.to_ndarray(format="yuv420p")
                h, w = frame.height, frame.width
                y = planes[:h]
                uv = planes[h:].reshape(2, h // 2, w // 2)
                got[i] = yuv420p_to_rgb(y, uv[0], uv[1])
            if i >= last:
                break
    if not got:
        raise ValueError("video has no decodable frames")
    n = max(got) + 1  # indices past the end repeat the last frame (DALI's rule for the padded window)
    return np.stack([got[min(i, n - 1)] for i in indices])


class ReferenceDataset(torch.utils.data.IterableDataset):
    """Samples of one split as CPU tensors, computed one clip at a time."""

    def __init__(
        self,
        cfg: Config,
        split: str,
        *,
        tasks: list[str] | None = None,
        train: bool | None = None,
        multi_frame: bool = False,
    ) -> None:
        self.cfg = cfg
        root = cfg.data_root()
        self.manifest = load_manifest(root)
        self.urls = [str(tar) for tar, _ in shard_paths(root, self.manifest, split, tasks)]
        self.train = (split == "train") if train is None else train
        self.multi_frame = multi_frame
        self.frame_size = int(self.manifest["preprocessing"]["frame_size"])
        self.task_ids = {t["name"]: i for i, t in enumerate(self.manifest["tasks"])}
        self.num_classes = len(self.manifest["classes"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        dataset = wds.WebDataset(self.urls, shardshuffle=False, empty_check=False)
        for sample in dataset:
            yield self.transform(sample)

    def transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        d = self.cfg.data
        meta = json.loads(sample["json"])
        rng = np.random.default_rng([self.cfg.train.seed, meta["index"], 0xB2])
        if d.sampling == "cavmae":
            idx = cavmae_frames(meta["num_frames"], meta["fps"], train=self.train, rng=rng, multi=self.multi_frame)
        else:
            idx = stella_frames(
                meta["num_frames"], meta["fps"], d.num_frames, train=self.train, rng=rng, eval_start=d.eval_window_start
            )
        frames = decode_frames(sample["mp4"], idx)
        side = self.frame_size
        if self.train and d.sampling == "stella":
            y0, x0, h, w = multiscale_crop(side, side, d.frame_size, rng)
        else:
            y0, x0, h, w = center_crop(side, side)
        resample = Image.BICUBIC if d.sampling == "cavmae" else Image.BILINEAR
        pixels = np.stack(
            [
                np.asarray(
                    Image.fromarray(f).crop((x0, y0, x0 + w, y0 + h)).resize((d.frame_size, d.frame_size), resample)
                )
                for f in frames
            ]
        )
        video = (pixels.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        audio_key = "flac" if "flac" in sample else "wav"
        wave, _ = decode_audio(sample[audio_key])
        fbank = kaldi_fbank_ref(torch.from_numpy(wave), num_mel_bins=d.num_mel_bins, target_length=d.target_length)
        fbank = normalize_fbank(fbank, d.fbank_mean, d.fbank_std)
        if self.train and d.noise:  # CAV-MAE's noise + time roll, per clip
            fbank = fbank + torch.rand(fbank.shape) * float(rng.random()) / 10
            fbank = torch.roll(fbank, int(rng.integers(-d.target_length, d.target_length)), 0)
        labels = torch.zeros(self.num_classes)
        labels[meta["labels"]] = 1.0
        return {
            "video": torch.from_numpy(video).permute(0, 3, 1, 2).contiguous(),
            "pixels": torch.from_numpy(pixels),
            "fbank": fbank,
            "labels": labels,
            "task": torch.tensor(self.task_ids.get(meta["task"], -1)),
            "index": torch.tensor(meta["index"], dtype=torch.int64),
        }


def reference_loader(
    cfg: Config,
    split: str,
    *,
    batch_size: int,
    num_workers: int = 0,
    tasks: list[str] | None = None,
    train: bool | None = None,
    multi_frame: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`ReferenceDataset` (workers split the shards between them).

    Workers are spawned, not forked, and kept across epochs: a process forked after the parent has started
    OpenMP or DALI threads can deadlock in its first parallel region.
    """
    dataset = ReferenceDataset(cfg, split, tasks=tasks, train=train, multi_frame=multi_frame)
    num_workers = min(num_workers, len(dataset.urls))
    extra = {"multiprocessing_context": "spawn", "persistent_workers": True} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, **extra)
