"""Shard writer: tar layout, DALI index agreement with DALI's own wds2idx, atomicity, reproducibility."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from shards.writer import Sample, ShardError, iter_shard, read_index, remove_partials, shard_complete, write_shard


def _samples(n: int = 5) -> list[Sample]:
    # sizes chosen to straddle tar's 512-byte blocks (0, 511, 512, 513 ...)
    sizes = [0, 511, 512, 513, 2000, 7]
    return [
        Sample(f"clip_{i:03d}", {"mp4": bytes([i]) * sizes[i % 6], "flac": b"f" * (i + 1), "json": b"{}"})
        for i in range(n)
    ]


def test_round_trip_and_index(tmp_path: Path) -> None:
    info = write_shard(tmp_path / "shard-000000.tar", _samples())
    assert info.num_samples == 5 and info.index == tmp_path / "shard-000000.idx"
    back = list(iter_shard(info.tar))
    assert [s.key for s in back] == [s.key for s in _samples()]
    assert all(dict(a.members) == dict(b.members) for a, b in zip(back, _samples(), strict=True))
    raw = info.tar.read_bytes()
    for sample, entries in zip(_samples(), read_index(info.index), strict=True):
        assert [e[0] for e in entries] == ["mp4", "flac", "json"]
        for ext, offset, size, name in entries:
            assert name == f"{sample.key}.{ext}"
            assert raw[offset : offset + size] == sample.members[ext]


@pytest.mark.parametrize("use_gnu_tar", [True, False])
def test_index_matches_dalis_wds2idx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_gnu_tar: bool) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # shipped with nvidia-dali
    if use_gnu_tar and shutil.which("tar") is None:
        pytest.skip("GNU tar not installed")
    if not use_gnu_tar:
        monkeypatch.setattr(wds2idx, "which", lambda _: None)
    info = write_shard(tmp_path / "s.tar", _samples(6))
    theirs = tmp_path / "theirs.idx"
    with wds2idx.IndexCreator(str(info.tar), str(theirs), verbose=False) as creator:
        creator.create_index()
    assert info.index.read_text() == theirs.read_text()


def test_reproducible_bytes(tmp_path: Path) -> None:
    a = write_shard(tmp_path / "a.tar", _samples())
    b = write_shard(tmp_path / "b.tar", _samples())
    assert a.tar.read_bytes() == b.tar.read_bytes()
    with tarfile.open(a.tar) as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in tar} == {(0, 0, 0, "", 0o644)}


@pytest.mark.parametrize(
    "samples, message",
    [
        ([Sample("a.b", {"mp4": b""})], "no dots"),
        ([Sample("a/b", {"mp4": b""})], "no slashes"),
        ([Sample("a", {"mp4": b""}), Sample("a", {"mp4": b""})], "appears twice"),
        ([Sample("a", {})], "has no members"),
        ([Sample("a", {"MP4": b""})], "not lower-case"),
        ([], "no samples"),
    ],
)
def test_bad_samples_leave_no_shard(tmp_path: Path, samples: list[Sample], message: str) -> None:
    target = tmp_path / "shard-000001.tar"
    with pytest.raises(ShardError, match=message):
        write_shard(target, samples)
    assert not target.exists() and not target.with_suffix(".idx").exists()
    assert not shard_complete(target)


def test_interrupted_write_leaves_only_partials(tmp_path: Path) -> None:
    def exploding():
        yield from _samples(2)
        raise KeyboardInterrupt

    target = tmp_path / "t" / "shard-000002.tar"
    with pytest.raises(KeyboardInterrupt):
        write_shard(target, exploding())
    assert not shard_complete(target)
    assert [p.name for p in remove_partials(tmp_path)] == ["shard-000002.tar.partial"]
    write_shard(target, _samples(2))
    assert shard_complete(target)


def test_read_index_rejects_corrupt_files(tmp_path: Path) -> None:
    bad = tmp_path / "x.idx"
    bad.write_text("v1.1 1\nmp4 512 3 a.mp4\n")
    with pytest.raises(ShardError, match="is not 'v1.2 <num_samples>'"):
        read_index(bad)
    bad.write_text("v1.2 2\nmp4 512 3 a.mp4\n")
    with pytest.raises(ShardError, match="header says 2 samples, found 1"):
        read_index(bad)
    bad.write_text("v1.2 1\nmp4 512 3\n")
    with pytest.raises(ShardError, match="groups of 'ext offset size name'"):
        read_index(bad)
