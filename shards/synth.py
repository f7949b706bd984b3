"""Procedurally generated audio-video clips in the shard format: the default data of demos, tests and CPU benches.

Every class has a visual signature (shape, colour, motion path) and an audio signature (pitch, timbre,
rhythm). Sound and picture are tied together the way real events are: the object pulses in size and
brightness with the loudness envelope of its sound. Each clip varies its class signature (start position,
speed, size, colour and pitch jitter, rhythm phase and rate, background brightness, pixel and audio noise)
and adds a distractor (a grey blob moving at random, a faint tone at a random pitch) that belongs to no
class, so matching audio to video is learnable but not trivial.

Categories differ in their whole region of feature space (audio pitch band and timbre family, background
style and hue range), so that a model trained on a later category drifts away from an earlier one: one
category is one continual-learning task.

With ``pretrain_classes_per_category`` K > 0, every category also gets K classes of its own region that no
continual task has (pitches, hues and shapes between those of the continual classes), and all of them form one
more task, ``pretrain``, written last with ``"role": "pretrain"``: data to pre-train on before the continual
sequence, covering every kind of clip the sequence holds (as AudioSet-20k before VGGSound). Their class ids
come after the continual ones, and a clip depends only on (seed, class id, clip), so the continual tasks are the
same bytes with or without them.

Generation is deterministic for a seed (the same bytes for the same arguments, whatever the number of
workers): every clip draws from its own RNG seeded by (seed, class, clip), and shards are written in a
fixed order. The shards, retrieval copies and manifest are written by :mod:`shards.dataset`, as ``build``'s are.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shards.dataset import copy_retrieval, finish_dataset, retrieval_layout, task_entry, write_samples
from shards.manifest import CONTINUAL, PRETRAIN, SPLITS, builder_version, load_manifest, shard_relpath
from shards.media import VideoEncoding, encode_audio, encode_video
from shards.progress import progress
from shards.workers import map_isolated
from shards.writer import Sample

BUILDER = "shards synth"
PRETRAIN_TASK = "pretrain"

CATEGORY_NAMES = ("pulses", "chimes", "buzzes", "whistles", "drones", "clicks", "hums", "sirens")
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
MOTIONS = ("horizontal", "vertical", "circular", "diagonal", "zigzag", "hover")
TIMBRES = ("pure", "reed", "bright", "noisy")
BACKGROUNDS = ("plain", "gradient", "stripes", "checker")
RHYTHMS = (0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. All sizes are small by default so that a few hundred clips take seconds."""

    categories: int = 3
    classes_per_category: int = 4
    pretrain_classes_per_category: int = 0
    """K > 0: K more classes per category, none in a continual task, all in the last task 'pretrain'."""
    clips_per_class: int = 24
    seed: int = 0
    size: int = 96
    fps: int = 8
    duration: float = 4.0
    sample_rate: int = 16000
    test_fraction: float = 0.25
    retrieval_per_class: int = 2
    shard_size: int = 64
    keyframe_interval: int = 8
    codec: str = "vp9"
    audio_format: str = "flac"

    def __post_init__(self) -> None:
        checks = {
            "categories": self.categories >= 1,
            "classes_per_category": self.classes_per_category >= 1,
            "pretrain_classes_per_category": self.pretrain_classes_per_category >= 0,
            "clips_per_class": self.clips_per_class >= 2,
            "size": self.size >= 16 and self.size % 2 == 0,
            "fps": self.fps >= 1,
            "duration": self.duration * self.fps >= 1,
            "sample_rate": self.sample_rate >= 8000,
            "test_fraction": 0.0 < self.test_fraction < 1.0,
            "retrieval_per_class": self.retrieval_per_class >= 0,
            "shard_size": self.shard_size >= 1,
            "keyframe_interval": self.keyframe_interval >= 1,
            "codec": self.codec in ("vp9", "h264"),
            "audio_format": self.audio_format in ("flac", "wav"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"synth: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")
        if self.num_test >= self.clips_per_class:
            raise ValueError(
                f"synth: clips_per_class={self.clips_per_class} leaves no training clip with "
                f"test_fraction={self.test_fraction} and retrieval_per_class={self.retrieval_per_class}"
            )

    @property
    def num_continual_classes(self) -> int:
        return self.categories * self.classes_per_category

    @property
    def num_classes(self) -> int:
        """Every class of the dataset: the continual ones, then the pre-training ones."""
        return self.categories * (self.classes_per_category + self.pretrain_classes_per_category)

    @property
    def num_test(self) -> int:
        return max(self.retrieval_per_class, round(self.clips_per_class * self.test_fraction), 1)

    @property
    def num_frames(self) -> int:
        return int(round(self.duration * self.fps))

    @property
    def num_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))


@dataclass(frozen=True)
class ClassSignature:
    class_id: int
    name: str
    category: str
    shape: str
    hue: float
    motion: str
    background: str
    pitch: float
    timbre: str
    rhythm: float
    decay: float
    role: str = CONTINUAL
    """'continual' (a class of its category's task) or 'pretrain' (a class of the task 'pretrain')."""


def category_name(c: int) -> str:
    return CATEGORY_NAMES[c] if c < len(CATEGORY_NAMES) else f"category{c}"


def class_signatures(spec: SynthSpec) -> list[ClassSignature]:
    """Per-class signatures by class id: the continual classes of every category, then the pre-training ones.

    Categories occupy separate pitch bands, timbres, hue ranges and backgrounds; within a category, the
    continual classes spread over the band and the hue range, and its pre-training classes sit between them.
    """
    n_cat, n_cls, n_pre = spec.categories, spec.classes_per_category, spec.pretrain_classes_per_category
    sigs = []
    for c in range(n_cat):
        for k in range(n_cls):
            where = {"pitch_at": k / max(n_cls - 1, 1), "hue_at": 0.8 * k / (n_cat * n_cls)}
            class_id = c * n_cls + k
            sigs.append(_signature(c, k, n_cat=n_cat, class_id=class_id, name=f"{k:02d}", role=CONTINUAL, **where))
    for c in range(n_cat):
        for j in range(n_pre):
            where = {"pitch_at": (j + 0.5) / n_pre, "hue_at": 0.8 * (j + 0.5) / (n_cat * n_pre)}
            class_id = n_cat * n_cls + c * n_pre + j
            name = f"pre{j:02d}"
            sigs.append(_signature(c, n_cls + j, n_cat=n_cat, class_id=class_id, name=name, role=PRETRAIN, **where))
    return sigs


def _signature(
    c: int, k: int, *, n_cat: int, class_id: int, name: str, role: str, pitch_at: float, hue_at: float
) -> ClassSignature:
    """Class ``k`` of category ``c``: ``pitch_at`` in [0, 1] places its pitch in the category's band, ``hue_at``
    its hue after the category's first hue; shape, motion, rhythm and decay cycle with ``k``."""
    band_lo = 160.0 * (18.0 ** (c / max(n_cat, 2)))  # log-spaced pitch bands from 160 Hz upwards
    band_hi = 160.0 * (18.0 ** ((c + 0.8) / max(n_cat, 2)))
    shape = SHAPES[(k + 2 * c) % len(SHAPES)]
    return ClassSignature(
        class_id=class_id,
        name=f"{category_name(c)}_{name}_{shape}",
        category=category_name(c),
        shape=shape,
        hue=(c / n_cat + hue_at) % 1.0,
        motion=MOTIONS[(2 * k + c) % len(MOTIONS)],
        background=BACKGROUNDS[c % len(BACKGROUNDS)],
        pitch=band_lo * (band_hi / band_lo) ** pitch_at,
        timbre=TIMBRES[c % len(TIMBRES)],
        rhythm=RHYTHMS[(k + c) % len(RHYTHMS)],
        decay=0.08 if (k + c) % 2 == 0 else 0.3,
        role=role,
    )


# ---------------------------------------------------------------------------------------------------------------------
# One clip
# ---------------------------------------------------------------------------------------------------------------------


def _envelope(t: np.ndarray, rate: float, phase: float, decay: float) -> np.ndarray:
    """Loudness of a pulse train: a 5 ms attack then exponential decay, every 1/rate s, floor 0.08."""
    u = np.mod(t - phase, 1.0 / rate)
    return 0.08 + 0.92 * np.exp(-u / decay) * (1.0 - np.exp(-u / 0.005))


def _audio(sig: ClassSignature, spec: SynthSpec, rng: np.random.Generator, rate: float, phase: float) -> np.ndarray:
    n, sr = spec.num_samples, spec.sample_rate
    t = np.arange(n, dtype=np.float64) / sr
    pitch = sig.pitch * 2.0 ** (rng.uniform(-0.4, 0.4) / 12.0)
    theta = 2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi)
    if sig.timbre == "pure":
        tone = np.sin(theta) + 0.25 * np.sin(2 * theta)
    elif sig.timbre == "reed":
        tone = sum(np.sin(h * theta) / h for h in (1, 3, 5, 7))
    elif sig.timbre == "bright":
        tone = sum(np.sin(h * theta) / h for h in range(1, 9) if h * pitch < sr / 2)
    else:  # noisy: a noise band around the pitch plus a weak tone
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1.0 / sr)
        spectrum *= np.exp(-0.5 * ((freqs - pitch) / (0.15 * pitch)) ** 2)
        band = np.fft.irfft(spectrum, n)
        tone = band / (np.abs(band).max() + 1e-9) + 0.3 * np.sin(theta)
    tone = tone / (np.abs(tone).max() + 1e-9)
    signal = tone * _envelope(t, rate, phase, sig.decay)
    distractor = rng.uniform(0.03, 0.12) * np.sin(2 * np.pi * math.exp(rng.uniform(math.log(100), math.log(5000))) * t)
    signal = signal + distractor + rng.uniform(0.005, 0.04) * rng.standard_normal(n)
    signal *= rng.uniform(0.35, 0.8) / (np.abs(signal).max() + 1e-9)
    return np.round(signal * 32767).astype(np.int16)


def _shape_alpha(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, px: float) -> np.ndarray:
    """Soft-edged coverage (0..1) of a shape of radius r centred at the origin of (dx, dy)."""
    if shape == "circle":
        dist = np.hypot(dx, dy) - r
    elif shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    elif shape == "diamond":
        dist = np.abs(dx) + np.abs(dy) - 1.1 * r
    elif shape == "ring":
        dist = np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r
    elif shape == "cross":
        bar_h = np.maximum(np.abs(dx) - r, np.abs(dy) - 0.3 * r)
        bar_v = np.maximum(np.abs(dy) - r, np.abs(dx) - 0.3 * r)
        dist = np.minimum(bar_h, bar_v)
    else:  # triangle, apex up
        dist = np.maximum(np.maximum(dy - 0.7 * r, -dy * 0.5 + np.abs(dx) * 0.87 - 0.5 * r), -r)
    return np.clip(0.5 - dist / px, 0.0, 1.0)


def _path(motion: str, t: np.ndarray, speed: float, x0: float, y0: float, phi: float) -> tuple[np.ndarray, np.ndarray]:
    w = 2 * np.pi * speed * t + phi
    if motion == "horizontal":
        return 0.5 + 0.3 * np.sin(w), np.full_like(t, y0)
    if motion == "vertical":
        return np.full_like(t, x0), 0.5 + 0.3 * np.sin(w)
    if motion == "circular":
        return 0.5 + 0.25 * np.cos(w), 0.5 + 0.25 * np.sin(w)
    if motion == "diagonal":
        return 0.5 + 0.25 * np.sin(w), 0.5 + 0.25 * np.sin(w)
    if motion == "zigzag":
        tri = 2 * np.abs(np.mod(w / (2 * np.pi), 1.0) - 0.5)
        return 0.2 + 0.6 * tri, 0.5 + 0.2 * np.sin(3 * w)
    return x0 + 0.03 * np.sin(3 * w), y0 + 0.03 * np.cos(2 * w)  # hover


def _background(style: str, hue: float, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    level = rng.uniform(0.12, 0.35)
    tint = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.35, 1.0), dtype=np.float32)
    if style == "plain":
        pattern = np.ones_like(xx)
    elif style == "gradient":
        pattern = 0.5 + xx * rng.uniform(0.6, 1.0)
    elif style == "stripes":
        period = rng.uniform(0.12, 0.2)
        pattern = 0.7 + 0.3 * (np.mod(yy + rng.uniform(0, 1), period) < period / 2)
    else:  # checker
        cell = rng.uniform(0.15, 0.25)
        pattern = 0.7 + 0.3 * ((np.floor(xx / cell) + np.floor(yy / cell)) % 2)
    return level * pattern[..., None] * tint


def _video(sig: ClassSignature, spec: SynthSpec, rng: np.random.Generator, rate: float, phase: float) -> np.ndarray:
    size, n = spec.size, spec.num_frames
    px = 1.0 / size
    t = (np.arange(n) + 0.5) / spec.fps
    # the object's loudness over each frame's exposure: sound and picture pulse together
    sub = t[:, None] + (np.arange(8)[None, :] / 8.0 - 0.5) / spec.fps
    env = _envelope(sub, rate, phase, sig.decay).mean(axis=1)
    speed = 0.25 * rng.uniform(0.6, 1.4) * rng.choice([-1.0, 1.0])
    cx, cy = _path(sig.motion, t, speed, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0, 2 * np.pi))
    radius = 0.13 * rng.uniform(0.8, 1.25) * (1.0 + 0.3 * env)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * px
    dx = xx[None] - cx[:, None, None].astype(np.float32)
    dy = yy[None] - cy[:, None, None].astype(np.float32)
    alpha = _shape_alpha(sig.shape, dx, dy, radius[:, None, None].astype(np.float32), px)[..., None]
    hue = (sig.hue + rng.uniform(-0.025, 0.025)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), 1.0), dtype=np.float32)
    brightness = (0.45 + 0.55 * env)[:, None, None, None].astype(np.float32)
    frames = _background(sig.background, sig.hue, size, rng)[None] * (1 - alpha) + alpha * colour * brightness
    # distractor: a grey blob wandering at random, unrelated to the class
    steps = np.cumsum(rng.normal(0, 0.03, size=(n, 2)), axis=0) + rng.uniform(0.2, 0.8, size=2)
    steps = np.abs(np.mod(steps + 1.0, 2.0) - 1.0)  # reflect into [0, 1]
    ddx, ddy = xx[None] - steps[:, 0, None, None], yy[None] - steps[:, 1, None, None]
    blob = np.exp(-(ddx**2 + ddy**2) / (2 * 0.05**2))[..., None] * rng.uniform(0.2, 0.45)
    frames = frames * (1 - blob) + blob * 0.6
    frames = frames + rng.normal(0, rng.uniform(0.01, 0.03), size=frames.shape)
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class ClipJob:
    spec: SynthSpec
    sig: ClassSignature
    clip: int
    split: str
    task: str

    @property
    def index(self) -> int:
        return self.sig.class_id * self.spec.clips_per_class + self.clip

    @property
    def key(self) -> str:
        return clip_key(self.sig, self.clip)


def clip_key(sig: ClassSignature, clip: int) -> str:
    return f"c{sig.class_id:03d}_{clip:04d}"


def render_clip(job: ClipJob) -> Sample:
    """Generate, encode and describe one clip; depends only on (seed, class, clip)."""
    spec, sig = job.spec, job.sig
    rng = np.random.default_rng([spec.seed, sig.class_id, job.clip])
    rate = sig.rhythm * rng.uniform(0.92, 1.08)
    phase = rng.uniform(0.0, 1.0 / rate)
    frames = _video(sig, spec, rng, rate, phase)
    audio = _audio(sig, spec, rng, rate, phase)
    enc = VideoEncoding(codec=spec.codec, fps=spec.fps, keyframe_interval=spec.keyframe_interval)
    meta = {
        "key": job.key,
        "index": job.index,
        "source": f"synth:seed={spec.seed}/class={sig.class_id}/clip={job.clip}",
        "labels": [sig.class_id],
        "label_names": [sig.name],
        "category": sig.category,
        "task": job.task,
        "split": job.split,
        "duration": spec.duration,
        "fps": spec.fps,
        "num_frames": int(frames.shape[0]),
        "sample_rate": spec.sample_rate,
        "num_samples": int(audio.shape[0]),
        "start": 0.0,
    }
    members = {
        "mp4": encode_video(frames, enc),
        spec.audio_format: encode_audio(audio, spec.sample_rate, spec.audio_format),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    return Sample(job.key, members)


# ---------------------------------------------------------------------------------------------------------------------
# A whole dataset
# ---------------------------------------------------------------------------------------------------------------------


def plan_splits(spec: SynthSpec, sig: ClassSignature) -> dict[str, list[int]]:
    """Clip numbers of one class per split; retrieval clips are a subset of the test clips."""
    order = np.random.default_rng([spec.seed, sig.class_id, 1 << 20]).permutation(spec.clips_per_class)
    test = sorted(int(i) for i in order[: spec.num_test])
    train = sorted(int(i) for i in order[spec.num_test :])
    return {"train": train, "test": test, "retrieval": test[: spec.retrieval_per_class]}


@dataclass
class SynthTask:
    name: str
    category: str
    """Its category, or for the task 'pretrain' every category joined by '+'."""
    role: str
    classes: list[ClassSignature]
    shards: dict[str, list[list[ClipJob]]] = field(default_factory=dict)
    """'train' and 'test': the clip jobs of each shard, in order."""
    retrieval: set[str] = field(default_factory=set)
    """The keys of the test clips that are copied into the retrieval split."""


def plan(spec: SynthSpec) -> list[SynthTask]:
    """Tasks in order (one per category, then 'pretrain' if it has classes), each with its clip jobs in shards."""
    sigs = class_signatures(spec)
    tasks: list[SynthTask] = []
    for c in range(spec.categories):
        name = category_name(c)
        members = [s for s in sigs if s.role == CONTINUAL and s.category == name]
        tasks.append(_plan_task(spec, SynthTask(name, name, CONTINUAL, members), order_seed=c))
    pretrain = [s for s in sigs if s.role == PRETRAIN]
    if pretrain:
        categories = "+".join(category_name(c) for c in range(spec.categories))
        task = SynthTask(PRETRAIN_TASK, categories, PRETRAIN, pretrain)
        tasks.append(_plan_task(spec, task, order_seed=spec.categories))
    return tasks


def _plan_task(spec: SynthSpec, task: SynthTask, *, order_seed: int) -> SynthTask:
    per_split: dict[str, list[ClipJob]] = {"train": [], "test": []}
    for sig in task.classes:
        for split, clips in plan_splits(spec, sig).items():
            if split == "retrieval":
                task.retrieval.update(clip_key(sig, clip) for clip in clips)
            else:
                per_split[split].extend(ClipJob(spec, sig, clip, split, task.name) for clip in clips)
    # the training order is shuffled so that a shard mixes classes; the test split stays sorted
    perm = np.random.default_rng([spec.seed, order_seed, 1 << 21]).permutation(len(per_split["train"]))
    per_split["train"] = [per_split["train"][i] for i in perm]
    task.shards = {
        split: [jobs[i : i + spec.shard_size] for i in range(0, len(jobs), spec.shard_size)]
        for split, jobs in per_split.items()
    }
    return task


def _preprocessing(spec: SynthSpec) -> dict[str, Any]:
    return {
        "video_codec": spec.codec,
        "fps": spec.fps,
        "frame_size": spec.size,
        "keyframe_interval": spec.keyframe_interval,
        "audio_format": spec.audio_format,
        "sample_rate": spec.sample_rate,
        "audio_channels": 1,
        "channel_rule": "mono source",
        "bits_per_sample": 16,
        "clip_duration": spec.duration,
    }


def generate(
    spec: SynthSpec, out: str | os.PathLike, *, workers: int | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Write the synthetic dataset for ``spec`` into ``out`` and return its manifest.

    ``out`` must be empty, absent, or an earlier synthetic dataset (which is replaced; when it was made from
    the same spec by the same builder version it is kept as is).
    """
    out = Path(out)
    previous = _previous_synth(out)
    if previous is not None and previous.get("synth") == asdict(spec) and _complete(out, previous):
        return previous
    if previous is not None:
        for task in previous["tasks"]:
            shutil.rmtree(out / task["name"], ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan(spec)
    samples = _render(tasks, workers=workers, show_progress=show_progress)
    manifest_tasks = [_write_task(out, task, samples, shard_size=spec.shard_size) for task in tasks]
    sigs = class_signatures(spec)
    categories: dict[str, list[str]] = {}
    for sig in sigs:
        categories.setdefault(sig.category, []).append(sig.name)
    return finish_dataset(
        out,
        preprocessing=_preprocessing(spec),
        classes=[s.name for s in sigs],
        categories=categories,
        tasks=manifest_tasks,
        rejects=[],
        builder=BUILDER,
        extra={"synth": asdict(spec), "class_signatures": [asdict(s) for s in sigs]},
    )


def _render(tasks: list[SynthTask], *, workers: int | None, show_progress: bool) -> Iterator[Sample]:
    """The samples of every train and test shard, in task, split and shard order."""
    jobs = [job for t in tasks for split in ("train", "test") for shard in t.shards[split] for job in shard]
    workers = max(1, min(workers or os.cpu_count() or 1, 32))
    # processes from forkserver / spawn (workers.map_isolated): a fork of a process that already runs DALI or
    # OpenMP threads (a test session, a notebook) can deadlock; one worker runs in this process
    samples = map_isolated(render_clip, jobs, workers=workers if workers > 1 else 0, on_crash=_crashed)
    return progress(samples, total=len(jobs), desc="synth clips", unit="clip") if show_progress else samples


def _write_task(out: Path, task: SynthTask, samples: Iterator[Sample], *, shard_size: int) -> dict[str, Any]:
    """Write a task's train and test shards from ``samples``, then its retrieval copies; return its manifest entry."""
    entries: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    test_shard_of: dict[str, str] = {}
    for split in ("train", "test"):
        for i, jobs in enumerate(task.shards[split]):
            written = write_samples(out, shard_relpath(task.name, split, i), [_take(samples, job) for job in jobs])
            entries[split].append(written.entry)
            if split == "test":
                test_shard_of.update(dict.fromkeys(written.keys, written.rel))
    test_keys = [job.key for shard in task.shards["test"] for job in shard]
    for rel, keys in retrieval_layout(task.name, test_keys, task.retrieval, shard_size=shard_size):
        entries["retrieval"].append(copy_retrieval(out, rel, keys, test_shard_of).entry)
    classes = [s.name for s in task.classes]
    return task_entry(name=task.name, category=task.category, classes=classes, shards=entries, role=task.role)


def _crashed(job: ClipJob, reason: str) -> Sample:
    raise RuntimeError(f"synth clip {job.key}: {reason}")


def _take(stream: Iterator[Sample], job: ClipJob) -> Sample:
    sample = next(stream)
    assert sample.key == job.key, (sample.key, job.key)  # pool.map keeps order
    return sample


def _previous_synth(out: Path) -> dict[str, Any] | None:
    if not out.exists() or not any(out.iterdir()):
        return None
    if not (out / "manifest.json").is_file():
        raise FileExistsError(
            f"{out} is not empty and holds no dataset; choose an empty or new --out directory (nothing was written)"
        )
    manifest = load_manifest(out)
    if manifest.get("builder") != BUILDER:
        raise FileExistsError(
            f"{out} holds a dataset built by {manifest.get('builder')!r}, not a synthetic one; "
            f"choose another --out directory (nothing was written)"
        )
    return manifest


def _complete(out: Path, manifest: dict[str, Any]) -> bool:
    if manifest.get("builder_version") != builder_version():
        return False
    return all(
        (out / s["path"]).is_file() and (out / s["index"]).is_file()
        for t in manifest["tasks"]
        for split in SPLITS
        for s in t["splits"][split]["shards"]
    )
