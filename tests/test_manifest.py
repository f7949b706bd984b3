"""Manifest checks: readers refuse unsupported versions and parameters with a message naming the field."""

from __future__ import annotations

import json

import pytest

from shards.manifest import FORMAT_VERSION, ManifestError, load_manifest, shard_paths, summary, task_names


def _rewrite(root, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def dataset_copy(synth_dataset, tmp_path):
    root, _, _ = synth_dataset
    (tmp_path / "manifest.json").write_text((root / "manifest.json").read_text())
    return tmp_path


def test_load_and_supported_parameters(synth_dataset) -> None:
    root, manifest, _ = synth_dataset
    loaded = load_manifest(root, supported={"sample_rate": 16000, "video_codec": ("vp9", "h264")})
    assert loaded == manifest
    with pytest.raises(ManifestError, match="preprocessing.video_codec = 'vp9' is not supported by this reader"):
        load_manifest(root, supported={"video_codec": ("h264",)})
    with pytest.raises(ManifestError, match="preprocessing.sample_rate = 16000 is not supported"):
        load_manifest(root, supported={"sample_rate": 44100})
    assert "pulses" in summary(manifest)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "field 'format_version' is 2"),
        (lambda m: m.update(format="other"), "field 'format' is 'other'"),
        (lambda m: m.pop("tasks"), "field 'tasks' is missing"),
        (lambda m: m["preprocessing"].update(fps="8"), "field 'preprocessing.fps' must be a int"),
        (lambda m: m["tasks"][0]["splits"].pop("retrieval"), "field 'tasks\\[0\\].splits.retrieval' needs"),
        (lambda m: m["tasks"][1]["classes"].append("nope"), "'tasks\\[1\\].classes' names unknown classes"),
        (lambda m: m["tasks"][0]["splits"]["train"].update(num_samples=1), "shard counts do not add up"),
        (lambda m: m["tasks"][2].update(role="warmup"), "'tasks\\[2\\].role' is 'warmup'"),
    ],
)
def test_malformed_manifests_are_refused(dataset_copy, change, message) -> None:
    _rewrite(dataset_copy, change)
    with pytest.raises(ManifestError, match=message):
        load_manifest(dataset_copy)


def test_a_task_without_role_is_continual(dataset_copy) -> None:
    _rewrite(dataset_copy, lambda m: [t.pop("role") for t in m["tasks"]])
    manifest = load_manifest(dataset_copy)
    assert task_names(manifest) == ["pulses", "chimes", "buzzes"] and task_names(manifest, "pretrain") == []
    with pytest.raises(ManifestError, match="task role 'warmup'"):
        task_names(manifest, "warmup")


def test_missing_and_invalid(tmp_path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_shard_paths(synth_dataset) -> None:
    root, manifest, _ = synth_dataset
    paths = shard_paths(root, manifest, "train", ["chimes"])
    assert paths and all(t.is_file() and i.is_file() and "chimes/train" in str(t) for t, i in paths)
    assert len(shard_paths(root, manifest, "test")) == sum(
        len(t["splits"]["test"]["shards"]) for t in manifest["tasks"]
    )
    with pytest.raises(ManifestError, match="task 'nope' is not in the manifest"):
        shard_paths(root, manifest, "train", ["nope"])
    with pytest.raises(ManifestError, match="split 'val'"):
        shard_paths(root, manifest, "val")
