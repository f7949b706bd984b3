"""End to end: ``python -m shards build`` on real media, DALI reading the result, exit codes, kill + resume, crashes.

The main build reads a VGGSound-style CSV naming every test medium (good and bad) plus a file that is not
there, with two classes in two categories (two continual tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from media_cases import BAD, CLIP_ARGS, GOOD

from shards import __main__ as shards_cli
from shards.__main__ import main as shards_main
from shards.manifest import SPLITS, load_manifest, shard_paths
from shards.writer import iter_shard

REPO = Path(__file__).resolve().parents[2]
LABELS = ("dog barking", "male speech, man speaking")


def _ytid(name: str) -> str:
    return name.split(".")[0].replace("_", "")


@pytest.fixture(scope="module")
def vgg_inputs(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    """videos/<ytid>_000000.<ext> for every medium, vggsound.csv naming them and a missing one, categories.csv."""
    root = tmp_path_factory.mktemp("vgg")
    (root / "videos").mkdir()
    rows = []
    for i, (name, path) in enumerate(sorted(media.items())):
        ext = name.split(".", 1)[1]
        shutil.copyfile(path, root / "videos" / f"{_ytid(name)}_000000.{ext}")
        rows.append(f'{_ytid(name)},0,"{LABELS[i % 2]}",{"train" if i % 3 else "test"}')
    rows.append("gone,0,dog barking,train")
    (root / "vggsound.csv").write_text("\n".join(rows) + "\n")
    (root / "categories.csv").write_text('dog barking,animals\n"male speech, man speaking",people\n')
    return root


def _build_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build",
        "--input",
        str(inputs / "vggsound.csv"),
        "--video-dir",
        str(inputs / "videos"),
        "--name-pattern",
        "{youtube_id}_{start:06d}.*",
        "--categories",
        str(inputs / "categories.csv"),
        "--out",
        str(out),
        "--shard-size",
        "3",
        "--retrieval-per-class",
        "1",
        "--quiet",
        *CLIP_ARGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, vgg_inputs: Path) -> Path:
    out = tmp_path_factory.mktemp("built") / "ds"
    assert shards_main(_build_args(vgg_inputs, out, "--workers", "2", "--max-reject-fraction", "1")) == 0
    return out


def _samples(root: Path, split: str) -> list[tuple[dict, dict]]:
    manifest = load_manifest(root)
    return [
        (json.loads(s.members["json"]), s.members)
        for tar, _ in shard_paths(root, manifest, split)
        for s in iter_shard(tar)
    ]


def test_good_clips_built_and_bad_ones_rejected_with_reasons(built: Path) -> None:
    manifest = load_manifest(built)
    assert [t["name"] for t in manifest["tasks"]] == ["animals", "people"]
    assert manifest["classes"] == list(LABELS)
    rejects = [json.loads(line) for line in (built / "rejects.jsonl").read_text().splitlines()]
    by_source = {r["source"].split("_000000")[0]: r for r in rejects}
    expected = {_ytid(name): code_words for name, code_words in BAD.items()}
    expected["gone"] = ("missing", "file not found")
    assert by_source.keys() == expected.keys()
    for ytid, (code, words) in expected.items():
        assert by_source[ytid]["code"] == code and words in by_source[ytid]["reason"], by_source[ytid]
    assert manifest["rejects"] == len(rejects) == 7 and manifest["reject_codes"]["missing"] == 1
    built_ids = {m["source"].split("_000000")[0] for split in ("train", "test") for m, _ in _samples(built, split)}
    assert built_ids == {_ytid(name) for name in GOOD}
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == len(GOOD) == manifest["considered"] - 7
    assert manifest["counts"]["retrieval"] == 2
    for split in SPLITS:
        for meta, members in _samples(built, split):
            assert list(members) == ["mp4", "flac", "json"] and meta["split"] == split
            assert manifest["classes"][meta["labels"][0]] == meta["label_names"][0]
            assert meta["task"] == {"dog barking": "animals"}.get(meta["label_names"][0], "people")


def test_built_shards_decode_in_dali_with_the_right_fps_size_rate_and_duration(built: Path) -> None:
    import av

    dali = pytest.importorskip("nvidia.dali")
    fn = pytest.importorskip("nvidia.dali.fn")
    types = pytest.importorskip("nvidia.dali.types")
    manifest = load_manifest(built)
    pairs = shard_paths(built, manifest, "train") + shard_paths(built, manifest, "test")
    n = manifest["counts"]["train"] + manifest["counts"]["test"]

    @dali.pipeline_def(batch_size=4, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipe():
        video, audio, meta = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs],
            index_paths=[str(i) for _, i in pairs],
            ext=["mp4", "flac", "json"],
            missing_component_behavior="error",
            name="reader",
        )
        wave, rate = fn.decoders.audio(audio, dtype=types.FLOAT, downmix=True)
        return fn.decoders.video(video, device="cpu"), wave, rate, meta, video

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == n
    seen = {}
    while len(seen) < n:
        frames, wave, rate, meta, video = p.run()
        for i in range(len(frames)):
            m = json.loads(np.array(meta.at(i)).tobytes())
            seen[m["key"]] = (
                np.array(frames.at(i)),
                np.array(wave.at(i)),
                float(np.array(rate.at(i))),
                m,
                np.array(video.at(i)).tobytes(),
            )
    assert len(seen) == n
    for f, w, r, m, mp4 in seen.values():
        assert f.shape == (16, 64, 64, 3) and f.std() > 5
        assert r == 16000 and w.shape == (32000,) and np.abs(w).max() > 0.05
        assert m["duration"] == 2.0 and m["num_frames"] == m["duration"] * m["fps"] == 16
        with av.open(__import__("io").BytesIO(mp4)) as c:
            assert not c.streams.audio and c.streams.video[0].codec_context.name in ("vp9", "libvpx-vp9")
            assert c.streams.video[0].average_rate == 8


def test_exit_codes(built: Path, vgg_inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the same build with the default --max-reject-fraction (0.05): every shard is complete, 7 of 15 rejected
    assert shards_main(_build_args(vgg_inputs, built, "--workers", "2")) == 1
    captured = capsys.readouterr()
    assert "0 shards built" in captured.out and "7 of 15 clips (46.7%) were rejected" in captured.err
    assert "--max-reject-fraction 0.05" in captured.err and load_manifest(built)["rejects"] == 7
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    cases = [
        (_build_args(vgg_inputs, foreign), "is not empty and holds no shard build"),
        (_build_args(vgg_inputs, tmp_path / "a", "--size", "15"), "--size 15"),
        (["build", "--input", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "b")], "no such file"),
        (
            _build_args(vgg_inputs, tmp_path / "c", "--preset", "stella-audioset", "--categories", str(tmp_path / "x")),
            "cannot read",
        ),
        (_build_args(vgg_inputs, tmp_path / "d", "--preset", "stella-vggsound"), "category 'sports' is not in"),
        (_build_args(vgg_inputs, foreign / "keep.txt"), "is a file"),
    ]
    for argv, words in cases:
        assert shards_main(argv) == 2, argv
        assert words in capsys.readouterr().err
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def _damage(root: Path) -> dict[str, str]:
    """Break three shards in three ways; return shard path -> what verify must say."""
    manifest = load_manifest(root)
    shards = [s for t in manifest["tasks"] for split in ("train", "test") for s in t["splits"][split]["shards"]]
    zeroed, truncated, reindexed = shards[0], shards[1], shards[2]
    lines = (root / zeroed["index"]).read_text().splitlines()
    _, offset, size, _ = lines[1].split()[:4]
    with open(root / zeroed["path"], "r+b") as f:
        f.seek(int(offset))
        f.write(bytes(int(size)))
    data = (root / truncated["path"]).read_bytes()
    (root / truncated["path"]).write_bytes(data[: len(data) // 2])
    idx = (root / reindexed["index"]).read_text().splitlines()
    parts = idx[1].split()
    parts[1] = str(int(parts[1]) + 512)
    (root / reindexed["index"]).write_text("\n".join([idx[0], " ".join(parts), *idx[2:]]) + "\n")
    return {zeroed["path"]: "mp4 does not decode", truncated["path"]: "tar", reindexed["path"]: "disagrees with"}


def test_verify_passes_a_good_build_and_names_each_broken_shard(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shards_main(["verify", str(built), "--quiet", "--workers", "2"]) == 0
    assert "OK:" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    expected = _damage(copy)
    lines = (copy / "rejects.jsonl").read_text().splitlines()
    (copy / "rejects.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert shards_main(["verify", str(copy), "--quiet", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    for path, words in expected.items():
        block = out.split(f"FAIL {path}", 1)[1].split("FAIL", 1)[0]
        assert words in block, (path, out)
    assert "FAIL dataset: rejects.jsonl has 6 lines, the manifest counts 7 rejects" in out
    assert "PROBLEMS FOUND: " in out and out.count("\nFAIL ") + out.startswith("FAIL ") == len(expected) + 1


def test_stats_split_and_probe_commands(
    built: Path, vgg_inputs: Path, media: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert shards_main(["stats", str(built), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["splits"]["train"]["samples"] + stats["splits"]["test"]["samples"] == len(GOOD)
    assert stats["splits"]["test"]["hours"] == pytest.approx(stats["splits"]["test"]["samples"] * 2 / 3600, abs=1e-4)
    assert stats["splits"]["train"]["padded_samples"] + stats["splits"]["test"]["padded_samples"] >= 1
    assert stats["reject_codes"]["missing"] == 1 and stats["source_codecs"]["h264/aac"] >= 1
    assert shards_main(["stats", str(built)]) == 0
    assert "rejected: 7" in capsys.readouterr().out

    plan_file = tmp_path / "plan.json"
    argv = [
        "split",
        "--input",
        str(vgg_inputs / "vggsound.csv"),
        "--video-dir",
        str(vgg_inputs / "videos"),
        "--name-pattern",
        "{youtube_id}_{start:06d}.*",
        "--categories",
        str(vgg_inputs / "categories.csv"),
        "--retrieval-per-class",
        "1",
        "--write",
        str(plan_file),
    ]
    assert shards_main(argv) == 1  # 2 of 15 rejected: more than --max-reject-fraction 0.05, the rule of build
    captured = capsys.readouterr()
    printed = captured.out
    assert "animals" in printed and "rejected while planning: 2" in printed  # the missing and the empty file
    assert "2 of 15 clips (13.3%) were rejected while planning" in captured.err
    plan = json.loads(plan_file.read_text())
    assert [t["name"] for t in plan["tasks"]] == ["animals", "people"]
    assert sorted(r["code"] for r in plan["rejects"]) == ["empty", "missing"]
    planned = {j["key"] for t in plan["tasks"] for split in ("train", "test") for j in t[split]}
    assert len(planned) == len(GOOD) + len(BAD) - 1

    good, bad = str(media["vp9_opus.webm"]), str(media["no_audio.mp4"])
    assert shards_main(["probe", good, "--size", "64", "--duration", "2"]) == 0
    assert ": OK" in capsys.readouterr().out
    assert shards_main(["probe", good, bad, "--size", "64", "--duration", "2"]) == 1
    assert "REJECT (no_audio) no audio stream" in capsys.readouterr().out


def test_split_accepts_every_option_of_build() -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    shards_cli._add_build(sub)
    shards_cli._add_split(sub)
    build, split = (set(sub.choices[name]._option_string_actions) for name in ("build", "split"))
    assert "--duration" in build and build <= split, sorted(build - split)


def test_split_takes_the_build_command_line_and_plans_what_build_built(
    built: Path, vgg_inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the `built` fixture's command line, encoding and run options included, with `build` replaced by `split`
    plan_file, out = tmp_path / "plan.json", tmp_path / "never-written"
    argv = _build_args(vgg_inputs, out, "--workers", "2", "--max-reject-fraction", "1")
    assert argv[0] == "build" and "--duration" in argv and "--size" in argv
    assert shards_main(["split", *argv[1:], "--write", str(plan_file)]) == 0
    assert "rejected while planning: 2 (empty 1, missing 1)" in capsys.readouterr().out
    assert not out.exists()
    plan, manifest = json.loads(plan_file.read_text()), load_manifest(built)
    assert [(t["name"], t["classes"]) for t in plan["tasks"]] == [(t["name"], t["classes"]) for t in manifest["tasks"]]
    planned = {j["key"] for t in plan["tasks"] for split in ("train", "test") for j in t[split]}
    built_keys = {m["key"] for split in ("train", "test") for m, _ in _samples(built, split)}
    transcode_rejects = {json.loads(line).get("key") for line in (built / "rejects.jsonl").read_text().splitlines()}
    assert planned == built_keys | (transcode_rejects - {None})
    # a bad encoding option fails the dry run as it fails the build
    assert shards_main(["split", *_build_args(vgg_inputs, out, "--size", "15")[1:]]) == 2
    assert "--size 15" in capsys.readouterr().err


def test_split_and_build_exit_1_with_the_reasons_when_the_name_pattern_matches_nothing(
    vgg_inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _build_args(vgg_inputs, tmp_path / "out", "--name-pattern", "{youtube_id}.mkv")
    assert shards_main(["split", *argv[1:]]) == 1
    captured = capsys.readouterr()
    assert "rejected while planning: 15 (missing 15)" in captured.out
    assert "missing (15 clips): the files are not where the inputs say; check --video-dir and --name-pattern" in (
        captured.out
    )
    examples = [line for line in captured.out.splitlines() if "file not found" in line]
    assert len(examples) == 2 and all(".mkv (vggsound.csv:" in line for line in examples), captured.out
    assert "15 of 15 clips (100.0%) were rejected while planning, more than --max-reject-fraction 0.05" in (
        captured.err
    )
    assert shards_main(argv) == 1  # build: the same rule on the same command line
    captured = capsys.readouterr()
    assert "15 of 15 clips (100.0%) were rejected, more than --max-reject-fraction 0.05" in captured.err
    assert "missing (15 clips)" in captured.out
    assert shards_main(["split", *argv[1:], "--max-reject-fraction", "1"]) == 0


# --- determinism, resume after a kill, crash isolation ---


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    """12 good clips in two classes (the good media, some twice under other names)."""
    root = tmp_path_factory.mktemp("good")
    names = sorted(GOOD)
    for i in range(12):
        name = names[i % len(names)]
        target = root / ("alpha" if i % 2 else "beta") / f"c{i:02d}_{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(media[name], target)
    return root


def _folder_args(src: Path, out: Path, workers: int) -> list[str]:
    return [
        "build",
        "--input",
        str(src),
        "--out",
        str(out),
        "--shard-size",
        "1",
        "--retrieval-per-class",
        "1",
        "--test-fraction",
        "0.25",
        "--workers",
        str(workers),
        "--quiet",
        *CLIP_ARGS,
    ]


def _dataset_bytes(root: Path) -> dict[str, bytes]:
    files = [p for p in root.rglob("*") if p.is_file() and ".build" not in p.parts]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(files)}


def _subprocess_build(argv: list[str], **env: str) -> subprocess.Popen:
    environment = {**os.environ, "FASTAV_NO_PROGRESS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "shards", *argv],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_same_bytes_for_any_workers_and_after_a_kill_and_rerun(good_folder: Path, tmp_path: Path) -> None:
    ref1, ref2, resumed = tmp_path / "ref1", tmp_path / "ref2", tmp_path / "resumed"
    assert shards_main(_folder_args(good_folder, ref1, workers=1)) == 0
    assert shards_main(_folder_args(good_folder, ref2, workers=2)) == 0
    reference = _dataset_bytes(ref1)
    assert sum(name.endswith(".tar") for name in reference) >= 12
    assert _dataset_bytes(ref2) == reference

    # kill the build once two shards are finished (their tars and their .build records are written)
    proc = _subprocess_build(_folder_args(good_folder, resumed, workers=2))
    deadline = time.monotonic() + 120
    while len(list(resumed.glob(".build/*/*/shard-*.json"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build finished no shard in 120 s"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "manifest.json").exists(), "the kill came after the build had finished"
    finished = sorted(resumed.glob(".build/*/*/shard-*.json"))
    survivors = {resumed / r.relative_to(resumed / ".build").with_suffix(".tar"): r for r in finished}
    assert 2 <= len(survivors) < sum(name.endswith(".tar") for name in reference)
    # a kill between a tar's rename and its record: the shard is redone (here: the first survivor's record goes)
    redone = sorted(survivors)[0]
    survivors.pop(redone).unlink()
    kept = {tar: tar.stat().st_mtime_ns for tar in survivors}

    assert shards_main(_folder_args(good_folder, resumed, workers=2)) == 0
    assert _dataset_bytes(resumed) == reference
    assert all(tar.stat().st_mtime_ns == mtime for tar, mtime in kept.items()), "finished shards were rewritten"
    assert not list(resumed.rglob("*.partial"))


def test_a_worker_crash_rejects_only_its_clip(good_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "crash"
    proc = _subprocess_build(_folder_args(good_folder, out, workers=2), FASTAV_SHARDS_TEST_CRASH_ON="c05_")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # 1 of 12 rejected > 0.05
    assert "1 of 12 clips (8.3%) were rejected" in stderr
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["code"], r["source"].split("/")[1][:4]) for r in rejects] == [("crash", "c05_")]
    assert "worker process died" in rejects[0]["reason"]
    manifest = load_manifest(out)
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == 11


def test_a_hung_clip_is_rejected_after_the_timeout(good_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "hang"
    args = [*_folder_args(good_folder, out, workers=2), "--clip-timeout", "4"]
    proc = _subprocess_build(args, FASTAV_SHARDS_TEST_HANG_ON="c03_")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["code"], r["source"].split("/")[1][:4]) for r in rejects] == [("timeout", "c03_")]
    assert "timed out after 4 s" in rejects[0]["reason"]
    manifest = load_manifest(out)
    assert manifest["counts"]["train"] + manifest["counts"]["test"] == 11


def test_rerun_with_other_parameters_replaces_the_dataset(good_folder: Path, tmp_path: Path) -> None:
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert shards_main(_folder_args(good_folder, out, workers=2)) == 0
    other = [*_folder_args(good_folder, out, workers=2), "--shard-size", "5", "--size", "32"]
    assert shards_main(other) == 0
    assert shards_main([*_folder_args(good_folder, fresh, workers=2), "--shard-size", "5", "--size", "32"]) == 0
    assert _dataset_bytes(out) == _dataset_bytes(fresh)
    listed = {s["path"] for t in load_manifest(out)["tasks"] for split in SPLITS for s in t["splits"][split]["shards"]}
    assert {p.relative_to(out).as_posix() for p in out.glob("*/*/*.tar")} == listed
    assert shards_main(["verify", str(out), "--quiet", "--workers", "0"]) == 0
