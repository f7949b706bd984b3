"""The replay memory of the continual methods: reservoir sampling on the device, one memory per rank.

Task-free, as STELLA's ``Buffer_task_free``: every clip a rank trains on is offered to the memory once, in stream
order, and Vitter's Algorithm R keeps a uniform sample of everything offered so far: the n-th clip (0-based)
takes slot n while the memory is not full, and afterwards replaces slot r for r uniform on 0..n when r falls
inside the memory (so it is kept with probability capacity / (n + 1)). A batch of B clips is inserted at once:
the B draws are made together and, where two clips of the batch pick the same slot, the later one wins, which is
exactly what inserting them one by one does. A draw takes ``count`` distinct slots uniformly among the filled
ones.

No decision reads a device value on the host: the number of clips offered, hence the number filled, is known on
the host (batch sizes are fixed), and which slots are written or drawn is decided by device random numbers from
the memory's own generator. Storage is preallocated on the training device in compact types chosen per field
(uint8 video frames before ImageNet normalisation, bf16 fbank; see :func:`clip_fields`).

The capacity is ``method.memory_size`` divided evenly over the ranks; each rank keeps its own memory and saves
it in its own checkpoint file (:meth:`state_dict`), so every rank resumes with its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Field:
    """One stored quantity: per-item shape, storage dtype, and how items are encoded / decoded."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    codec: str = "plain"
    """'plain' (cast), or 'frames' (ImageNet-normalised video <-> uint8 pixels)."""
    model_input: bool = False
    """A model input: a draw returns it in the dtype the caller asks for (other fields keep their own)."""


def clip_fields(num_frames: int, frame_size: int, target_length: int, num_mel_bins: int) -> dict[str, Field]:
    """The fields of a training clip: uint8 frames (3 bytes a pixel-triplet) and a bf16 fbank."""
    return {
        "video": Field((num_frames, 3, frame_size, frame_size), torch.uint8, "frames", model_input=True),
        "fbank": Field((target_length, num_mel_bins), torch.bfloat16, model_input=True),
    }


def _stats(device: torch.device) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    return mean, std


class ReplayMemory:
    """A reservoir of ``capacity`` items with the given fields (see the module docstring)."""

    def __init__(self, capacity: int, fields: Mapping[str, Field], *, device: torch.device, seed: int) -> None:
        if capacity <= 0:
            raise ValueError(f"replay memory capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.fields = dict(fields)
        self.device = device
        self.seen = 0
        """Items offered so far (host count: batch sizes are fixed, so no device read is needed)."""
        # one extra row: writes of items the reservoir drops land there and are never read
        self.store = {
            name: torch.zeros(capacity + 1, *f.shape, dtype=f.dtype, device=device) for name, f in fields.items()
        }
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._mean, self._std = _stats(device)

    @property
    def filled(self) -> int:
        return min(self.seen, self.capacity)

    def bytes_per_item(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.store.values())

    def nbytes(self) -> int:
        return self.bytes_per_item() * self.capacity

    # --- encoding --------------------------------------------------------------------------------------------------

    def _encode(self, name: str, x: Tensor) -> Tensor:
        f = self.fields[name]
        if f.codec == "frames":
            pixels = (x.float() * self._std + self._mean) * 255.0
            return pixels.round_().clamp_(0, 255).to(torch.uint8)
        return x.detach().to(f.dtype)

    def _decode(self, name: str, x: Tensor, dtype: torch.dtype) -> Tensor:
        f = self.fields[name]
        if f.codec == "frames":
            return ((x.float() / 255.0 - self._mean) / self._std).to(dtype)
        return x.to(dtype) if f.model_input else x

    # --- insert and draw -------------------------------------------------------------------------------------------

    def slots_for(self, batch: int) -> Tensor:
        """Reservoir slots of the next ``batch`` items (``capacity`` = dropped), advancing the offered count."""
        n_B = torch.arange(self.seen, self.seen + batch, device=self.device, dtype=torch.int64)
        u_B = torch.rand(batch, generator=self.generator, device=self.device, dtype=torch.float64)
        r_B = (u_B * (n_B + 1).double()).long()  # uniform on 0..n
        slot_B = torch.where(n_B < self.capacity, n_B, r_B)
        slot_B = torch.where(slot_B < self.capacity, slot_B, self.capacity)
        # a later item of the batch taking the same slot overwrites an earlier one: drop the earlier write
        later_same = (slot_B[:, None] == slot_B[None, :]) & torch.ones(batch, batch, device=self.device).triu(1).bool()
        slot_B = torch.where(later_same.any(dim=1), self.capacity, slot_B)
        self.seen += batch
        return slot_B

    @torch.no_grad()
    def insert(self, items: Mapping[str, Tensor]) -> None:
        """Offer a batch of items (every field, first dimension B) to the reservoir."""
        missing = set(self.fields) - set(items)
        if missing:
            raise KeyError(f"replay memory insert lacks the fields {sorted(missing)}")
        batch = next(iter(items.values())).shape[0]
        slot_B = self.slots_for(batch)
        for name in self.fields:
            self.store[name].index_copy_(0, slot_B, self._encode(name, items[name]))

    @torch.no_grad()
    def draw(self, count: int, *, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """``count`` distinct filled items chosen uniformly (model inputs decoded to ``dtype``)."""
        if not 0 < count <= self.filled:
            raise ValueError(f"cannot draw {count} items from a memory holding {self.filled}")
        keys = torch.rand(self.filled, generator=self.generator, device=self.device)
        idx = keys.argsort()[:count]
        return {name: self._decode(name, store.index_select(0, idx), dtype) for name, store in self.store.items()}

    # --- checkpoint ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The filled items (on the CPU), the offered count and the generator state."""
        return {
            "seen": self.seen,
            "capacity": self.capacity,
            "generator": self.generator.get_state(),
            "store": {name: t[: self.filled].cpu() for name, t in self.store.items()},  # sync-ok: checkpoint
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"the checkpoint's replay memory holds {state['capacity']} items per rank, this run's {self.capacity}: "
                f"method.memory_size and the number of processes must match the interrupted run"
            )
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        for name, t in state["store"].items():
            self.store[name][: t.shape[0]].copy_(t.to(self.device))
