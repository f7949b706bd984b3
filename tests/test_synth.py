"""Synthetic dataset: determinism, layout and metadata, media properties, and that the pairs are learnable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shards.__main__ import main as shards_main
from shards.manifest import SPLITS, load_manifest, task_names
from shards.media import decode_audio, decode_video
from shards.synth import SynthSpec, class_signatures, generate
from shards.writer import iter_shard, read_index

TINY = SynthSpec(categories=2, classes_per_category=2, clips_per_class=4, test_fraction=0.5, retrieval_per_class=1,
                 size=32, duration=2.0, shard_size=3)  # fmt: skip


def _tars(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def _samples(root: Path, manifest: dict, split: str) -> list[tuple[dict, dict]]:
    out = []
    for task in manifest["tasks"]:
        for shard in task["splits"][split]["shards"]:
            for s in iter_shard(root / shard["path"]):
                out.append((json.loads(s.members["json"]), s.members))
    return out


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    generate(TINY, tmp_path / "a", workers=1, show_progress=False)
    generate(TINY, tmp_path / "b", workers=2, show_progress=False)
    a, b = _tars(tmp_path / "a"), _tars(tmp_path / "b")
    assert a and a == b
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    other = SynthSpec(**{**TINY.__dict__, "seed": 1})
    generate(other, tmp_path / "c", workers=2, show_progress=False)
    c = _tars(tmp_path / "c")
    assert c.keys() == a.keys() and all(c[k] != a[k] for k in a)


def test_rerun_is_kept_or_replaced_and_foreign_dirs_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    generate(TINY, root, workers=1, show_progress=False)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    generate(TINY, root, workers=1, show_progress=False)  # same spec: up to date, nothing rewritten
    assert stamp == {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    bigger = SynthSpec(**{**TINY.__dict__, "categories": 1, "clips_per_class": 6})
    manifest = generate(bigger, root, workers=1, show_progress=False)
    assert [t["name"] for t in manifest["tasks"]] == ["pulses"] and not (root / "chimes").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not empty and holds no dataset"):
        generate(TINY, foreign, workers=1, show_progress=False)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_cli_synth_and_info(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--categories", "1", "--classes-per-category", "2", "--clips-per-class", "4",
            "--size", "32", "--duration", "1", "--workers", "1", "--quiet"]  # fmt: skip
    assert shards_main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert shards_main(["info", str(out)]) == 0
    assert "pulses" in capsys.readouterr().out
    assert shards_main(["info", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert shards_main(["synth", "--out", str(tmp_path / "x"), "--clips-per-class", "1"]) == 2
    assert "clips_per_class=1" in capsys.readouterr().err
    pretrain = tmp_path / "pretrain"
    assert shards_main([*args[:2], str(pretrain), *args[3:], "--pretrain-classes-per-category", "1"]) == 0
    assert "pretrain" in capsys.readouterr().out and task_names(load_manifest(pretrain), "pretrain") == ["pretrain"]
    assert shards_main(["synth", "--out", str(tmp_path / "y"), "--pretrain-classes-per-category", "-1"]) == 2
    assert "pretrain_classes_per_category=-1" in capsys.readouterr().err


# --- the pre-training task ------------------------------------------------------------------------------------------

PRETRAIN = SynthSpec(**{**TINY.__dict__, "pretrain_classes_per_category": 2, "duration": 1.0})


def test_pretrain_task_holds_classes_no_continual_task_has(tmp_path: Path) -> None:
    manifest = generate(PRETRAIN, tmp_path / "p", workers=2, show_progress=False)
    root = tmp_path / "p"
    assert [(t["name"], t["role"]) for t in manifest["tasks"]] == [
        ("pulses", "continual"),
        ("chimes", "continual"),
        ("pretrain", "pretrain"),
    ]
    assert task_names(manifest) == ["pulses", "chimes"] and task_names(manifest, "pretrain") == ["pretrain"]
    continual = [c for t in manifest["tasks"][:2] for c in t["classes"]]
    pretrain = manifest["tasks"][2]["classes"]
    assert len(pretrain) == 2 * 2 and not set(pretrain) & set(continual)
    assert manifest["classes"] == continual + pretrain  # continual class ids as without the pretrain task
    assert {c: sorted(v) for c, v in manifest["categories"].items()} == {
        "pulses": sorted(continual[:2] + pretrain[:2]),
        "chimes": sorted(continual[2:] + pretrain[2:]),
    }
    splits = manifest["tasks"][2]["splits"]
    assert {s: splits[s]["num_samples"] for s in SPLITS} == {"train": 8, "test": 8, "retrieval": 4}
    for split in SPLITS:
        for shard in splits[split]["shards"]:
            assert shard["path"].startswith(f"pretrain/{split}/")
            assert len(read_index(root / shard["index"])) == shard["num_samples"]
    metas = [m for m, _ in _samples(root, {"tasks": manifest["tasks"][2:]}, "train")]
    assert {m["task"] for m in metas} == {"pretrain"} and {m["category"] for m in metas} == {"pulses", "chimes"}
    assert all(manifest["classes"][m["labels"][0]] in pretrain for m in metas)
    assert shards_main(["verify", str(root), "--quiet", "--workers", "0"]) == 0


def test_pretrain_task_keeps_bytes_deterministic_and_the_continual_tasks_unchanged(tmp_path: Path) -> None:
    generate(PRETRAIN, tmp_path / "a", workers=1, show_progress=False)
    generate(PRETRAIN, tmp_path / "b", workers=2, show_progress=False)
    a = _tars(tmp_path / "a")
    assert a == _tars(tmp_path / "b") and any(k.startswith("pretrain/") for k in a)
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    without = SynthSpec(**{**PRETRAIN.__dict__, "pretrain_classes_per_category": 0})
    generate(without, tmp_path / "c", workers=2, show_progress=False)
    assert _tars(tmp_path / "c") == {k: v for k, v in a.items() if not k.startswith("pretrain/")}


@pytest.mark.parametrize("per_category, pretrain", [(4, 3), (3, 1)])
def test_pretrain_classes_lie_in_their_category_region(per_category: int, pretrain: int) -> None:
    spec = SynthSpec(categories=3, classes_per_category=per_category, pretrain_classes_per_category=pretrain)
    sigs = class_signatures(spec)
    n = 3 * per_category
    assert [s.class_id for s in sigs] == list(range(spec.num_classes)) and spec.num_classes == n + 3 * pretrain
    assert [s.role for s in sigs] == ["continual"] * n + ["pretrain"] * (3 * pretrain)
    for sig in sigs[n:]:
        own = [s for s in sigs[:n] if s.category == sig.category]
        assert (sig.timbre, sig.background) == (own[0].timbre, own[0].background)
        assert own[0].pitch < sig.pitch < own[-1].pitch  # inside the category's pitch band
        assert own[0].hue <= sig.hue < own[0].hue + 0.8 / 3  # inside the category's hue range
    for category in {s.category for s in sigs}:
        looks = [(s.shape, s.motion, s.rhythm, round(s.pitch, 3)) for s in sigs if s.category == category]
        assert len(set(looks)) == len(looks)
    assert len({s.name for s in sigs}) == len(sigs)


def test_layout_splits_and_metadata(synth_dataset) -> None:
    root, manifest, spec = synth_dataset
    assert load_manifest(root) == manifest
    assert [t["name"] for t in manifest["tasks"]] == ["pulses", "chimes", "buzzes"]
    assert manifest["counts"] == {"train": 12 * 9, "test": 12 * 3, "retrieval": 12 * 2}
    assert (root / "rejects.jsonl").read_text() == "" and manifest["rejects"] == 0
    per_split = {split: _samples(root, manifest, split) for split in SPLITS}
    keys = {split: [m["key"] for m, _ in items] for split, items in per_split.items()}
    assert not set(keys["train"]) & set(keys["test"])
    assert set(keys["retrieval"]) <= set(keys["test"])
    assert len(set(keys["train"] + keys["test"])) == 12 * 12
    for task in manifest["tasks"]:
        for split in SPLITS:
            for shard in task["splits"][split]["shards"]:
                assert len(read_index(root / shard["index"])) == shard["num_samples"]
    contract = {"key", "source", "labels", "label_names", "category", "task", "split", "duration", "fps",
                "num_frames", "sample_rate", "num_samples", "start", "index"}  # fmt: skip
    for split, items in per_split.items():
        for meta, members in items:
            assert contract <= meta.keys() and meta["split"] == split
            assert list(members) == ["mp4", "flac", "json"]
            assert manifest["classes"][meta["labels"][0]] == meta["label_names"][0]
            assert meta["label_names"][0] in manifest["categories"][meta["category"]]
    indices = [m["index"] for m, _ in per_split["train"] + per_split["test"]]
    assert len(set(indices)) == len(indices)


def test_media_properties(synth_dataset) -> None:
    root, manifest, spec = synth_dataset
    meta, members = _samples(root, manifest, "test")[0]
    frames = decode_video(members["mp4"])
    audio, rate = decode_audio(members["flac"])
    assert frames.shape == (spec.num_frames, spec.size, spec.size, 3) == (meta["num_frames"], 96, 96, 3)
    assert rate == 16000 and audio.shape == (meta["num_samples"],) == (64000,)
    assert 0.2 < np.abs(audio).max() <= 1.0


# --- the pairs are learnable ------------------------------------------------------------------------------------------


def _rgb_to_sv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = frames.astype(np.float32) / 255
    mx, mn = f.max(-1), f.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0), mx


def _video_features(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue histogram of saturated pixels, background colour, motion spread; and per-frame object energy."""
    sat, val = _rgb_to_sv(frames)
    obj = sat > 0.5
    f = frames.astype(np.float32) / 255
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    hue = (np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)[obj]
    hist = np.histogram(hue, bins=24, range=(0, 360))[0].astype(np.float32)
    hist /= hist.sum() + 1e-6
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    w = obj.sum((1, 2)) + 1e-6
    cx, cy = (obj * xs).sum((1, 2)) / w, (obj * ys).sum((1, 2)) / w
    background = np.median(f.reshape(-1, 3), axis=0)
    feats = np.concatenate([hist * 3, background * 4, [cx.std() / 20, cy.std() / 20]])
    energy = (val * obj).sum((1, 2))
    return feats, energy


def _audio_features(audio: np.ndarray, fps: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Log energy in 40 log-spaced bands; and RMS per video frame."""
    spec = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / 16000)
    edges = np.geomspace(80, 8000, 41)
    pairs = zip(edges[:-1], edges[1:], strict=True)
    bands = np.log([spec[(freqs >= lo) & (freqs < hi)].sum() + 1e-6 for lo, hi in pairs])
    hop = len(audio) // n_frames
    rms = np.sqrt((audio[: hop * n_frames].reshape(n_frames, hop) ** 2).mean(1))
    return bands - bands.max(), rms


def _features(root, manifest, split):
    out = []
    for meta, members in _samples(root, manifest, split):
        frames = decode_video(members["mp4"])
        audio, _ = decode_audio(members["flac"])
        vf, energy = _video_features(frames)
        af, rms = _audio_features(audio, meta["fps"], len(frames))
        out.append((meta["labels"][0], vf, af, energy, rms))
    labels = np.array([o[0] for o in out])
    return (
        labels,
        np.stack([o[1] for o in out]),
        np.stack([o[2] for o in out]),
        [o[3] for o in out],
        [o[4] for o in out],
    )


def _nearest_centroid(train_x, train_y, test_x):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    classes = np.unique(train_y)
    cent = np.stack([((train_x[train_y == c] - mu) / sd).mean(0) for c in classes])
    d = (((test_x - mu) / sd)[:, None, :] - cent[None]) ** 2
    return classes[d.sum(-1).argmin(1)]


def test_audio_and_video_are_matchable_but_not_trivially(synth_dataset) -> None:
    root, manifest, spec = synth_dataset
    y_tr, v_tr, a_tr, _, _ = _features(root, manifest, "train")
    y_te, v_te, a_te, energy, rms = _features(root, manifest, "test")
    chance = 1 / spec.num_classes
    acc_v = (_nearest_centroid(v_tr, y_tr, v_te) == y_te).mean()
    acc_a = (_nearest_centroid(a_tr, y_tr, a_te) == y_te).mean()
    assert acc_v > 0.75 and acc_a > 0.75, (acc_v, acc_a, chance)

    # cross-modal: map audio features to video features (ridge, fit on train), match held-out clips by nearest
    # neighbour among all held-out videos; the matched video must be of the audio's class far above chance
    def z(x, ref):
        return (x - ref.mean(0)) / (ref.std(0) + 1e-6)

    A, V = z(a_tr, a_tr), z(v_tr, v_tr)
    W = np.linalg.solve(A.T @ A + 10 * np.eye(A.shape[1]), A.T @ V)
    pred = z(a_te, a_tr) @ W
    d = ((pred[:, None, :] - z(v_te, v_tr)[None]) ** 2).sum(-1)
    class_match = (y_te[d.argmin(1)] == y_te).mean()
    assert class_match > 5 * chance, (class_match, chance)

    # instance level: the object's per-frame brightness follows its own sound, not another clip's
    def corr(x, y):
        return float(np.corrcoef(x, y)[0, 1])

    matched = np.mean([corr(e, r) for e, r in zip(energy, rms, strict=True)])
    shifted = np.mean([corr(e, r) for e, r in zip(energy, rms[1:] + rms[:1], strict=True)])
    assert matched > 0.5 and shifted < 0.25, (matched, shifted)

    # not trivial: clips of one class differ (position, speed, pitch, noise), none is a copy of another
    for c in np.unique(y_tr):
        assert (v_tr[y_tr == c].std(0).max() > 0.01) and (a_tr[y_tr == c].std(0).max() > 0.05)
    mp4s = [m["mp4"] for _, m in _samples(root, manifest, "train")]
    assert len(set(mp4s)) == len(mp4s)
