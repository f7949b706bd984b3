"""The DALI pipeline on the CPU: batch contract, parity with the reference loader, ranks, resume, skips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastav.config import load_config
from fastav.data import DataError, build_loader
from shards.writer import Sample, iter_shard, write_shard

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _cfg(root, *overrides):
    return load_config("debug", [f"data.root={root}", "data.batch_size=6", "eval.batch_size=8", *overrides])


def _collect(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        out.append({k: v.clone() for k, v in batch.items()})
        if n is not None and i + 1 == n:
            break
    return out


def test_train_batches_follow_the_contract(synth_dataset) -> None:
    root, manifest, spec = synth_dataset
    loader = build_loader(_cfg(root), "train", tasks=["chimes"])
    assert len(loader) == 36 // 6
    batches = _collect(loader)
    assert len(batches) == len(loader) and loader.epoch == 1
    b = batches[0]
    assert b["video"].shape == (6, 4, 3, 64, 64) and b["video"].dtype == torch.float32
    assert b["fbank"].shape == (6, 256, 64)
    assert b["labels"].shape == (6, 12) and torch.all(b["labels"].sum(1) == 1)
    assert b["index"].dtype == torch.int64 and torch.all(b["task"] == 1) and torch.all(b["valid"])
    seen = torch.cat([x["index"] for x in batches])
    assert len(set(seen.tolist())) == 36  # one epoch = every training clip once
    chimes = set(manifest["categories"]["chimes"])
    for x in batches:
        for row in x["labels"]:
            assert manifest["classes"][int(row.argmax())] in chimes
    bf = _collect(build_loader(_cfg(root, "data.dtype=bfloat16"), "train", tasks=["chimes"]), 1)[0]
    assert bf["video"].dtype == torch.bfloat16 and bf["fbank"].dtype == torch.bfloat16


@pytest.mark.parametrize("sampling", ["stella", "cavmae"])
def test_eval_matches_the_reference_loader(synth_dataset, sampling) -> None:
    from fastav.data.reference import reference_loader  # PyAV: imported here so that collection needs none

    root, _, _ = synth_dataset
    extra = ["data.num_frames=1"] if sampling == "cavmae" else []
    cfg = _cfg(root, f"data.sampling={sampling}", *extra)
    ours = {}
    for b in build_loader(cfg, "test", tasks=["buzzes"]):
        for i in torch.nonzero(b["valid"]).view(-1).tolist():
            ours[int(b["index"][i])] = (b["video"][i], b["fbank"][i])
    ref = {}
    for b in reference_loader(cfg, "test", tasks=["buzzes"], batch_size=5):
        for i in range(len(b["index"])):
            ref[int(b["index"][i])] = (b["pixels"][i], b["fbank"][i])
    assert ours.keys() == ref.keys() and len(ours) == 12
    for key, (video, fbank) in ours.items():
        pixels = (video * STD + MEAN) * 255  # back to 0-255 before normalisation
        frame_diff = (pixels - ref[key][0].permute(0, 3, 1, 2).float()).abs().mean().item()
        assert frame_diff <= 2.0, f"clip {key}: mean |frame diff| {frame_diff:.3f} / 255"
        assert (fbank - ref[key][1]).abs().max().item() <= 1e-3


def test_ranks_get_equal_batches_and_disjoint_samples(synth_dataset) -> None:
    root, _, _ = synth_dataset
    cfg = _cfg(root, "data.batch_size=4")
    train = [build_loader(cfg, "train", tasks=["pulses"], rank=r, world_size=3) for r in range(3)]
    assert {len(t) for t in train} == {36 // 3 // 4}
    seen = [set(torch.cat([b["index"] for b in _collect(t)]).tolist()) for t in train]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # evaluation: every sample exactly once over the ranks, padding marked invalid
    evals = [build_loader(cfg, "test", rank=r, world_size=5) for r in range(5)]
    assert len({len(e) for e in evals}) == 1
    valid = []
    for e in evals:
        for b in e:
            valid += b["index"][b["valid"]].tolist()
    assert sorted(valid) == sorted(set(valid)) and len(valid) == 36


def test_resume_sees_the_batches_it_would_have_seen(synth_dataset) -> None:
    root, _, _ = synth_dataset
    cfg = _cfg(root)
    full = build_loader(cfg, "train", tasks=["pulses", "buzzes"])
    reference = _collect(full) + _collect(full)  # two epochs
    first = build_loader(cfg, "train", tasks=["pulses", "buzzes"])
    _collect(first, 7)  # stop mid-epoch, with batches already prefetched inside DALI
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = build_loader(cfg, "train", tasks=["pulses", "buzzes"])
    resumed.load_state_dict(state)
    rest = _collect(resumed) + _collect(resumed)
    assert len(rest) == len(reference) - 7
    for a, b in zip(reference[7:], rest, strict=True):
        for key in ("index", "video", "fbank", "labels"):
            assert torch.equal(a[key], b[key]), key
    # epochs are shuffled differently; the train-time audio augmentation is on
    e0, e1 = torch.cat([b["index"] for b in reference[:12]]), torch.cat([b["index"] for b in reference[12:]])
    assert not torch.equal(e0, e1) and sorted(e0.tolist()) == sorted(e1.tolist())


def test_train_augmentation_differs_from_eval(synth_dataset) -> None:
    root, _, _ = synth_dataset
    cfg = _cfg(root)
    train = _collect(build_loader(cfg, "train", tasks=["pulses"], train=True), 1)[0]
    plain = {}
    for b in build_loader(cfg, "train", tasks=["pulses"], train=False, batch_size=36):
        plain = {int(k): (v, f) for k, v, f in zip(b["index"], b["video"], b["fbank"], strict=True)}
    for k, v, f in zip(train["index"], train["video"], train["fbank"], strict=True):
        ref_v, ref_f = plain[int(k)]
        assert not torch.allclose(f, ref_f)  # noise + roll
        assert v.shape == ref_v.shape


# --- bad data -----------------------------------------------------------------------------------------------------


def _corrupt_copy(root: Path, tmp_path: Path, damage: dict[str, str]) -> Path:
    """A copy of the dataset where the named clips of the pulses train shards are damaged."""
    out = tmp_path / "damaged"
    shutil.copytree(root, out)
    for tar in sorted((out / "pulses" / "train").glob("*.tar")):
        samples = []
        for s in iter_shard(tar):
            members = dict(s.members)
            how = damage.get(s.key)
            if how == "missing":
                del members["flac"]
            elif how == "header":
                members["mp4"] = b"\x00" * 64
            elif how == "garbage":  # a valid mp4 header, undecodable stream: only DALI's decoder can tell
                mp4 = bytearray(members["mp4"])
                mp4[200:] = np.random.default_rng(0).integers(0, 256, len(mp4) - 200, dtype=np.uint8).tobytes()
                members["mp4"] = bytes(mp4)
            elif how == "json":
                members["json"] = b"{not json"
            samples.append(Sample(s.key, members))
        write_shard(tar, samples)
    return out


def _train_keys(root: Path) -> list[str]:
    return [s.key for tar in sorted((root / "pulses" / "train").glob("*.tar")) for s in iter_shard(tar)]


def test_bad_samples_are_skipped_counted_and_never_replaced(synth_dataset, tmp_path, caplog) -> None:
    root, _, _ = synth_dataset
    keys = _train_keys(root)
    damage = {keys[0]: "missing", keys[5]: "header", keys[9]: "garbage", keys[20]: "json"}
    bad_index = {int(k[1:4]) * 12 + int(k[5:]) for k in damage}
    damaged = _corrupt_copy(root, tmp_path, damage)
    loader = build_loader(_cfg(damaged, "data.max_skip_fraction=0.5"), "train", tasks=["pulses"])
    batches = _collect(loader)
    assert len(batches) == len(loader) == 6
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert not set(seen) & bad_index
    # the 4 bad ones are replaced by the next samples of the stream (the next epoch's order): full batches
    assert len(seen) == 36 and len(set(seen)) >= 32
    for b in batches:
        assert torch.isfinite(b["video"]).all() and b["video"].std() > 0.1
    stats = loader.stats()
    assert stats["data_skipped"] == 4
    assert "skipped sample" in caplog.text


def test_too_many_bad_samples_stop_the_run(synth_dataset, tmp_path) -> None:
    root, _, _ = synth_dataset
    keys = _train_keys(root)
    damaged = _corrupt_copy(root, tmp_path, {k: "header" for k in keys[:6]})
    loader = build_loader(_cfg(damaged, "data.max_skip_fraction=0.1"), "train", tasks=["pulses"])
    with pytest.raises(DataError, match=r"6 of \d+ samples read .* more than data.max_skip_fraction=0.1"):
        _collect(loader)


def test_wav_shards_give_the_same_batches_as_flac(tmp_path) -> None:
    from shards.synth import SynthSpec, generate

    spec = dict(categories=1, classes_per_category=2, clips_per_class=6, size=64, duration=2.0, test_fraction=0.5)
    out = {}
    for fmt in ("flac", "wav"):
        generate(SynthSpec(**spec, audio_format=fmt), tmp_path / fmt, workers=1, show_progress=False)
        out[fmt] = _collect(build_loader(_cfg(tmp_path / fmt), "test"))
    assert (tmp_path / "wav" / "pulses" / "test" / "shard-000000.idx").read_text().count(" wav ") == 6
    for a, b in zip(out["flac"], out["wav"], strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["fbank"], b["fbank"])


def test_h264_shards_need_a_gpu(synth_dataset, tmp_path) -> None:
    root, _, _ = synth_dataset
    (tmp_path / "manifest.json").write_text((root / "manifest.json").read_text().replace('"vp9"', '"h264"'))
    with pytest.raises(DataError, match="DALI decodes only on a GPU; rebuild them with --codec vp9"):
        build_loader(_cfg(tmp_path, "data.device=cpu"), "train")
