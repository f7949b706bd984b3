"""In-memory synthetic clips in the batch contract (``data.source=synthetic``): trying the trainer without files.

Every clip ``i`` is a fixed function of ``(seed, i)``: a class ``c = i % C`` and two latent numbers ``u0, u1`` in
[0, 1) that both modalities show, so audio and video of one clip match and retrieval between them can be learnt
beyond the class level:

- video: a square whose colour is the class's, at a position set by ``(u0, u1)``, drifting with a class-specific
  velocity over the frames, on a noisy background;
- audio: a band of mel bins centred at a bin set by ``u0``, pulsing with a class-specific period from a phase set
  by ``u1``, on noise.

Modality imbalance (``data.synthetic_weak_modality`` = 'audio' or 'video', ``data.synthetic_noise`` = p): with
probability p, drawn once per clip from its own generator, the weak modality shows the signature (colour and
velocity, or pulse period) of a uniformly drawn class instead of the clip's own; the other modality and every
other number of the clip stay as they are. The weak modality alone can then be right on at most
``1 - p * (C - 1) / C`` of the clips, and joint training can lean on the strong one (the setting MLA is for).

Splits: 'train' holds clips ``0 .. N-1`` (``N = data.synthetic_clips``); 'test' and 'retrieval' the held-out clips
``N .. 2N-1``. With ``data.val_fraction`` > 0, 'val' is a fixed part of the training clips
(:func:`fastav.data.index.holdout`) and 'train' the rest. Class ``c`` belongs to task ``c * T // C`` (``T =
data.synthetic_tasks``), named ``task0``, ``task1`` ...; a loader can be restricted to some tasks. The order of the
clips comes from the same :class:`~fastav.data.index.SampleStream` the shard loader uses (a permutation per epoch,
interleaved rank slices, two integers of state), and the loader follows :class:`fastav.data.AVLoader`'s protocol:
``for batch in loader`` yields the rest of the current epoch, ``len`` is the batches per epoch, ``epoch`` the
current epoch, ``state_dict`` / ``load_state_dict`` the position; evaluation batches pad the last batch with
``valid`` False.

Shape suffixes: B batch, T frames (video) or fbank frames (audio), F mel bins, H/W pixels, C classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from fastav.config import Config
from fastav.data.index import SampleStream, class_balanced_weights, holdout


def synthetic_task_names(cfg: Config) -> list[str]:
    """The task names of the synthetic source, in order."""
    return [f"task{k}" for k in range(cfg.data.synthetic_tasks)]


class SyntheticAV:
    def __init__(
        self,
        cfg: Config,
        split: str = "train",
        *,
        tasks: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        train: bool | None = None,
        batch_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        d = cfg.data
        if split not in ("train", "val", "test", "retrieval"):
            raise ValueError(f"synthetic data: unknown split {split!r}; use 'train', 'val', 'test' or 'retrieval'")
        self.frames, self.size = d.num_frames, d.frame_size
        self.time, self.mels = d.target_length, d.num_mel_bins
        self.dtype = torch.bfloat16 if d.dtype == "bfloat16" else torch.float32
        self.num_classes, self.num_tasks = d.synthetic_classes, d.synthetic_tasks
        self.train = (split == "train") if train is None else train
        self.batch_size = batch_size or (d.batch_size if self.train else cfg.eval.batch_size)
        self.seed = cfg.train.seed
        self.weak, self.noise = d.synthetic_weak_modality, d.synthetic_noise
        self.device = torch.device(device)
        self.task_names = synthetic_task_names(cfg)
        offset = 0 if split in ("train", "val") else d.synthetic_clips
        ids = torch.arange(offset, offset + d.synthetic_clips)
        if tasks is not None:
            unknown = sorted(set(tasks) - set(self.task_names))
            if unknown:
                raise ValueError(f"synthetic data has no task {unknown[0]!r}; its tasks: {', '.join(self.task_names)}")
            wanted = torch.tensor([self.task_names.index(t) for t in tasks])
            ids = ids[torch.isin(self.task_of(ids), wanted)]
        if split in ("train", "val") and d.val_fraction > 0:
            kept, held = holdout(len(ids), d.val_fraction)
            ids = ids[torch.from_numpy(held if split == "val" else kept)]
        self.ids = ids
        weights = None
        if self.train and d.balanced:  # one label per clip, its class id % synthetic_classes
            weights = class_balanced_weights([[c] for c in (ids % self.num_classes).tolist()], self.num_classes)
        self.stream = SampleStream(
            len(ids),
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle=self.train,
            drop_last=self.train,
            weights=weights,
        )
        if self.train and self.stream.per_rank < self.batch_size:
            raise ValueError(
                f"synthetic data: {len(ids)} training clips give {self.stream.per_rank} per rank, fewer than one batch "
                f"of {self.batch_size}; raise data.synthetic_clips or lower data.batch_size"
            )
        per_rank = self.stream.per_rank
        self.batches_per_epoch = per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)
        self.delivered = 0

    def task_of(self, ids: Tensor) -> Tensor:
        return (ids % self.num_classes) * self.num_tasks // self.num_classes

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.delivered // self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "delivered": self.delivered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.delivered = int(state["delivered"])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        remaining = self.batches_per_epoch - self.delivered % self.batches_per_epoch
        for _ in range(remaining):
            rows, valid, start_epoch = [], [], self.stream.epoch
            while len(rows) < self.batch_size:
                if not self.train and self.stream.epoch != start_epoch:  # evaluation: pad the last batch
                    rows.append(rows[-1])
                    valid.append(False)
                    continue
                position, real, _, _ = self.stream.next()
                rows.append(int(self.ids[position]))
                valid.append(real)
            self.delivered += 1
            yield self.batch(torch.tensor(rows), torch.tensor(valid))

    def batch(self, ids_B: Tensor, valid_B: Tensor | None = None) -> dict[str, Tensor]:
        """The batch-contract dict of the given clip ids."""
        samples = [self.sample(int(i)) for i in ids_B]
        video = torch.stack([s[0] for s in samples])
        fbank = torch.stack([s[1] for s in samples])
        labels = torch.nn.functional.one_hot(ids_B % self.num_classes, self.num_classes).float()
        valid = torch.ones(len(ids_B), dtype=torch.bool) if valid_B is None else valid_B
        return {
            "video": video.to(self.device, self.dtype),
            "fbank": fbank.to(self.device, self.dtype),
            "labels": labels.to(self.device),
            "task": self.task_of(ids_B).to(self.device),
            "index": ids_B.to(self.device, torch.int64),
            "valid": valid.to(self.device),
        }

    def sample(self, i: int) -> tuple[Tensor, Tensor]:
        """(video (T, 3, H, W), fbank (T, F)) of clip ``i``; a fixed function of ``(seed, i)``."""
        gen = torch.Generator().manual_seed(self.seed * 7_919 + i * 104_729 + 17)
        c = i % self.num_classes
        u0, u1 = torch.rand(2, generator=gen, dtype=torch.float64).tolist()  # sync-ok: CPU generator, test data
        shown = {"audio": c, "video": c}
        if self.weak != "none" and self.noise > 0:
            swap_gen = torch.Generator().manual_seed(self.seed * 7_919 + i * 104_729 + 0x5EAC)
            if float(torch.rand((), generator=swap_gen)) < self.noise:  # sync-ok: CPU generator, test data
                shown[self.weak] = int(torch.randint(0, self.num_classes, (), generator=swap_gen))
        colour, velocity, _ = self._signature(shown["video"])
        _, _, period = self._signature(shown["audio"])
        return self._video(gen, u0, u1, colour, velocity), self._audio(gen, u0, u1, period)

    def _signature(self, c: int) -> tuple[Tensor, Tensor, int]:
        """Class ``c``'s colour (3,), velocity (2,) and audio pulse period."""
        class_gen = torch.Generator().manual_seed(self.seed * 31 + c)
        colour = torch.rand(3, generator=class_gen) * 4 - 2
        velocity = (torch.rand(2, generator=class_gen) - 0.5) * 0.2
        period = 4 + int(torch.randint(0, 12, (1,), generator=class_gen))
        return colour, velocity, period

    def _video(self, gen: torch.Generator, u0: float, u1: float, colour: Tensor, velocity: Tensor) -> Tensor:
        S, T = self.size, self.frames
        side = max(S // 4, 2)
        video_TCHW = torch.randn(T, 3, S, S, generator=gen) * 0.3
        for t in range(T):
            x = min(max(u0 + float(velocity[0]) * t, 0.0), 1.0)
            y = min(max(u1 + float(velocity[1]) * t, 0.0), 1.0)
            top, left = int(y * (S - side)), int(x * (S - side))
            video_TCHW[t, :, top : top + side, left : left + side] += colour[:, None, None]
        return video_TCHW

    def _audio(self, gen: torch.Generator, u0: float, u1: float, period: int) -> Tensor:
        T, F = self.time, self.mels
        fbank_TF = torch.randn(T, F, generator=gen) * 0.3
        width = max(F // 16, 2)
        low = int(u0 * (F - width))
        step = max(T // 64, 1)
        t_T = torch.arange(T) // step
        on_T = ((t_T + int(u1 * period)) % period) < period // 2
        fbank_TF[:, low : low + width] += 2.0 * on_T[:, None].float()
        return fbank_TF
