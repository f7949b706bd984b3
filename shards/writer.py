"""WebDataset tar shards with DALI index files: the one writer every dataset in fastav goes through.

A sample is a key (no dots, no slashes) and its members, written as consecutive tar entries
``KEY.mp4``, ``KEY.flac``, ``KEY.json``. Beside each ``shard-NNNNNN.tar`` lies ``shard-NNNNNN.idx`` in
the text format of DALI's ``wds2idx`` (version ``v1.2``): a header ``v1.2 <num_samples>``, then per
sample the ``<ext> <data_offset> <size> <member_name>`` of each member on one line. The index is computed
from the offsets the writer itself produced, so no second pass over the tar is needed.

Shards are written whole: to ``NAME.tar.partial`` / ``NAME.idx.partial``, flushed, then renamed (index
first, tar last). A shard whose final ``.tar`` exists is therefore complete, and a re-run that plans the
same shards can skip it (:func:`shard_complete`). Tars are byte-reproducible: fixed mtime, owner and
mode, members in the order given.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"
_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
_EXT = re.compile(r"^[a-z0-9][a-z0-9.]*$")


class ShardError(ValueError):
    """A sample cannot be written as given (bad key or member name); the message says which."""


@dataclass(frozen=True)
class Sample:
    key: str
    members: Mapping[str, bytes]
    """Extension (without the dot) -> bytes, in the order they go into the tar."""


@dataclass(frozen=True)
class ShardInfo:
    tar: Path
    index: Path
    num_samples: int
    num_bytes: int


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ShardError(f"sample key {key!r}: use only letters, digits, '_' and '-' (no dots, no slashes)")
    return key


def write_shard(tar_path: str | os.PathLike, samples: Iterable[Sample]) -> ShardInfo:
    """Write ``samples`` into ``tar_path`` and its ``.idx`` atomically; return what was written."""
    tar_path = Path(tar_path)
    if tar_path.suffix != ".tar":
        raise ShardError(f"{tar_path}: a shard's name must end in .tar")
    idx_path = tar_path.with_suffix(".idx")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar = tar_path.with_name(tar_path.name + ".partial")
    tmp_idx = idx_path.with_name(idx_path.name + ".partial")

    lines: list[str] = []
    seen: set[str] = set()
    with open(tmp_tar, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for sample in samples:
                check_key(sample.key)
                if sample.key in seen:
                    raise ShardError(f"{tar_path.name}: sample key {sample.key!r} appears twice")
                if not sample.members:
                    raise ShardError(f"sample {sample.key!r} has no members")
                seen.add(sample.key)
                parts = []
                for ext, data in sample.members.items():
                    if not _EXT.match(ext):
                        raise ShardError(f"sample {sample.key!r}: member extension {ext!r} is not lower-case a-z0-9")
                    name = f"{sample.key}.{ext}"
                    info = _tarinfo(name, len(data))
                    tar.addfile(info, io.BytesIO(data))
                    # the data ends where the tar now stands, padded to whole 512-byte blocks
                    data_offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    parts.append(f"{ext} {data_offset} {len(data)} {name}")
                lines.append(" ".join(parts))
        raw.flush()
        os.fsync(raw.fileno())
    if not lines:
        tmp_tar.unlink()
        raise ShardError(f"{tar_path.name}: no samples to write")
    with open(tmp_idx, "w") as idx:
        idx.write(f"{INDEX_VERSION} {len(lines)}\n")
        idx.write("\n".join(lines) + "\n")
    os.replace(tmp_idx, idx_path)
    os.replace(tmp_tar, tar_path)
    return ShardInfo(tar=tar_path, index=idx_path, num_samples=len(lines), num_bytes=tar_path.stat().st_size)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def shard_complete(tar_path: str | os.PathLike) -> bool:
    """Whether a shard and its index were fully written (the tar is renamed last)."""
    tar_path = Path(tar_path)
    return tar_path.is_file() and tar_path.with_suffix(".idx").is_file()


def remove_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete ``*.partial`` leftovers of an interrupted build under ``directory``; return them."""
    removed = sorted(Path(directory).rglob("*.partial"))
    for path in removed:
        path.unlink()
    return removed


def read_index(idx_path: str | os.PathLike) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI index: per sample, a list of (ext, data_offset, size, member_name)."""
    text = Path(idx_path).read_text().splitlines()
    if not text:
        raise ShardError(f"{idx_path}: empty index file")
    header = text[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION:
        raise ShardError(f"{idx_path}: header {text[0]!r} is not '{INDEX_VERSION} <num_samples>'")
    samples = []
    for lineno, line in enumerate(text[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise ShardError(f"{idx_path}:{lineno}: expected groups of 'ext offset size name'")
        samples.append(
            [(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)]
        )
    if len(samples) != int(header[1]):
        raise ShardError(f"{idx_path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def iter_shard(tar_path: str | os.PathLike) -> Iterable[Sample]:
    """Read a shard back as samples (members grouped by key, in tar order)."""
    current: dict[str, bytes] = {}
    key = None
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if key is not None and k != key:
                yield Sample(key, current)
                current = {}
            key = k
            fileobj = tar.extractfile(member)
            assert fileobj is not None  # regular file
            current[ext] = fileobj.read()
    if key is not None:
        yield Sample(key, current)
