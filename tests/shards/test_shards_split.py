"""Reading inputs (VGGSound CSV, CAV-MAE datafile, class index, category maps) and planning continual splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.presets import PRESETS, STELLA_OTHERS_PART1
from shards.sources import (
    InputError,
    SourceClip,
    read_category_map,
    read_class_index,
    read_datafile,
    read_folder,
    read_vggsound_csv,
    sample_key,
)
from shards.split import SplitConfig, SplitError, TaskSpec, class_order, plan_dataset

# --- inputs ---


def test_vggsound_csv_rows_patterns_and_bad_rows(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "abc_000030.webm").write_bytes(b"x")
    csv = tmp_path / "vggsound.csv"
    csv.write_text(
        "youtube_id,start_seconds,label,split\n"
        '-abc,30,"male speech, man speaking",train\n'
        "abc,30,dog barking,test\n"
        "xyz,7.5,dog barking,validation\n"
        "bad,row\n"
        "q,notanumber,dog barking,train\n"
        "r,3,dog barking,holdout\n"
    )
    got = read_vggsound_csv(csv, video_dir=videos)
    assert [c.labels for c in got.clips] == [("male speech, man speaking",), ("dog barking",), ("dog barking",)]
    assert [c.split for c in got.clips] == ["train", "test", "test"]
    assert [c.video_id for c in got.clips] == ["-abc_000030", "abc_000030", "xyz_7p5"]
    assert got.clips[0].path == str(videos / "-abc_000030.mp4") and got.clips[0].start == 0.0  # files are cut clips
    assert [c.start for c in read_vggsound_csv(csv, video_dir=videos, seek=True).clips] == [30.0, 30.0, 7.5]
    assert [p.source for p in got.problems] == ["vggsound.csv:5", "vggsound.csv:6", "vggsound.csv:7"]
    assert "2 fields" in got.problems[0].reason and "holdout" in got.problems[2].reason
    anyext = read_vggsound_csv(csv, video_dir=videos, name_pattern="{youtube_id}_{start:06d}.*")
    assert anyext.clips[1].path == str(videos / "abc_000030.webm")
    with pytest.raises(InputError, match="--name-pattern"):
        read_vggsound_csv(csv, video_dir=videos, name_pattern="{ytid}.mp4")


def test_datafile_with_class_index_and_video_paths(tmp_path: Path) -> None:
    index = tmp_path / "class_labels_indices.csv"
    index.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n')
    classes = read_class_index(index)
    assert classes == [("/m/09x0r", "Speech"), ("/m/05zppz", "Male speech, man speaking")]
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "b.mp4").write_bytes(b"x")
    datafile = tmp_path / "train.json"
    datafile.write_text(
        json.dumps(
            {
                "data": [
                    {"video_id": "a", "wav": "wav/a.flac", "video_path": "vids", "labels": "/m/09x0r,/m/05zppz"},
                    {"video_id": "b", "wav": "wav/b.flac", "video_path": "vids/b.mp4", "labels": "/m/05zppz"},
                    {"wav": "x.flac", "labels": "/m/09x0r"},
                ]
            }
        )
    )
    got = read_datafile(datafile, class_ids=dict(classes), audio_from="wav", split="test")
    assert [c.labels for c in got.clips] == [("Speech", "Male speech, man speaking"), ("Male speech, man speaking",)]
    assert got.clips[0].path == str(tmp_path / "vids" / "a.mp4") and got.clips[1].path == str(
        tmp_path / "vids" / "b.mp4"
    )
    assert got.clips[0].audio_path == str(tmp_path / "wav" / "a.flac") and got.clips[0].split == "test"
    assert len(got.problems) == 1 and "video_id" in got.problems[0].reason
    with pytest.raises(InputError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("{")
        read_datafile(tmp_path / "broken.json")


def test_category_map_formats(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text('class,category\ndog barking,animals\n"male speech, man speaking",people\n')
    (tmp_path / "c.json").write_text(json.dumps({"animals": ["dog barking"], "people": ["male speech, man speaking"]}))
    (tmp_path / "d.json").write_text(json.dumps({"dog barking": "animals", "male speech, man speaking": "people"}))
    want = {"dog barking": "animals", "male speech, man speaking": "people"}
    for name in ("c.csv", "c.json", "d.json"):
        assert read_category_map(tmp_path / name) == want
    (tmp_path / "e.csv").write_text("a,x\na,y\n")
    with pytest.raises(InputError, match="class 'a' is in both 'x' and 'y'"):
        read_category_map(tmp_path / "e.csv")


def test_folder_labels_and_keys(tmp_path: Path) -> None:
    for rel in ("dogs/a b.mp4", "dogs/sub/c.webm", "top.mkv", "cats/notes.txt", "cats/.hidden.mp4"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    got = read_folder(tmp_path)
    assert [(c.source, c.labels) for c in got.clips] == [
        ("dogs/a b.mp4", ("dogs",)),
        ("dogs/sub/c.webm", ("dogs",)),
        ("top.mkv", ("unlabelled",)),
    ]
    assert [sample_key(c.video_id) for c in got.clips] == ["dogs__a_b", "dogs__sub__c", "top"]


# --- planning ---


def _clips(per_class: dict[str, int], split: str | None = None, prefix: str = "v") -> list[SourceClip]:
    return [
        SourceClip(
            video_id=f"{prefix}{cls.replace(' ', '')}{i:04d}",
            source=f"{cls}/{i}.mp4",
            path=f"/x/{cls}/{prefix}{i}.mp4",
            labels=(cls,),
            split=split,
        )
        for cls, n in per_class.items()
        for i in range(n)
    ]


def _plan(clips, classes, categories, config):
    return plan_dataset(clips, classes, categories, config, check_files=False)


def test_plan_is_deterministic_and_partitions_clips() -> None:
    clips = _clips({"a": 30, "b": 25, "c": 20})
    categories = {"a": "one", "b": "one", "c": "two"}
    config = SplitConfig(test_fraction=0.2, retrieval_per_class=3, shard_size=7, seed=5)
    plan = _plan(clips, ["a", "b", "c"], categories, config)
    again = _plan(clips, ["a", "b", "c"], categories, config)
    other = _plan(
        clips, ["a", "b", "c"], categories, SplitConfig(test_fraction=0.2, retrieval_per_class=3, shard_size=7, seed=6)
    )
    keys = {s: [j.key for j in plan.jobs(s)] for s in ("train", "test")}
    assert keys == {s: [j.key for j in again.jobs(s)] for s in ("train", "test")}
    assert keys["train"] != [j.key for j in other.jobs("train")]
    assert [t.name for t in plan.tasks] == ["one", "two"] and plan.classes == ["a", "b", "c"]
    assert len(keys["test"]) == 6 + 5 + 4 and len(set(keys["train"] + keys["test"])) == 75
    assert all(len(shard) <= 7 for t in plan.tasks for s in t.shards.values() for shard in s)
    indices = [j.index for s in ("train", "test") for j in plan.jobs(s)]
    assert sorted(indices) == list(range(75))
    for task in plan.tasks:
        test_keys = {j.key for shard in task.shards["test"] for j in shard}
        for cls, candidates in task.retrieval_candidates.items():
            assert set(candidates) <= test_keys and len(candidates) == {"a": 6, "b": 5, "c": 4}[cls]
    job = plan.jobs("train")[0]
    assert job.label_names[0] in plan.tasks[0].classes and plan.classes[job.labels[0]] == job.label_names[0]


def test_cap_multi_category_and_input_splits() -> None:
    clips = _clips({"a": 50}, split="train") + _clips({"a": 9}, split="test", prefix="t") + _clips({"b": 5})
    clips += [
        SourceClip("m1", "m1.mp4", "/x/m1.mp4", ("a", "c")),  # two categories
        SourceClip("m2", "m2.mp4", "/x/m2.mp4", ("a", "b")),  # one category, two classes
        SourceClip("u1", "u1.mp4", "/x/u1.mp4", ("nope",)),
        SourceClip("d1", "d1.mp4", "/x/a/v0.mp4", ("a",)),  # same file as the first clip
    ]
    categories = {"a": "one", "b": "one", "c": "two"}
    config = SplitConfig(cap_per_class=20, exclude_multi_category=True, test_fraction=0.4)
    plan = _plan(clips, ["a", "b", "c"], categories, config)
    train = [j for j in plan.jobs("train")]
    per_class = {c: sum(j.label_names[0] == c for j in train) for c in "ab"}
    assert per_class["a"] == 20 and plan.excluded["over_cap"] == 50 + 1 - 20
    assert sum(j.label_names[0] == "a" for j in plan.jobs("test")) == 9  # the input's test clips, never capped
    assert plan.excluded["multi_category"] == 1 and plan.excluded["unknown_class"] == 1
    assert plan.excluded["duplicate"] == 1
    m2 = [j for j in plan.jobs("train") + plan.jobs("test") if j.key == "m2"]
    assert m2 == [] or m2[0].label_names == ("a", "b")
    assert any("no label in the class list" in w for w in plan.warnings)
    loose = _plan(clips, ["a", "b", "c"], categories, SplitConfig(test_fraction=0.4))
    m1 = [j for j in loose.jobs("train") + loose.jobs("test") if j.key == "m1"][0]
    assert m1.task == "one" and m1.label_names == ("a", "c")


def test_planning_rejects_missing_files(tmp_path: Path) -> None:
    (tmp_path / "there.mp4").write_bytes(b"data")
    (tmp_path / "empty.mp4").write_bytes(b"")
    clips = [
        SourceClip(n, f"{n}.mp4", str(tmp_path / f"{n}.mp4"), ("a",), origin=f"list.txt:{i}")
        for i, n in enumerate(["there", "empty", "gone"], start=1)
    ]
    plan = plan_dataset(clips, ["a"], None, SplitConfig(test_fraction=0.0))
    assert [j.key for j in plan.jobs("train")] == ["there"]
    assert [(r["source"], r["code"], r["listed_in"]) for r in plan.rejects] == [
        ("empty.mp4", "empty", "list.txt:2"),
        ("gone.mp4", "missing", "list.txt:3"),
    ]
    assert "file not found" in plan.rejects[1]["reason"]


def _vggsound_categories() -> tuple[list[str], dict[str, str]]:
    """A VGGSound-like label file: 9 categories, 25 classes each (tools 12, others 30 incl. STELLA's 8)."""
    sizes = {
        "sports": 25,
        "music": 25,
        "vehicle": 25,
        "people": 25,
        "animals": 25,
        "home": 12,
        "nature": 14,
        "tools": 12,
        "others": 22,
    }
    category = {f"{cat} {i:02d}": cat for cat, n in sizes.items() for i in range(n)}
    for name in STELLA_OTHERS_PART1:
        category[name] = "others"
    classes = sorted(category)  # VGGSound's label file is alphabetical
    return classes, category


def test_stella_vggsound_preset() -> None:
    classes, category = _vggsound_categories()
    clips = _clips({"sports 00": 450}, split="train") + _clips({c: 3 for c in classes}, prefix="w")
    plan = _plan(clips, classes, category, PRESETS["stella-vggsound"].split_config(shard_size=64))
    names = [t.name for t in plan.tasks]
    assert names == ["sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2"]
    assert all(len(t.classes) == 20 for t in plan.tasks) and len(plan.classes) == 160
    by_name = {t.name: t for t in plan.tasks}
    assert by_name["sports"].classes == [f"sports {i:02d}" for i in range(20)]
    assert by_name["home_nature"].classes == sorted(
        [f"home {i:02d}" for i in range(12)] + [f"nature {i:02d}" for i in range(8)]
    )
    part1 = by_name["others_part1"].classes
    assert set(STELLA_OTHERS_PART1) <= set(part1) and {c for c in part1 if c.startswith("tools")} == {
        f"tools {i:02d}" for i in range(12)
    }
    part2 = by_name["others_part2"].classes
    assert not set(part2) & set(part1) and all(category[c] == "others" for c in part2)
    assert part2 == [c for c in classes if category[c] == "others" and c not in part1][:20]
    sports0 = [j for j in plan.jobs("train") if j.label_names[0] == "sports 00"]
    assert len(sports0) == 400 and plan.excluded["over_cap"] == 450 + 2 - 400  # 3 unsplit clips: 1 test, 2 train
    assert all(len(v) == 1 for t in plan.tasks for v in t.retrieval_candidates.values() if v)


def test_audioset_preset_excludes_multi_category_and_names_missing_categories() -> None:
    names = ("human", "vehicle", "nature", "animal", "others", "home", "music")
    category = {f"{cat}{i}": cat for cat in names for i in range(2)}
    classes = list(category)
    clips = _clips({c: 4 for c in classes}, split="train")
    clips += [
        SourceClip("x", "x.mp4", "/x/x.mp4", ("human0", "music1")),
        SourceClip("y", "y.mp4", "/x/y.mp4", ("human0", "human1")),
    ]
    plan = _plan(clips, classes, category, PRESETS["stella-audioset"].split_config())
    assert [t.name for t in plan.tasks] == list(names) and plan.excluded == {"multi_category": 1}
    assert "y" in [j.key for j in plan.jobs("train")]
    del category["home0"], category["home1"]
    with pytest.raises(SplitError, match="category 'home' is not in the category file"):
        _plan(clips, classes, category, PRESETS["stella-audioset"].split_config())


def test_class_order_and_custom_tasks() -> None:
    clips = _clips({"b": 2, "a": 2, "z": 2})
    assert class_order(clips, None, None) == ["a", "b", "z"]
    assert class_order(clips, [("1", "z"), ("2", "a"), ("3", "b")], None) == ["z", "a", "b"]
    category = {"z": "last", "a": "first", "b": "first"}
    assert class_order(clips, None, category) == ["z", "a", "b"]
    config = SplitConfig(tasks=(TaskSpec("late", ("last",)), TaskSpec("early", ("FIRST",), max_classes=1)))
    plan = _plan(clips, ["a", "b", "z"], category, config)
    assert [(t.name, t.classes) for t in plan.tasks] == [("late", ["z"]), ("early", ["a"])]
    assert plan.excluded == {"not_in_tasks": 2}
