"""The replay memory: reservoir sampling is uniform over the stream and equals one-by-one insertion, draws are uniform
without replacement, storage is compact, state survives a round trip, and nothing reads a device value on the host."""

from __future__ import annotations

import math

import pytest
import torch

from fastav.continual.memory import Field, ReplayMemory, clip_fields

IDS = {"id": Field((), torch.int64)}


def _stream(memory: ReplayMemory, total: int, batch: int) -> None:
    for start in range(0, total, batch):
        memory.insert({"id": torch.arange(start, min(start + batch, total))})


def test_reservoir_keeps_every_item_of_the_stream_with_equal_probability() -> None:
    """Inclusion frequencies over 3000 independent streams of 60 items into 12 slots (batches of 7, so batches
    straddle the moment the memory fills): each item's count is Binomial(3000, 12/60); all within 5 sigma, and
    a chi-square over the 60 counts within its 5-sigma band."""
    capacity, total, trials = 12, 60, 3000
    counts = torch.zeros(total)
    for trial in range(trials):
        memory = ReplayMemory(capacity, IDS, device=torch.device("cpu"), seed=trial)
        _stream(memory, total, batch=7)
        kept = memory.store["id"][:capacity]
        assert len(set(kept.tolist())) == capacity  # never the same item twice
        counts[kept] += 1
    p = capacity / total
    mean, sd = trials * p, math.sqrt(trials * p * (1 - p))
    assert float((counts - mean).abs().max()) < 5 * sd, counts
    chi2 = float(((counts - mean) ** 2 / (trials * p)).sum())
    dof = total - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), chi2
    # a biased reservoir (the last batch always kept, say) is caught: the late items would be far above the mean
    assert float(counts[-7:].mean()) < mean + 5 * sd / math.sqrt(7)


def test_batched_insert_equals_one_by_one_algorithm_r() -> None:
    """Same random numbers, same result as Vitter's Algorithm R run item by item (a later collision wins)."""
    memory = ReplayMemory(5, IDS, device=torch.device("cpu"), seed=3)
    shadow = torch.Generator().manual_seed(3)
    expected = [-1] * 5
    seen = 0
    for start in range(0, 40, 8):
        batch = torch.arange(start, start + 8)
        u = torch.rand(8, generator=shadow, dtype=torch.float64)
        for j, item in enumerate(batch.tolist()):
            n = seen + j
            slot = n if n < 5 else int(u[j] * (n + 1))
            if slot < 5:
                expected[slot] = item
        seen += 8
        memory.insert({"id": batch})
        assert memory.store["id"][:5].tolist() == expected
    assert memory.seen == 40 and memory.filled == 5


def test_draws_are_uniform_without_replacement() -> None:
    memory = ReplayMemory(10, IDS, device=torch.device("cpu"), seed=0)
    _stream(memory, 10, batch=10)
    counts = torch.zeros(10)
    trials = 2000
    for _ in range(trials):
        drawn = memory.draw(4)["id"]
        assert len(set(drawn.tolist())) == 4
        counts[drawn] += 1
    mean, sd = trials * 0.4, math.sqrt(trials * 0.4 * 0.6)
    assert float((counts - mean).abs().max()) < 5 * sd
    with pytest.raises(ValueError, match="cannot draw 11 items from a memory holding 10"):
        memory.draw(11)


def test_clip_storage_is_compact_and_round_trips() -> None:
    fields = clip_fields(num_frames=4, frame_size=8, target_length=16, num_mel_bins=8)
    memory = ReplayMemory(6, fields, device=torch.device("cpu"), seed=1)
    assert memory.store["video"].dtype == torch.uint8 and memory.store["fbank"].dtype == torch.bfloat16
    assert memory.bytes_per_item() == 4 * 3 * 8 * 8 + 16 * 8 * 2
    pixels = torch.randint(0, 256, (3, 4, 3, 8, 8)).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    video = (pixels - mean) / std  # what the loader hands the trainer
    fbank = torch.randn(3, 16, 8)
    memory.insert({"video": video, "fbank": fbank})
    out = memory.draw(3)
    order = [int(torch.argmin(((video - v) ** 2).flatten(1).sum(1))) for v in out["video"]]
    assert sorted(order) == [0, 1, 2]
    assert torch.allclose(out["video"], video[order], atol=1e-5)  # uint8 pixels are exact for 8-bit inputs
    assert torch.allclose(out["fbank"], fbank[order], rtol=1e-2, atol=1e-2)  # bf16
    assert out["video"].dtype == torch.float32
    assert memory.draw(3, dtype=torch.bfloat16)["fbank"].dtype == torch.bfloat16


def test_state_dict_round_trip_continues_identically() -> None:
    a = ReplayMemory(8, IDS, device=torch.device("cpu"), seed=5)
    _stream(a, 20, batch=4)
    state = a.state_dict()
    assert state["store"]["id"].shape == (8,) and state["seen"] == 20
    b = ReplayMemory(8, IDS, device=torch.device("cpu"), seed=99)
    b.load_state_dict(state)
    for memory in (a, b):
        memory.insert({"id": torch.arange(100, 104)})
    assert torch.equal(a.store["id"], b.store["id"]) and torch.equal(a.draw(5)["id"], b.draw(5)["id"])
    with pytest.raises(ValueError, match="holds 8 items per rank, this run's 4"):
        ReplayMemory(4, IDS, device=torch.device("cpu"), seed=0).load_state_dict(state)


def test_insert_and_draw_read_nothing_on_the_host(host_reads) -> None:
    fields = {**clip_fields(4, 8, 16, 8), "pooled_a": Field((6,), torch.float32)}
    memory = ReplayMemory(5, fields, device=torch.device("cpu"), seed=0)
    batch = {"video": torch.randn(4, 4, 3, 8, 8), "fbank": torch.randn(4, 16, 8), "pooled_a": torch.randn(4, 6)}
    with host_reads() as rec:
        for _ in range(3):  # fills, then replaces with collisions inside a batch
            memory.insert(batch)
            memory.draw(min(4, memory.filled))
    assert not rec.calls, dict(rec.calls)
