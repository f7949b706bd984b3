"""The data pipeline: shards -> DALI (video and audio decode, crop, resize, normalise) -> device tensors.

Stages, in order:

1. **Source** (Python, :meth:`AVLoader._source`): :class:`~fastav.data.index.SampleStream` names the next
   samples of this rank; their members are sliced out of the memory-mapped tars through the DALI ``.idx``
   files, checked (present, non-empty, right magic bytes, readable JSON) and, per sample, the frame indices
   (CAV-MAE or STELLA rule), the crop box and the augmentation numbers are drawn from an RNG seeded by the
   sample's stream position. A bad sample is skipped, counted and logged at a limited rate, and the next one
   takes its place. At this point we have encoded bytes plus small per-sample arrays.
2. **DALI** (``fn.external_source`` -> ``fn.decoders.video`` (``mixed``, NVDEC, or ``cpu`` for VP9: without a
   GPU, or on one for VP9 frames below NVDEC's 128 px minimum, :func:`video_decoder`) with the
   per-sample frame list -> ``fn.crop`` -> ``fn.resize`` -> ``fn.crop_mirror_normalize``; ``fn.decoders.audio``
   on CPU threads -> trimmed and zero-padded to a fixed length). At this point we have (B, T, 3, S, S) ImageNet-
   normalised frames and (B, N) waveforms with their lengths, on the device.
3. **Device** (torch, :meth:`AVLoader._finish`): mixup (waveform domain), CAV-MAE's Kaldi fbank, SpecAugment,
   normalisation, noise and time roll, multi-hot (smoothed, mixed) labels. At this point we have the batch
   contract of docs/architecture.md: ``video``, ``fbank``, ``labels``, ``task``, ``index`` plus ``valid``.

Why an external source rather than ``fn.readers.webdataset``: the reader cannot tell the graph a clip's frame
count (needed for the frame rule of every sample), cannot drop a sample its decoder fails on, and resumes only
through DALI's own checkpoints. Reading the same tars through the same ``.idx`` files from Python keeps the
order, the rank split, skips and resume in two integers (:meth:`state_dict`), costs a few microseconds per
sample, and leaves all decoding and pixel work to DALI.

A sample that passes the checks but that DALI cannot decode fails its whole batch inside DALI: the loader then
decodes that batch's samples with PyAV to find the culprits, marks them bad, rebuilds the pipeline and replays
the batch without them. The run stops with a :class:`DataError` once more than ``data.max_skip_fraction`` of the
samples read had to be skipped.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastav.config import Config
from fastav.data.augment import draw_aug, mix_inputs, multi_hot, noise_and_roll, smooth_and_mix_labels, spec_augment
from fastav.data.fbank import kaldi_fbank, normalize_fbank
from fastav.data.index import SampleError, SampleStream, ShardIndex, class_balanced_weights, holdout
from fastav.data.sampling import MULTI_FRAMES, cavmae_frames, center_crop, multiscale_crop, stella_frames
from fastav.log import RateLimited, get_logger
from shards.manifest import load_manifest

MAX_LABELS = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED = {"audio_format": ("flac", "wav"), "audio_channels": 1, "sample_rate": 16000, "video_codec": ("vp9", "h264")}
MIN_SEEN_FOR_SKIP_CHECK = 100
NVDEC_MIN_SIDE = {"vp9": 128, "h264": 48}
"""Smallest frame side NVDEC decodes per codec (NVIDIA's Video Codec SDK decoder limits: VP9 128 x 128, H.264
48 x 16); DALI's mixed decoder refuses smaller streams (it checks the decoder capabilities)."""
CPU_DECODABLE = ("vp9",)
"""Codecs DALI's CPU video decoder takes (its FFmpeg build has no H.264 decoder)."""
_OUTPUTS = ("mp4", "audio", "frames", "crop_h", "crop_w", "pos_y", "pos_x", "aug", "labels", "task", "index", "valid")

log = get_logger("fastav.data")


class DataError(RuntimeError):
    """The data cannot be read as configured (unsupported shards, too many bad samples); the message says why."""


@dataclass
class _Fed:
    """One batch handed to DALI: the stream state before and after it, and its sample ids."""

    before: dict[str, int]
    after: dict[str, int]
    ids: list[int]
    """Sample ids of the batch; -1 marks evaluation padding."""
    seen: int
    """How many samples (good or skipped) reading this batch counted as seen."""


_told: set[str] = set()


def video_decoder(codec: str, frame_size: int, gpu: bool) -> str:
    """Where DALI decodes the video: "mixed" (NVDEC) on a GPU, else "cpu". Frames below NVDEC's minimum for the
    codec are decoded on the CPU threads (``data.num_threads``) and the rest of the pipeline stays on the GPU,
    said once per process; a codec the CPU decoder lacks is refused."""
    if not gpu:
        return "cpu"
    minimum = NVDEC_MIN_SIDE.get(codec, 0)
    if frame_size >= minimum:
        return "mixed"
    if codec not in CPU_DECODABLE:
        raise DataError(
            f"{codec} frames of {frame_size} px are below NVDEC's minimum of {minimum} px, and DALI's CPU decoder "
            f"cannot decode {codec}; rebuild the shards at {minimum} px or more, or with --codec vp9"
        )
    message = (
        f"{codec} frames of {frame_size} px are below NVDEC's minimum of {minimum} x {minimum}: decoding them on "
        f"the CPU (data.num_threads threads); crop, resize and normalisation still run on the GPU"
    )
    if message not in _told:
        _told.add(message)
        log.warning(message)
    return "cpu"


def resolve_device(setting: str) -> torch.device:
    if setting == "gpu" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("data.device='gpu' but CUDA is not available; use data.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class AVLoader:
    """Batches of one split for one rank, as device tensors (the batch contract of docs/architecture.md).

    ``for batch in loader`` yields one epoch (``len(loader)`` batches) from where the loader stands; iterate
    again for the next epoch. Training (``train=True``, the default for the 'train' split) shuffles per epoch,
    augments, and gives every rank ``len(loader)`` full batches. Evaluation reads every sample of the split
    exactly once over all ranks in a fixed order; padding slots of the last batch have ``valid`` False. With
    ``data.val_fraction`` > 0, 'val' reads the held-out part of the training split (evaluation mode) and 'train'
    the rest (:func:`fastav.data.index.holdout`).
    """

    def __init__(
        self,
        cfg: Config,
        split: str,
        *,
        tasks: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        train: bool | None = None,
        multi_frame: bool = False,
        batch_size: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        cfg.validate(require_data=True)
        self.cfg = cfg
        self.root = cfg.data_root()
        self.manifest = load_manifest(self.root, supported=SUPPORTED)
        self.train = (split == "train") if train is None else train
        self.multi_frame = multi_frame and not self.train and cfg.data.sampling == "cavmae"
        self.device = device or resolve_device(cfg.data.device)
        pre = self.manifest["preprocessing"]
        if self.device.type == "cpu" and pre["video_codec"] != "vp9":
            raise DataError(
                f"{self.root}: the shards hold {pre['video_codec']} video (manifest preprocessing.video_codec), which "
                f"DALI decodes only on a GPU; rebuild them with --codec vp9 to read them on this machine"
            )
        self.batch_size = batch_size or (cfg.data.batch_size if self.train else cfg.eval.batch_size)
        # 'val' is the part of the training split that data.val_fraction holds out; 'train' is then the rest
        self.index = ShardIndex(self.root, self.manifest, "train" if split == "val" else split, tasks)
        if split in ("train", "val") and cfg.data.val_fraction > 0:
            kept, held = holdout(len(self.index), cfg.data.val_fraction)
            self.index.select(held if split == "val" else kept)
        self.num_classes = len(self.manifest["classes"])
        self.stream = SampleStream(
            len(self.index),
            rank=rank,
            world_size=world_size,
            seed=cfg.train.seed,
            shuffle=self.train,
            drop_last=self.train,
            weights=balanced_weights(self.index, self.num_classes, split) if self.train and cfg.data.balanced else None,
        )
        if self.train and self.stream.per_rank < self.batch_size:
            raise DataError(
                f"split {split!r} has {len(self.index)} samples: fewer than one batch of {self.batch_size} per rank "
                f"for {world_size} rank(s); lower data.batch_size"
            )
        per_rank = self.stream.per_rank
        self.batches_per_epoch = per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)
        self.task_ids = {t["name"]: i for i, t in enumerate(self.manifest["tasks"])}
        self.frame_size = int(pre["frame_size"])
        self.video_decode_device = video_decoder(pre["video_codec"], self.frame_size, self.device.type == "cuda")
        self.num_frames = MULTI_FRAMES if self.multi_frame else cfg.data.num_frames
        hop, win = 160, 400
        self.max_samples = (cfg.data.target_length - 1) * hop + win
        self.bad: set[int] = set()
        self.skipped = 0
        self.seen = 0
        self.delivered = 0
        self._skip_log = RateLimited(log, "skipped sample", interval=30.0)
        self._fed: collections.deque[_Fed] = collections.deque()
        self._last_row: list[np.ndarray] | None = None
        self._fatal: DataError | None = None
        self._generator = torch.Generator(device=self.device)
        self._pipe: Any = None
        self._iter: Any = None

    # -- stage 1: the source --------------------------------------------------------------------------------------

    def _sample_arrays(self, fetched, epoch: int, pos: int, valid: bool) -> list[np.ndarray]:
        meta, d = fetched.meta, self.cfg.data
        rng = np.random.default_rng([self.cfg.train.seed, epoch, pos, 0xA1])
        if d.sampling == "cavmae":
            frames = cavmae_frames(meta["num_frames"], meta["fps"], train=self.train, rng=rng, multi=self.multi_frame)
        else:
            frames = stella_frames(
                meta["num_frames"], meta["fps"], d.num_frames, train=self.train, rng=rng, eval_start=d.eval_window_start
            )
        side = self.frame_size
        if self.train and d.sampling == "stella":
            y0, x0, h, w = multiscale_crop(side, side, d.frame_size, rng)
        else:
            y0, x0, h, w = center_crop(side, side)
        labels = np.full(MAX_LABELS, -1, dtype=np.int32)
        if len(meta["labels"]) > MAX_LABELS:
            raise SampleError(f"sample {meta.get('key')}: more than {MAX_LABELS} labels")
        labels[: len(meta["labels"])] = meta["labels"]
        aug = draw_aug(
            rng,
            train=self.train,
            noise=d.noise,
            target_length=d.target_length,
            num_mel_bins=d.num_mel_bins,
            specaug_freq=d.specaug_freq,
            specaug_time=d.specaug_time,
            mixup=d.mixup,
            batch_size=self.batch_size,
        )
        return [
            fetched.video,
            fetched.audio,
            np.asarray(frames, dtype=np.int32),
            np.float32(h),
            np.float32(w),
            np.float32(y0 / (side - h) if side > h else 0.5),
            np.float32(x0 / (side - w) if side > w else 0.5),
            aug,
            labels,
            np.int32(self.task_ids.get(meta["task"], -1)),
            np.int64(meta["index"]),
            np.uint8(valid),
        ]

    def _source(self) -> tuple[list[np.ndarray], ...]:
        before = self.stream.state_dict()
        seen_before = self.seen
        rows: list[list[np.ndarray]] = []
        ids: list[int] = []
        start_epoch = self.stream.epoch
        while len(rows) < self.batch_size:
            if not self.train and self.stream.epoch != start_epoch:
                # evaluation: this rank's samples are exhausted; pad the last batch with marked copies
                rows.append(self._pad_row()[:-1] + [np.uint8(0)])
                ids.append(-1)
                continue
            sample, real, epoch, pos = self.stream.next()
            if sample in self.bad:
                continue
            try:
                row = self._sample_arrays(self.index.fetch(sample), epoch, pos, real)
            except SampleError as err:
                self._skip(sample, str(err))
                try:
                    self._check_skip_rate()
                except DataError as fatal:  # raised inside DALI's callback: keep it for _next_raw to re-raise
                    self._fatal = fatal
                    raise
                continue
            self.seen += 1
            self._last_row = row
            rows.append(row)
            ids.append(sample)
        self._fed.append(_Fed(before, self.stream.state_dict(), ids, self.seen - seen_before))
        return tuple([row[i] for row in rows] for i in range(len(_OUTPUTS)))

    def _pad_row(self) -> list[np.ndarray]:
        if self._last_row is None:  # every sample of this rank was bad: pad with the first readable one
            for sample in range(len(self.index)):
                if sample not in self.bad:
                    try:
                        self._last_row = self._sample_arrays(self.index.fetch(sample), 0, 0, False)
                        break
                    except SampleError:
                        continue
            else:
                raise DataError(f"{self.root}: no readable sample in this split")
        return self._last_row

    def _skip(self, sample: int, reason: str) -> None:
        self.bad.add(sample)
        self.skipped += 1
        self.seen += 1
        self._skip_log(reason)

    # -- stage 2: DALI ---------------------------------------------------------------------------------------------

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        size = self.cfg.data.frame_size
        interp = types.INTERP_CUBIC if self.cfg.data.sampling == "cavmae" else types.INTERP_LINEAR
        dtypes = [types.UINT8, types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.FLOAT, types.FLOAT,
                  types.FLOAT, types.INT32, types.INT32, types.INT64, types.UINT8]  # fmt: skip

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.cfg.data.num_threads,
            device_id=self.device.index if gpu else None,
            prefetch_queue_depth=self.cfg.data.prefetch,
            exec_dynamic=True,
        )
        def pipeline():
            mp4, audio, frames, ch, cw, py, px, aug, labels, task, index, valid = fn.external_source(
                source=self._source, num_outputs=len(_OUTPUTS), batch=True, dtype=dtypes
            )
            video = fn.decoders.video(mp4, device=self.video_decode_device, frames=frames)
            if gpu and self.video_decode_device == "cpu":
                video = video.gpu()  # frames too small for NVDEC: the pixel work still runs on the GPU
            video = fn.crop(video, crop_h=ch, crop_w=cw, crop_pos_y=py, crop_pos_x=px)
            video = fn.resize(video, resize_x=size, resize_y=size, interp_type=interp, antialias=True)
            video = fn.crop_mirror_normalize(
                video,
                dtype=types.FLOAT,
                output_layout="FCHW",
                mean=[m * 255 for m in IMAGENET_MEAN],
                std=[s * 255 for s in IMAGENET_STD],
            )
            wave, _ = fn.decoders.audio(audio, dtype=types.FLOAT, downmix=True)
            wave_mean = fn.reductions.mean(wave)  # of the whole clip, as CAV-MAE (before the cut below)
            wave = fn.slice(wave, start=[0], shape=[self.max_samples], axes=[0], out_of_bounds_policy="trim_to_shape")
            length = fn.cast(wave.shape(), dtype=types.INT64)
            wave = fn.pad(wave, axes=[0], shape=[self.max_samples], fill_value=0.0)
            outs = [video, wave, length, wave_mean, aug, labels, task, index, valid]
            return tuple(o.gpu() if gpu and o.device == "cpu" else o for o in outs)

        self._pipe = pipeline()
        self._pipe.build()
        self._iter = DALIGenericIterator(
            [self._pipe],
            ["video", "wave", "length", "wave_mean", "aug", "labels", "task", "index", "valid"],
            size=-1,
            auto_reset=False,
            prepare_first_batch=False,
        )

    def _teardown(self) -> None:
        """Drop the pipeline and the batches fed to it but not delivered; they will be read again."""
        self._iter = None
        self._pipe = None
        if self._fed:
            self.stream.load_state_dict(self._fed[0].before)
            self.seen -= sum(f.seen for f in self._fed)
        self._fed.clear()

    def _next_raw(self) -> dict[str, Tensor]:
        while True:
            if self._iter is None:
                self._build()
            try:
                out = next(self._iter)[0]
            except StopIteration:  # the source never ends; DALI ended the epoch on its own
                self._teardown()
                continue
            except RuntimeError as err:
                if self._fatal is not None:
                    raise self._fatal from None
                self._recover(err)
                continue
            self._fed.popleft()
            return out

    def _recover(self, err: Exception) -> None:
        """A batch failed inside DALI: find its undecodable samples with PyAV, drop them, replay the batch."""
        from shards.media import decode_audio, decode_video

        failed = self._fed[0]
        culprits = []
        for sample in (i for i in failed.ids if i >= 0):
            raw = self.index.raw(sample)
            try:
                decode_video(bytes(raw["mp4"]))
                decode_audio(bytes(raw[self.index.audio_ext]))
            except Exception as decode_err:  # noqa: BLE001 - any decoder failure marks the sample bad
                culprits.append((sample, decode_err))
        if not culprits:
            raise DataError(
                f"DALI failed on a batch whose samples all decode with PyAV ({err}); samples: "
                + ", ".join(self.index.where(i) for i in failed.ids[:4] if i >= 0)
            ) from err
        self._teardown()  # rewinds the stream to the failed batch
        for sample, decode_err in culprits:
            self._skip(sample, f"{self.index.where(sample)}: undecodable ({decode_err})")
        self._check_skip_rate()

    def _check_skip_rate(self) -> None:
        limit = self.cfg.data.max_skip_fraction
        enough = self.seen >= min(MIN_SEEN_FOR_SKIP_CHECK, len(self.index)) or self.skipped >= len(self.index)
        if enough and self.skipped > limit * self.seen:
            raise DataError(
                f"{self.skipped} of {self.seen} samples read ({self.skipped / self.seen:.1%}) were skipped as missing "
                f"or undecodable, more than data.max_skip_fraction={limit}; the warnings above name them. Check the "
                f"shards with 'python -m shards verify {self.root}' or raise the limit"
            )

    # -- stage 3: the device ---------------------------------------------------------------------------------------

    def _finish(self, out: dict[str, Tensor], batch_number: int) -> dict[str, Tensor]:
        d = self.cfg.data
        dev = self.device
        video = out["video"].to(dev, non_blocking=True)
        wave = out["wave"].to(dev, non_blocking=True)
        lengths = out["length"].to(dev, non_blocking=True).view(-1)
        aug = out["aug"].to(dev, non_blocking=True)
        labels = multi_hot(out["labels"].to(dev, non_blocking=True), self.num_classes)
        lam = partner = None
        if self.train and d.mixup > 0:
            wave, video, lam, partner = mix_inputs(wave, lengths, video, aug)
        mean = None if lam is not None else out["wave_mean"].to(dev, non_blocking=True).view(-1)
        fbank = kaldi_fbank(
            wave, lengths, sample_rate=16000, num_mel_bins=d.num_mel_bins, target_length=d.target_length, mean_B=mean
        )
        if self.train and (d.specaug_freq or d.specaug_time):
            fbank = spec_augment(fbank, aug)
        fbank = normalize_fbank(fbank, d.fbank_mean, d.fbank_std)
        if self.train and d.noise:
            self._generator.manual_seed((self.cfg.train.seed * 1_000_003 + batch_number) & 0x7FFF_FFFF_FFFF_FFFF)
            fbank = noise_and_roll(fbank, aug, self._generator)
        if d.label_smoothing > 0 or lam is not None:
            labels = smooth_and_mix_labels(labels, d.label_smoothing, lam, partner)
        dtype = torch.bfloat16 if d.dtype == "bfloat16" else torch.float32
        return {
            "video": video.to(dtype),
            "fbank": fbank.to(dtype),
            "labels": labels,
            "task": out["task"].to(dev, non_blocking=True).view(-1).long(),
            "index": out["index"].to(dev, non_blocking=True).view(-1),
            "valid": out["valid"].to(dev, non_blocking=True).view(-1).bool(),
        }

    # -- iteration and state ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.delivered // self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        remaining = self.batches_per_epoch - self.delivered % self.batches_per_epoch
        for _ in range(remaining):
            out = self._next_raw()
            batch = self._finish(out, self.delivered)
            self.delivered += 1
            self._check_skip_rate()
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the next batch (the trainer stores it in checkpoints)."""
        position = self._fed[0].before if self._fed else self.stream.state_dict()
        return {
            "stream": dict(position),
            "delivered": self.delivered,
            "skipped": self.skipped,
            "seen": self.seen - sum(f.seen for f in self._fed),
            "bad": sorted(self.bad),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._fed.clear()
        self._teardown()
        self.stream.load_state_dict(state["stream"])
        self.delivered = int(state["delivered"])
        self.skipped = int(state["skipped"])
        self.seen = int(state["seen"])
        self.bad = set(state["bad"])

    def stats(self) -> dict[str, float]:
        """Counters worth logging: samples read and skipped, and the skip fraction."""
        return {
            "data_seen": self.seen,
            "data_skipped": self.skipped,
            "data_skip_fraction": self.skipped / self.seen if self.seen else 0.0,
        }


def balanced_weights(index: ShardIndex, num_classes: int, split: str) -> np.ndarray:
    """data.balanced: the class-balanced weights of the samples of ``index`` from their metadata labels; a sample
    whose labels cannot be read (or lie outside the manifest's classes) gets weight 0, is never drawn, and is
    named in a warning."""
    labels = index.labels()
    bad = [i for i, row in enumerate(labels) if not row or min(row) < 0 or max(row) >= num_classes]
    if len(bad) == len(labels):
        raise DataError(
            f"data.balanced: no sample of split {split!r} has readable labels within the manifest's {num_classes} "
            f"classes (first: {index.where(bad[0])}); rebuild the shards or set data.balanced=false"
        )
    bad_set = set(bad)
    good = [i for i in range(len(labels)) if i not in bad_set]
    weights = np.zeros(len(labels), dtype=np.float64)
    weights[good] = class_balanced_weights([labels[i] for i in good], num_classes)
    if bad:
        log.warning(
            "data.balanced: %d sample(s) of split %r have no readable labels within the manifest's classes and are "
            "never drawn (first: %s)", len(bad), split, index.where(bad[0]),
        )  # fmt: skip
    w = weights[good]
    log.info(
        "class-balanced sampling over %d clips of split %r: weights %.3g-%.3g (max / min %.1f)",
        len(good), split, w.min(), w.max(), w.max() / w.min(),
    )  # fmt: skip
    return weights


def build_loader(cfg: Config, split: str, **kwargs: Any) -> AVLoader:
    """The loader of ``split`` ('train', 'val', 'test' or 'retrieval'); see :class:`AVLoader` for the arguments."""
    return AVLoader(cfg, split, **kwargs)
