"""What users have, read into one list of :class:`SourceClip`: folders, lists, VGGSound CSVs, CAV-MAE datafiles.

Supported inputs (``--input``; the kind is chosen by :func:`input_kind` from the path):

- **a folder** of videos, searched recursively for the extensions in ``VIDEO_EXTENSIONS``. A file's class is
  the first folder under the root (``root/<class>/.../clip.mp4``); files directly in the root get the class
  ``unlabelled``.
- **a list file** (``.txt``/``.lst``): one video path a line (relative to the list's folder), optionally
  followed by a tab and ``;``-separated class names. Blank lines and lines starting with ``#`` are skipped.
- **a VGGSound CSV** (``.csv``): rows ``youtube_id,start_seconds,label,split`` (the release has no header; a
  header row is skipped). The file of a row is ``video_dir / name_pattern`` formatted with ``{youtube_id}``,
  ``{start}`` (whole seconds, e.g. ``{start:06d}``) and ``{start_seconds}`` (as written in the CSV).
- **a CAV-MAE / AudioSet datafile** (``.json``): ``{"data": [{"video_id", "wav", "video_path", "labels"}]}``
  with ``labels`` a comma-separated list of class ids (AudioSet mids) or names, resolved through the class
  index CSV (``index,mid,display_name``). The video is ``video_path`` when that is a file, else
  ``name_pattern`` formatted with ``{video_id}`` inside ``video_dir`` (or inside ``video_path`` when that is a
  folder). With ``audio_from="wav"`` the audio comes from the entry's ``wav`` file instead of the video.

A pattern ending in ``.*`` matches any extension (the folder is listed once). Rows that cannot be read
(malformed CSV rows, datafile entries without a ``video_id``) become :class:`InputProblem` records, which the
builder writes to ``rejects.jsonl`` like any other rejected clip.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".wmv", ".3gp")
UNLABELLED = "unlabelled"
TEST_SPLIT_NAMES = {"test", "eval", "evaluation", "val", "valid", "validation"}
DEFAULT_PATTERNS = {"vggsound": "{youtube_id}_{start:06d}.mp4", "datafile": "{video_id}.mp4"}
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]+")


class InputError(ValueError):
    """An input file cannot be used at all (unreadable, wrong format); the message names the file and the fix."""


@dataclass(frozen=True)
class SourceClip:
    """One clip named by the inputs, before planning."""

    video_id: str
    """The id the input gives the clip (YouTube id + start, datafile video_id, relative path)."""
    source: str
    """How the clip is shown to users and stored in the sample's JSON (a path relative to its input)."""
    path: str
    """Absolute path of the video file (it may not exist: the builder rejects it then)."""
    labels: tuple[str, ...]
    """Class names (or ids resolved through the class index), in the input's order."""
    split: str | None = None
    """'train', 'test', or None when the builder assigns it."""
    start: float = 0.0
    """Seconds into the file where the segment starts."""
    audio_path: str | None = None
    origin: str = ""
    """Where the clip was named: 'vggsound.csv:12', 'train.json:data[3]', or the folder."""


@dataclass(frozen=True)
class InputProblem:
    """A row or entry of an input that names no usable clip."""

    source: str
    reason: str
    code: str = "bad_input_row"


@dataclass
class Inputs:
    """Everything read from the inputs: clips in input order, row problems, and the class list if one was given."""

    clips: list[SourceClip] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)

    def extend(self, other: Inputs) -> None:
        self.clips.extend(other.clips)
        self.problems.extend(other.problems)
        self.descriptions.extend(other.descriptions)


def input_kind(path: str | os.PathLike) -> str:
    """'folder', 'list', 'vggsound' or 'datafile', from what ``path`` is."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    if not p.exists():
        raise InputError(f"--input {p}: no such file or folder")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return "vggsound"
    if suffix == ".json":
        return "datafile"
    if suffix in (".txt", ".lst", ".list"):
        return "list"
    raise InputError(
        f"--input {p}: cannot tell what it is from its name; use a folder of videos, a .txt list of paths, "
        f"a VGGSound .csv or a CAV-MAE .json datafile"
    )


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _split_name(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v == "train":
        return "train"
    if v in TEST_SPLIT_NAMES:
        return "test"
    raise ValueError(f"split {value!r} is neither 'train' nor one of {sorted(TEST_SPLIT_NAMES)}")


def read_folder(
    root: str | os.PathLike, *, split: str | None = None, extensions: Iterable[str] = VIDEO_EXTENSIONS
) -> Inputs:
    """Every video under ``root`` (sorted), labelled by its first sub-folder."""
    root = Path(root).resolve()
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    clips = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in exts:
                continue
            rel = path.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else UNLABELLED
            clips.append(
                SourceClip(
                    video_id=rel.with_suffix("").as_posix(),
                    source=rel.as_posix(),
                    path=str(path),
                    labels=(label,),
                    split=split,
                    origin=str(root),
                )
            )
    clips.sort(key=lambda c: c.source)
    return Inputs(clips=clips, descriptions=[f"folder {root} ({len(clips)} videos)"])


def read_list(list_path: str | os.PathLike, *, split: str | None = None) -> Inputs:
    """A text list: ``PATH`` or ``PATH<TAB>class;class`` per line, paths relative to the list's folder."""
    list_path = Path(list_path).resolve()
    root = list_path.parent
    out = Inputs(descriptions=[f"list {list_path}"])
    for lineno, line in enumerate(_read_text(list_path).splitlines(), start=1):
        line = line.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, labels = line.partition("\t")
        path = (root / name.strip()).resolve() if not os.path.isabs(name.strip()) else Path(name.strip())
        names = tuple(x.strip() for x in labels.split(";") if x.strip()) or (UNLABELLED,)
        out.clips.append(
            SourceClip(
                video_id=_display(path, root).rsplit(".", 1)[0],
                source=_display(path, root),
                path=str(path),
                labels=names,
                split=split,
                origin=f"{list_path.name}:{lineno}",
            )
        )
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from None


class _PatternResolver:
    """Turns a file-name pattern into a path inside a folder; ``.*`` patterns look the stem up in a listing."""

    def __init__(self, folder: Path, pattern: str) -> None:
        self.folder = folder
        self.pattern = pattern
        self.any_ext = pattern.endswith(".*")
        self._listing: dict[str, Path] | None = None

    def _stems(self) -> dict[str, Path]:
        if self._listing is None:
            listing: dict[str, Path] = {}
            base = self.folder / Path(self.pattern).parent
            try:
                names = sorted(os.listdir(base))
            except OSError:
                names = []
            for name in names:
                listing.setdefault(name.rsplit(".", 1)[0] if "." in name else name, base / name)
            self._listing = listing
        return self._listing

    def resolve(self, **fields: object) -> Path:
        try:
            name = self.pattern.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(
                f"--name-pattern {self.pattern!r}: cannot fill it ({err!r}); placeholders: "
                f"{', '.join('{' + k + '}' for k in fields)}"
            ) from None
        if not self.any_ext:
            return self.folder / name
        stem = Path(name[:-2]).name
        return self._stems().get(stem, self.folder / name)


def read_vggsound_csv(
    csv_path: str | os.PathLike,
    *,
    video_dir: str | os.PathLike | None = None,
    name_pattern: str | None = None,
    seek: bool = False,
) -> Inputs:
    """VGGSound-style rows ``youtube_id,start_seconds,label,split``; files found by ``name_pattern``.

    With ``seek`` the segment starts at ``start_seconds`` inside the file (full-length downloads); by default the
    files are taken to be cut to the clip already (as VGGSound is distributed) and the segment starts at 0.
    """
    csv_path = Path(csv_path).resolve()
    folder = Path(video_dir).resolve() if video_dir else csv_path.parent
    resolver = _PatternResolver(folder, name_pattern or DEFAULT_PATTERNS["vggsound"])
    out = Inputs(descriptions=[f"vggsound csv {csv_path} (videos in {folder}, pattern {resolver.pattern!r})"])
    rows = list(csv.reader(_read_text(csv_path).splitlines()))
    for lineno, row in enumerate(rows, start=1):
        where = f"{csv_path.name}:{lineno}"
        if not row or all(not x.strip() for x in row):
            continue
        if len(row) != 4:
            out.problems.append(
                InputProblem(where, f"malformed row: {len(row)} fields, expected youtube_id,start_seconds,label,split")
            )
            continue
        ytid, start_text, label, split_text = (x.strip() for x in row)
        try:
            start = float(start_text)
        except ValueError:
            if lineno == 1:
                continue  # a header row
            out.problems.append(InputProblem(where, f"malformed row: start_seconds {start_text!r} is not a number"))
            continue
        try:
            split = _split_name(split_text)
        except ValueError as err:
            out.problems.append(InputProblem(where, f"malformed row: {err}"))
            continue
        path = resolver.resolve(youtube_id=ytid, video_id=ytid, start=int(start), start_seconds=start_text)
        start_id = f"{int(start):06d}" if start == int(start) else start_text.replace(".", "p")
        out.clips.append(
            SourceClip(
                video_id=f"{ytid}_{start_id}",
                source=_display(path, folder),
                path=str(path),
                labels=(label,),
                split=split,
                start=start if seek else 0.0,
                origin=where,
            )
        )
    return out


def read_class_index(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, display name) pairs in file order from a CAV-MAE class index CSV (``index,mid,display_name``).

    A two-column file (``mid,display_name``) or a one-column list of names is accepted too.
    """
    path = Path(path).resolve()
    rows = [r for r in csv.reader(_read_text(path).splitlines()) if r and any(x.strip() for x in r)]
    if not rows:
        raise InputError(f"--class-index {path}: the file is empty")
    header = [x.strip().lower() for x in rows[0]]
    if "display_name" in header or "mid" in header or "name" in header:
        rows = rows[1:]
    out = []
    for lineno, row in enumerate(rows, start=2 if header else 1):
        row = [x.strip() for x in row]
        if len(row) >= 3:
            out.append((row[1], row[2]))
        elif len(row) == 2:
            out.append((row[0], row[1]))
        elif len(row) == 1:
            out.append((row[0], row[0]))
        else:
            raise InputError(f"--class-index {path}:{lineno}: expected index,mid,display_name")
    names = [name for _, name in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--class-index {path}: class names appear twice: {dup[:5]}")
    return out


def read_datafile(
    json_path: str | os.PathLike,
    *,
    class_ids: dict[str, str] | None = None,
    video_dir: str | os.PathLike | None = None,
    name_pattern: str | None = None,
    audio_from: str = "video",
    split: str | None = None,
) -> Inputs:
    """A CAV-MAE datafile; ``class_ids`` maps label ids (mids) to class names."""
    json_path = Path(json_path).resolve()
    try:
        data = json.loads(_read_text(json_path))
    except json.JSONDecodeError as err:
        raise InputError(f"{json_path}: not valid JSON ({err})") from None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputError(f'{json_path}: expected {{"data": [{{"video_id", "wav", "video_path", "labels"}}]}}')
    pattern = name_pattern or DEFAULT_PATTERNS["datafile"]
    fixed = Path(video_dir).resolve() if video_dir else None
    resolvers: dict[Path, _PatternResolver] = {}
    out = Inputs(descriptions=[f"datafile {json_path} ({len(entries)} entries, pattern {pattern!r})"])
    for i, entry in enumerate(entries):
        where = f"{json_path.name}:data[{i}]"
        if not isinstance(entry, dict) or not str(entry.get("video_id", "")).strip():
            out.problems.append(InputProblem(where, "malformed entry: no 'video_id'"))
            continue
        vid = str(entry["video_id"]).strip()
        raw_labels = [x.strip() for x in str(entry.get("labels", "")).split(",") if x.strip()]
        labels = tuple(class_ids.get(x, x) if class_ids else x for x in raw_labels)
        vp = entry.get("video_path")
        vp_path = _relative_to(json_path.parent, vp) if vp else None
        if fixed is None and vp_path is not None and vp_path.is_file():
            path, folder = vp_path, vp_path.parent
        else:
            folder = fixed or (vp_path if vp_path is not None and vp_path.is_dir() else json_path.parent)
            resolver = resolvers.setdefault(folder, _PatternResolver(folder, pattern))
            path = resolver.resolve(video_id=vid, youtube_id=vid)
        audio_path = None
        if audio_from == "wav":
            if not entry.get("wav"):
                out.problems.append(InputProblem(where, "entry has no 'wav' but --audio-from wav was given"))
                continue
            audio_path = str(_relative_to(json_path.parent, entry["wav"]))
        out.clips.append(
            SourceClip(
                video_id=vid,
                source=_display(path, folder),
                path=str(path),
                labels=labels,
                split=split,
                audio_path=audio_path,
                origin=where,
            )
        )
    return out


def _relative_to(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


def read_category_map(path: str | os.PathLike) -> dict[str, str]:
    """Class name -> category, in file order.

    Accepted: a JSON object ``{category: [classes]}`` or ``{class: category}``, or a CSV/TSV with rows
    ``class,category`` (a header row naming the columns is skipped).
    """
    path = Path(path).resolve()
    text = _read_text(path)
    out: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"--categories {path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or not data:
            raise InputError(f"--categories {path}: expected a JSON object {{category: [classes]}}")
        for k, v in data.items():
            if isinstance(v, list):
                for cls in v:
                    _add_category(out, str(cls).strip(), str(k).strip(), path)
            elif isinstance(v, str):
                _add_category(out, str(k).strip(), v.strip(), path)
            else:
                raise InputError(f"--categories {path}: value of {k!r} must be a list of classes or a category name")
        return out
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" or ("\t" in text and "," not in text) else "excel"
    rows = [r for r in csv.reader(text.splitlines(), dialect=dialect) if r and any(x.strip() for x in r)]
    for lineno, row in enumerate(rows, start=1):
        row = [x.strip() for x in row]
        if len(row) < 2:
            raise InputError(f"--categories {path}:{lineno}: expected 'class,category'")
        if lineno == 1 and row[1].lower() in ("category", "categories", "group"):
            continue
        _add_category(out, row[0], row[-1], path)
    if not out:
        raise InputError(f"--categories {path}: no 'class,category' rows")
    return out


def _add_category(out: dict[str, str], cls: str, category: str, path: Path) -> None:
    if cls in out and out[cls] != category:
        raise InputError(f"--categories {path}: class {cls!r} is in both {out[cls]!r} and {category!r}")
    out[cls] = category


def sample_key(video_id: str) -> str:
    """A tar-safe sample key (letters, digits, '_' and '-') from an input id."""
    key = _KEY_CHARS.sub("_", video_id.replace("/", "__")).strip("_")
    return key or "clip"


def read_inputs(
    paths: list[str],
    *,
    test_paths: list[str] | None = None,
    class_ids: dict[str, str] | None = None,
    video_dir: str | None = None,
    name_pattern: str | None = None,
    audio_from: str = "video",
    extensions: Iterable[str] = VIDEO_EXTENSIONS,
    csv_seek: bool = False,
) -> Inputs:
    """Read every ``--input`` (split from the input or assigned later) and ``--test-input`` (all test)."""
    out = Inputs()
    for path, forced in [(p, None) for p in paths] + [(p, "test") for p in test_paths or []]:
        kind = input_kind(path)
        if kind == "folder":
            part = read_folder(path, split=forced, extensions=extensions)
        elif kind == "list":
            part = read_list(path, split=forced)
        elif kind == "vggsound":
            part = read_vggsound_csv(path, video_dir=video_dir, name_pattern=name_pattern, seek=csv_seek)
            if forced:
                part.clips = [replace(c, split=forced) for c in part.clips]
        else:
            part = read_datafile(
                path,
                class_ids=class_ids,
                video_dir=video_dir,
                name_pattern=name_pattern,
                audio_from=audio_from,
                split=forced,
            )
        out.extend(part)
    return out
