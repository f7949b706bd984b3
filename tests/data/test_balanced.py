"""Class-balanced training sampling (data.balanced, CAV-MAE's sampler for AudioSet-2M and VGGSound)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastav.config import load_config
from fastav.data import build_loader
from fastav.data.index import SampleStream, ShardIndex, class_balanced_weights
from fastav.data.loader import balanced_weights
from shards.manifest import load_manifest
from shards.writer import Sample, iter_shard, write_shard


def _indices(loader) -> list[int]:
    return torch.cat([b["index"][b["valid"]] for b in loader]).tolist()


def _damage_labels(root: Path, tmp_path: Path, sample: int) -> tuple[Path, str]:
    """A copy of the dataset in which one clip of the pulses training shards has an unreadable metadata member."""
    out = tmp_path / "damaged"
    shutil.copytree(root, out)
    n, key = 0, ""
    for tar in sorted((out / "pulses" / "train").glob("*.tar")):
        samples = []
        for s in iter_shard(tar):
            members = dict(s.members)
            if n == sample:
                members["json"], key = b"{not json", s.key
            samples.append(Sample(s.key, members))
            n += 1
        write_shard(tar, samples)
    return out, key


def test_weights_are_the_official_formula_on_a_hand_case() -> None:
    labels = [[0], [0], [0], [1], [1, 2]]  # counts 3, 2, 1, and none of class 3
    w = class_balanced_weights(labels, num_classes=4)
    expected = [1000 / 3.01] * 3 + [1000 / 2.01, 1000 / 2.01 + 1000 / 1.01]
    np.testing.assert_allclose(w, expected, rtol=1e-12)


def _stream(weights: np.ndarray, rank: int = 0, world: int = 1, seed: int = 3) -> SampleStream:
    return SampleStream(len(weights), rank=rank, world_size=world, seed=seed, shuffle=True, drop_last=True,
                        weights=weights)  # fmt: skip


def _draw(stream: SampleStream, epochs: int) -> np.ndarray:
    return np.array([stream.next()[0] for _ in range(epochs * stream.per_rank)])


def test_a_rare_class_is_drawn_as_often_as_a_common_one() -> None:
    labels = [[0]] * 90 + [[1]] * 10  # 9 : 1 imbalance
    draws = _draw(_stream(class_balanced_weights(labels, 2)), epochs=200)  # 20000 draws
    rare = draws >= 90
    # each class has probability 1/2 (binomial sd 0.0035 over 20000 draws: 0.02 is 5.7 sd)
    assert abs(rare.mean() - 0.5) < 0.02
    # and within a class every clip equally likely: each rare clip about 1000 times (sd 30), each common one 111
    per_clip = np.bincount(draws, minlength=100)
    assert np.all(np.abs(per_clip[90:] - 1000) < 160) and np.all(np.abs(per_clip[:90] - 111.1) < 60)
    # with replacement: an epoch repeats clips
    assert len(set(draws[:100].tolist())) < 100


def test_ranks_split_one_draw_and_resume_reproduces_it() -> None:
    w = class_balanced_weights([[c % 3] for c in range(31)] + [[0]] * 17, 3)
    single = _draw(_stream(w), epochs=2)
    ranks = [_draw(_stream(w, rank=r, world=2), epochs=2) for r in range(2)]
    for epoch in range(2):  # the ranks read the interleaved halves of the same epoch's draw
        whole = single[epoch * 48 : (epoch + 1) * 48]
        np.testing.assert_array_equal(ranks[0][epoch * 24 : (epoch + 1) * 24], whole[0::2])
        np.testing.assert_array_equal(ranks[1][epoch * 24 : (epoch + 1) * 24], whole[1::2])
    assert not np.array_equal(single[:48], single[48:])  # a new draw every epoch
    first = _stream(w)
    _draw(first, epochs=1)
    [first.next() for _ in range(5)]
    resumed = _stream(w)
    resumed.load_state_dict(first.state_dict())
    np.testing.assert_array_equal(_draw(resumed, epochs=1)[:43], single[53:])


def test_weighted_stream_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="shuffle"):
        SampleStream(4, rank=0, world_size=1, seed=0, shuffle=False, drop_last=False, weights=np.ones(4))
    for bad in (np.ones(3), np.array([1.0, -1.0, 1.0, 1.0]), np.zeros(4), np.array([1.0, np.nan, 1.0, 1.0])):
        with pytest.raises(ValueError, match="weights must be 4"):
            SampleStream(4, rank=0, world_size=1, seed=0, shuffle=True, drop_last=True, weights=bad)
    with pytest.raises(ValueError, match="at least one label"):
        class_balanced_weights([[0], []], 2)


def test_the_loader_draws_balanced_with_replacement(synth_dataset) -> None:
    root, _, _ = synth_dataset
    cfg = load_config("debug", [f"data.root={root}", "data.batch_size=6", "data.balanced=true"])
    drawn = _indices(build_loader(cfg, "train", tasks=["pulses"]))
    assert len(drawn) == 36 and len(set(drawn)) < 36  # one epoch of 36 draws from 36 clips, some repeated
    plain = build_loader(load_config("debug", [f"data.root={root}", "data.batch_size=6"]), "train", tasks=["pulses"])
    assert sorted(_indices(plain)) == sorted(set(_indices(plain)))  # without it: a permutation
    # evaluation is never resampled, whatever data.balanced says
    evaluated = _indices(build_loader(cfg, "test", tasks=["pulses"]))
    assert len(evaluated) == len(set(evaluated)) == 12


def test_unreadable_labels_are_never_drawn_and_named(synth_dataset, tmp_path, caplog) -> None:
    root, _, _ = synth_dataset
    damaged, bad_key = _damage_labels(root, tmp_path, sample=4)
    manifest = load_manifest(damaged)
    index = ShardIndex(damaged, manifest, "train", ["pulses"])
    with caplog.at_level(logging.WARNING, logger="fastav.data"):
        w = balanced_weights(index, len(manifest["classes"]), "train")
    assert w[index.keys.index(bad_key)] == 0 and np.count_nonzero(w) == len(w) - 1
    assert bad_key in caplog.text and "never drawn" in caplog.text
    stream = SampleStream(len(w), rank=0, world_size=1, seed=0, shuffle=True, drop_last=True, weights=w)
    assert index.keys.index(bad_key) not in _draw(stream, epochs=20)


def test_synthetic_source_balances_too() -> None:
    cfg = load_config("debug", ["data.source=synthetic", "data.synthetic_clips=24", "data.batch_size=4",
                                "data.balanced=true"])  # fmt: skip
    drawn = _indices(build_loader(cfg, "train"))
    assert len(drawn) == 24 and len(set(drawn)) < 24
