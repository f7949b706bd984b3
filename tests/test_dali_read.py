"""The synthetic shards are what DALI reads: webdataset reader with our .idx files, CPU video and audio decode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards.manifest import shard_paths

dali = pytest.importorskip("nvidia.dali")
fn = pytest.importorskip("nvidia.dali.fn")
types = pytest.importorskip("nvidia.dali.types")


def _pipeline(paths, index_paths, batch_size, shard_id=0, num_shards=1):
    @dali.pipeline_def(batch_size=batch_size, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipe():
        video, audio, meta = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["mp4", "flac", "json"],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            name="reader",
        )
        frames = fn.decoders.video(video, device="cpu")
        wave, rate = fn.decoders.audio(audio, dtype=types.FLOAT, downmix=True)
        return frames, wave, rate, meta

    p = pipe()
    p.build()
    return p


def _read_all(p, n):
    out = []
    while len(out) < n:
        frames, wave, rate, meta = p.run()
        for i in range(len(frames)):
            out.append((np.array(frames.at(i)), np.array(wave.at(i)), float(np.array(rate.at(i))),
                        json.loads(np.array(meta.at(i)).tobytes())))  # fmt: skip
    return out[:n]


def test_dali_reads_and_decodes_every_sample(synth_dataset) -> None:
    root, manifest, spec = synth_dataset
    pairs = shard_paths(root, manifest, "test")
    n = manifest["counts"]["test"]
    p = _pipeline([str(t) for t, _ in pairs], [str(i) for _, i in pairs], batch_size=6)
    assert p.epoch_size("reader") == n
    samples = _read_all(p, n)
    keys = [meta["key"] for *_, meta in samples]
    assert len(set(keys)) == n
    for frames, wave, rate, meta in samples:
        assert frames.shape == (meta["num_frames"], spec.size, spec.size, 3) and frames.dtype == np.uint8
        assert rate == 16000 and wave.shape == (meta["num_samples"],)
        assert frames.std() > 5 and np.abs(wave).max() > 0.1


def test_dali_sharding_by_rank_partitions_the_samples(synth_dataset) -> None:
    root, manifest, _ = synth_dataset
    pairs = shard_paths(root, manifest, "train", ["pulses"])
    n = manifest["tasks"][0]["splits"]["train"]["num_samples"]
    seen = []
    for rank in range(2):
        p = _pipeline([str(t) for t, _ in pairs], [str(i) for _, i in pairs], batch_size=4, shard_id=rank,
                      num_shards=2)  # fmt: skip
        size = p.reader_meta("reader")["epoch_size_padded"] // 2
        seen.append({meta["key"] for *_, meta in _read_all(p, size)})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == n
