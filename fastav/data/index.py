"""Random access to the samples of a split through the DALI index files, and the per-rank sample order.

:class:`ShardIndex` reads the ``.idx`` beside every tar of the chosen split and tasks (no tar is scanned) and
memory-maps the tars, so fetching a sample's members is a slice of a mapping. :class:`SampleStream` decides
which sample each rank reads next: a permutation per epoch from ``(seed, epoch)``, the same on every rank, cut
into ``world_size`` interleaved slices of equal length so that every rank gets the same number of batches (or,
with class-balanced sampling, a weighted draw with replacement from the same ``(seed, epoch)``, cut the same way).
Its whole state is two integers, which is what makes a resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards.manifest import shard_paths
from shards.writer import read_index

MEMBERS = ("mp4", "flac", "json")
_MAGIC = {"mp4": (4, b"ftyp"), "flac": (0, b"fLaC"), "wav": (0, b"RIFF")}


class SampleError(ValueError):
    """A sample cannot be used (missing or malformed member); the message names the shard and the key."""


@dataclass(frozen=True)
class Fetched:
    video: np.ndarray
    audio: np.ndarray
    meta: dict[str, Any]


class ShardIndex:
    """The samples of one split (optionally some tasks) of a dataset directory, addressable by position."""

    def __init__(
        self, root: str | os.PathLike, manifest: Mapping[str, Any], split: str, tasks: list[str] | None = None
    ) -> None:
        self.root = Path(root)
        self.audio_ext = "wav" if manifest["preprocessing"]["audio_format"] == "wav" else "flac"
        self.members = ("mp4", self.audio_ext, "json")
        self.tars: list[Path] = []
        shard_of, locs, keys = [], [], []
        for tar, idx in shard_paths(root, manifest, split, tasks):
            sid = len(self.tars)
            self.tars.append(tar)
            for entries in read_index(idx):
                by_ext = {ext: (offset, size) for ext, offset, size, _ in entries}
                shard_of.append(sid)
                locs.append([by_ext.get(ext, (-1, -1)) for ext in self.members])
                keys.append(entries[0][3].split(".", 1)[0])
        if not keys:
            raise SampleError(f"{root}: split {split!r} of tasks {tasks or 'all'} has no samples")
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.locs = np.asarray(locs, dtype=np.int64)  # (N, 3 members, (offset, size))
        self.keys = keys
        self._maps: dict[int, mmap.mmap] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, positions: np.ndarray) -> None:
        """Keep only the samples at ``positions`` (in that order); positions are renumbered from 0."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            raise SampleError(f"{self.root}: no sample left after selecting a subset of the split")
        self.shard_of = self.shard_of[positions]
        self.locs = self.locs[positions]
        self.keys = [self.keys[i] for i in positions]

    def where(self, i: int) -> str:
        return f"{self.tars[self.shard_of[i]]} key {self.keys[i]}"

    def _map(self, sid: int) -> mmap.mmap:
        m = self._maps.get(sid)
        if m is None:
            with open(self.tars[sid], "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[sid] = m
        return m

    def raw(self, i: int) -> dict[str, bytes]:
        """The members of sample ``i`` as bytes (missing members are absent)."""
        m = self._map(int(self.shard_of[i]))
        out = {}
        for ext, (offset, size) in zip(self.members, self.locs[i], strict=True):
            if offset >= 0:
                out[ext] = m[offset : offset + size]
        return out

    def labels(self) -> list[list[int] | None]:
        """Every sample's ``labels`` from its metadata member, in position order; ``None`` where the member is
        missing or unreadable (such a sample is reported by :meth:`fetch` when it is read)."""
        out: list[list[int] | None] = []
        member = self.members.index("json")
        for i in range(len(self)):
            offset, size = self.locs[i, member]  # only the metadata is read: the media stay on disk
            try:
                if offset < 0:
                    raise ValueError("no metadata member")
                text = self._map(int(self.shard_of[i]))[offset : offset + size]
                out.append([int(c) for c in json.loads(text)["labels"]])
            except (KeyError, ValueError, TypeError):
                out.append(None)
        return out

    def fetch(self, i: int) -> Fetched:
        """Sample ``i``'s encoded video and audio (zero-copy views) and parsed metadata, validated."""
        m = self._map(int(self.shard_of[i]))
        views = []
        for ext, (offset, size) in zip(self.members, self.locs[i], strict=True):
            if offset < 0:
                raise SampleError(f"{self.where(i)}: member .{ext} is missing")
            if size == 0:
                raise SampleError(f"{self.where(i)}: member .{ext} is empty")
            if offset + size > len(m):
                raise SampleError(f"{self.where(i)}: member .{ext} runs past the end of the tar (truncated shard?)")
            view = np.frombuffer(m, dtype=np.uint8, count=size, offset=offset)
            at, magic = _MAGIC.get(ext, (0, b""))
            if magic and bytes(view[at : at + len(magic)]) != magic:
                raise SampleError(f"{self.where(i)}: member .{ext} is not a {ext} file (bad header)")
            views.append(view)
        try:
            meta = json.loads(bytes(views[2]))
            for key in ("fps", "num_frames", "labels", "index", "task"):
                meta[key]  # noqa: B018 - presence check
        except (ValueError, KeyError) as err:
            raise SampleError(f"{self.where(i)}: member .json is unreadable or incomplete ({err})") from None
        if meta["num_frames"] <= 0:
            raise SampleError(f"{self.where(i)}: metadata says the video has no frames")
        return Fetched(views[0], views[1], meta)


def holdout(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(kept, held_out)`` of ``n`` samples, ``round(fraction * n)`` of them held out (at least one, at
    most ``n - 1``; none when ``fraction`` is 0), both sorted. A fixed draw that depends on ``n`` alone, so every
    run over the same samples holds out the same ones whatever its seed (the validation split of fine-tuning)."""
    if fraction <= 0:
        return np.arange(n), np.arange(0)
    count = min(max(1, round(fraction * n)), n - 1)
    perm = np.random.default_rng([n, 0x7A1]).permutation(n)
    return np.sort(perm[count:]), np.sort(perm[:count])


def class_balanced_weights(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """CAV-MAE's class-balanced sampling weights: for each sample, the sum over its labels ``c`` of
    ``1000 / (count_c + 0.01)``, where ``count_c`` counts the samples labelled ``c`` (float64, one per sample)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for row in labels:
        counts[np.asarray(row, dtype=np.int64)] += 1.0
    per_class = 1000.0 / (counts + 0.01)
    weights = np.array([per_class[np.asarray(row, dtype=np.int64)].sum() for row in labels], dtype=np.float64)
    if not len(weights) or not np.all(weights > 0):
        raise SampleError("class-balanced sampling needs at least one label on every sample")
    return weights


class SampleStream:
    """Positions of the samples one rank reads, epoch after epoch.

    ``shuffle``: a permutation of all samples per epoch from ``(seed, epoch)``, identical on every rank; rank
    ``r`` reads permutation positions ``r, r + W, r + 2W, ...``. ``per_rank = N // W`` positions per epoch when
    ``drop_last`` (training: equal counts, the remainder changes every epoch), else ``ceil(N / W)`` with the
    positions past ``N`` marked as padding (evaluation: every sample is read exactly once over all ranks).
    ``weights`` (with ``shuffle``): instead of the permutation, N draws with replacement, sample ``i`` with
    probability ``weights[i] / sum(weights)``, from the same ``(seed, epoch)``, read by the ranks in the same way
    (``torch.utils.data.WeightedRandomSampler`` made deterministic and distributed).
    """

    def __init__(
        self,
        n: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        weights: np.ndarray | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if drop_last and n < world_size:
            raise SampleError(f"{n} samples cannot be split evenly over {world_size} ranks")
        if weights is not None:
            if not shuffle:
                raise ValueError("weighted sampling draws at random: it needs shuffle=True (training)")
            weights = np.asarray(weights, dtype=np.float64)
            usable = np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0
            if weights.shape != (n,) or not usable:
                raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.probs = None if weights is None else weights / weights.sum()
        self.per_rank = n // world_size if drop_last else -(-n // world_size)
        self.epoch = 0
        self.pos = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            if self.probs is not None:
                self._perm = rng.choice(self.n, size=self.n, replace=True, p=self.probs)
            elif self.shuffle:
                self._perm = rng.permutation(self.n)
            else:
                self._perm = np.arange(self.n)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next(self) -> tuple[int, bool, int, int]:
        """(sample id, is real (not padding), epoch, position) of the next sample; advances."""
        epoch, pos = self.epoch, self.pos
        g = self.rank + pos * self.world_size
        real = g < self.n
        sample = int(self._order(epoch)[g % self.n])
        self.pos += 1
        if self.pos == self.per_rank:
            self.epoch, self.pos = self.epoch + 1, 0
        return sample, real, epoch, pos

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
