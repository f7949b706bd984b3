"""Continual-learning splits: which clips go into which task and split, and in which shard, decided up front.

The plan is a pure function of the inputs, the class list, the category map, a :class:`SplitConfig` and the
seed: the same arguments give the same tasks, keys, sample indices and shard contents, which is what lets a
re-run of the builder skip finished shards and rewrite an interrupted one byte for byte.

Rules, in the order they are applied to the input clips:

1. **Classes and tasks.** A class list (the class index file's order, else the category file's, else the
   sorted labels) and a category map (class -> category) give the tasks: each :class:`TaskSpec` takes the
   classes of its categories plus any classes it names, in class-list order, skipping classes an earlier task
   took, and keeps the first ``max_classes`` (STELLA: 20). Without a category map there is one task, ``all``.
2. **Duplicates** (the same file and start listed twice) keep the first listing.
3. **Labels.** Labels that are not classes of the class list are dropped; a clip left with none is excluded
   (``unknown_class``), as is one whose labels are in no task (``not_in_tasks``).
4. **Multi-category exclusion** (AudioSet protocol, ``exclude_multi_category``): a clip whose labels fall in
   more than one task or category is excluded. Otherwise it goes to the task of its first selected label.
5. **Missing and empty files** are rejected here (cheap ``stat``), before any cap, so the cap counts clips
   that exist.
6. **Test split.** Clips whose input gives no split are split per class: a seeded ``test_fraction`` to test.
7. **Cap.** At most ``cap_per_class`` training clips per class (STELLA: 400), a seeded choice; a clip counts
   for its first selected label (its *primary class*). Test clips are never capped.
8. **Order and shards.** Training clips of a task are shuffled (seeded) so that shards mix classes; test
   clips are sorted by class and key. Each split is cut into shards of ``shard_size``. Sample indices count
   train then test clips over the tasks in order.
9. **Retrieval.** Per class, a seeded order of its test clips; the builder takes the first
   ``retrieval_per_class`` that were built (CAV-MAE / STELLA: 5 per class).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from shards.rejects import code_counts
from shards.sources import InputProblem, SourceClip, sample_key
from shards.transcode import ClipJob, ClipRejected, check_file

_SEED_TEST, _SEED_CAP, _SEED_ORDER, _SEED_RETRIEVAL = 0x7E57, 0xCA9, 0x0DE2, 0x2E72


class SplitError(ValueError):
    """The split cannot be made as asked (unknown category, empty task); the message names the option to change."""


@dataclass(frozen=True)
class TaskSpec:
    """One continual task: the classes of some categories and/or named classes."""

    name: str
    categories: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    max_classes: int | None = None
    """Keep the first N classes in class-list order (STELLA: 20); None keeps all."""


@dataclass(frozen=True)
class SplitConfig:
    tasks: tuple[TaskSpec, ...] | None = None
    """Tasks in training order; None: one task per category in category-file order (or ``all``)."""
    cap_per_class: int | None = None
    exclude_multi_category: bool = False
    retrieval_per_class: int = 5
    test_fraction: float = 0.2
    seed: int = 0
    shard_size: int = 256
    classes_per_task: int | None = None
    """Keep the first N classes of every task (overrides the tasks' ``max_classes``)."""

    def __post_init__(self) -> None:
        if self.cap_per_class is not None and self.cap_per_class < 1:
            raise SplitError(f"--cap-per-class {self.cap_per_class}: must be at least 1")
        if self.retrieval_per_class < 0:
            raise SplitError(f"--retrieval-per-class {self.retrieval_per_class}: must be 0 or more")
        if not 0.0 <= self.test_fraction < 1.0:
            raise SplitError(f"--test-fraction {self.test_fraction}: must be in [0, 1)")
        if self.shard_size < 1:
            raise SplitError(f"--shard-size {self.shard_size}: must be at least 1")
        if self.classes_per_task is not None and self.classes_per_task < 1:
            raise SplitError(f"--classes-per-task {self.classes_per_task}: must be at least 1")

    def describe(self) -> dict[str, Any]:
        return {
            "tasks": None if self.tasks is None else [t.__dict__ for t in self.tasks],
            "cap_per_class": self.cap_per_class,
            "exclude_multi_category": self.exclude_multi_category,
            "retrieval_per_class": self.retrieval_per_class,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "classes_per_task": self.classes_per_task,
        }


@dataclass
class TaskPlan:
    name: str
    category: str
    """The task's categories joined by '+' (the manifest's ``tasks[].category``)."""
    classes: list[str]
    shards: dict[str, list[list[ClipJob]]]
    """'train' and 'test': the jobs of each shard, in order."""
    retrieval_candidates: dict[str, list[str]]
    """Per class, the keys of its test clips in the seeded order retrieval clips are taken from."""


@dataclass
class Plan:
    tasks: list[TaskPlan]
    classes: list[str]
    """The selected classes in task order; sample labels index this list."""
    categories: dict[str, list[str]]
    """Category -> its selected classes."""
    class_category: dict[str, str]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    """Clips rejected while planning (missing, empty, unreadable row), as rejects.jsonl records."""
    excluded: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def jobs(self, split: str) -> list[ClipJob]:
        return [job for t in self.tasks for shard in t.shards.get(split, []) for job in shard]

    def summary(self, retrieval_per_class: int) -> str:
        lines = [f"{'task':<18} {'classes':>7} {'train':>7} {'test':>7} {'retrieval<=':>11} {'shards':>7}"]
        for t in self.tasks:
            n = {s: sum(len(x) for x in t.shards[s]) for s in ("train", "test")}
            retrieval = sum(min(retrieval_per_class, len(v)) for v in t.retrieval_candidates.values())
            shards = len(t.shards["train"]) + len(t.shards["test"])
            lines.append(f"{t.name:<18} {len(t.classes):>7} {n['train']:>7} {n['test']:>7} {retrieval:>11} {shards:>7}")
        counts = f" ({code_counts(self.rejects)})" if self.rejects else ""
        lines.append(f"rejected while planning: {len(self.rejects)}{counts}")
        if self.excluded:
            lines.append("excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(self.excluded.items())))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").casefold().split())


def class_order(
    clips: list[SourceClip], class_index: list[tuple[str, str]] | None, class_category: dict[str, str] | None
) -> list[str]:
    """The class list: the class index file's order, else the category file's, else the sorted labels."""
    if class_index:
        return [name for _, name in class_index]
    if class_category:
        known = list(class_category)
        extra = sorted({label for c in clips for label in c.labels} - set(known))
        return known + extra
    return sorted({label for c in clips for label in c.labels})


def resolve_tasks(
    classes: list[str],
    class_category: dict[str, str] | None,
    specs: tuple[TaskSpec, ...] | None,
    classes_per_task: int | None = None,
) -> list[tuple[TaskSpec, list[str]]]:
    """Each task with its classes (class-list order); errors name the missing category or class."""
    if class_category is None:
        if specs is not None:
            raise SplitError("--tasks / --preset need --categories (a class -> category file)")
        return [(TaskSpec("all", ("all",)), list(classes)[:classes_per_task])]
    by_norm = {_norm(c): c for c in classes}
    category_of = {by_norm[_norm(c)]: cat for c, cat in class_category.items() if _norm(c) in by_norm}
    cats_in_order = list(dict.fromkeys(class_category.values()))
    if specs is None:
        specs = tuple(TaskSpec(_task_name(cat), (cat,)) for cat in cats_in_order)
    cat_by_norm = {_norm(c): c for c in cats_in_order}
    taken: set[str] = set()
    out = []
    for spec in specs:
        wanted_cats = set()
        for cat in spec.categories:
            match = next((cat_by_norm[n] for n in _plural_forms(_norm(cat)) if n in cat_by_norm), None)
            if match is None:
                raise SplitError(
                    f"task {spec.name!r}: category {cat!r} is not in the category file (categories: "
                    f"{', '.join(cats_in_order)}); rename it there or choose other tasks"
                )
            wanted_cats.add(match)
        named = set()
        for cls in spec.classes:
            if _norm(cls) not in by_norm:
                raise SplitError(f"task {spec.name!r}: class {cls!r} is not in the class list")
            named.add(by_norm[_norm(cls)])
        members = [c for c in classes if c not in taken and (category_of.get(c) in wanted_cats or c in named)]
        limit = spec.max_classes if classes_per_task is None else classes_per_task
        if limit is not None:
            members = members[:limit]
        if not members:
            raise SplitError(f"task {spec.name!r} has no classes (categories {list(spec.categories)})")
        taken.update(members)
        out.append((spec, members))
    return out


def _plural_forms(name: str) -> tuple[str, ...]:
    return (name, name[:-1]) if name.endswith("s") else (name, name + "s")


def _task_name(category: str) -> str:
    return sample_key(category.replace(" ", "_").lower()) or "task"


def plan_dataset(
    clips: list[SourceClip],
    classes: list[str],
    class_category: dict[str, str] | None,
    config: SplitConfig,
    *,
    problems: list[InputProblem] | None = None,
    check_files: bool = True,
) -> Plan:
    """Decide tasks, splits, caps, keys, indices and shards for ``clips`` (see the module docstring)."""
    resolved = resolve_tasks(classes, class_category, config.tasks, config.classes_per_task)
    names = _ClassNames.make(classes, class_category, resolved)
    plan = Plan(tasks=[], classes=names.selected, categories={}, class_category=names.class_category)
    for cls in names.selected:
        plan.categories.setdefault(plan.class_category[cls], []).append(cls)
    if names.unmatched:
        plan.warnings.append(
            f"{len(names.unmatched)} classes of the category file are not in the class list (ignored): "
            f"{names.unmatched[:5]}"
        )
    plan.rejects += [{"source": p.source, "reason": p.reason, "code": p.code} for p in problems or []]
    excluded: Counter[str] = Counter()
    kept = _select_clips(clips, names, config=config, excluded=excluded, warnings=plan.warnings)  # rules 2-4
    if check_files:
        kept = _present_clips(kept, rejects=plan.rejects)  # rule 5
    keys = _unique_keys([k.clip for k in kept])
    split_of = _assign_splits(kept, names, config=config, excluded=excluded)  # rules 6-7
    plan.tasks = _task_plans(kept, keys, split_of, resolved, names=names, config=config, warnings=plan.warnings)
    plan.excluded = dict(sorted(excluded.items()))
    task_names = [t.name for t in plan.tasks]
    if len(set(task_names)) != len(task_names):
        raise SplitError(f"task names repeat: {task_names}")
    return plan


@dataclass(frozen=True)
class _ClassNames:
    """How labels map to classes, categories and tasks."""

    by_norm: dict[str, str]
    """Normalised name -> class of the class list."""
    category_of: dict[str, str]
    """Class -> category, for the classes of the category file that are in the class list."""
    unmatched: list[str]
    """Classes of the category file that are not in the class list."""
    task_of: dict[str, int]
    """Selected class -> index of its task."""
    label_id: dict[str, int]
    """Selected class -> its label (position in ``selected``)."""

    @classmethod
    def make(
        cls, classes: list[str], class_category: dict[str, str] | None, resolved: list[tuple[TaskSpec, list[str]]]
    ) -> _ClassNames:
        by_norm = {_norm(c): c for c in classes}
        category_of: dict[str, str] = {}
        unmatched: list[str] = []
        for c, cat in (class_category or {}).items():
            if _norm(c) in by_norm:
                category_of[by_norm[_norm(c)]] = cat
            else:
                unmatched.append(c)
        task_of = {c: i for i, (_, members) in enumerate(resolved) for c in members}
        selected = [c for _, members in resolved for c in members]
        label_id = {c: i for i, c in enumerate(selected)}
        return cls(by_norm, category_of, unmatched, task_of, label_id)

    @property
    def selected(self) -> list[str]:
        return list(self.label_id)

    @property
    def class_category(self) -> dict[str, str]:
        return {c: self.category_of.get(c, "all") for c in self.label_id}


class _Kept(NamedTuple):
    clip: SourceClip
    labels: list[str]
    """Its labels that are selected classes, in the input's order; the first is its primary class."""
    task: int


def _select_clips(
    clips: list[SourceClip], names: _ClassNames, *, config: SplitConfig, excluded: Counter[str], warnings: list[str]
) -> list[_Kept]:
    """Rules 2-4: drop duplicates, clips without a known label, multi-category ones (if asked), clips in no task."""
    seen: set[tuple[str, float, str | None]] = set()
    kept: list[_Kept] = []
    unknown_examples: list[str] = []
    for clip in clips:
        ident = (clip.path, clip.start, clip.audio_path)
        if ident in seen:
            excluded["duplicate"] += 1
            continue
        seen.add(ident)
        labels = [names.by_norm[_norm(x)] for x in clip.labels if _norm(x) in names.by_norm]
        if not labels:
            excluded["unknown_class"] += 1
            if len(unknown_examples) < 3:
                unknown_examples.append(f"{clip.origin or clip.source}: {', '.join(clip.labels) or '(no labels)'}")
            continue
        groups = {
            ("task", names.task_of[x]) if x in names.task_of else ("category", names.category_of[x])
            for x in labels
            if x in names.task_of or x in names.category_of
        }
        if config.exclude_multi_category and len(groups) > 1:
            excluded["multi_category"] += 1
            continue
        chosen = [x for x in labels if x in names.task_of]
        if not chosen:
            excluded["not_in_tasks"] += 1
            continue
        kept.append(_Kept(clip, list(dict.fromkeys(chosen)), names.task_of[chosen[0]]))
    if unknown_examples:
        warnings.append(
            f"{excluded['unknown_class']} clips have no label in the class list, e.g. {'; '.join(unknown_examples)}"
        )
    return kept


def _present_clips(kept: list[_Kept], *, rejects: list[dict[str, Any]]) -> list[_Kept]:
    """Rule 5: the clips whose files exist and are not empty; the others become rejects."""
    present = []
    for item in kept:
        try:
            check_file(item.clip.path)
            if item.clip.audio_path is not None:
                check_file(item.clip.audio_path)
        except ClipRejected as rej:
            rejects.append(_reject_record(item.clip, rej.code, rej.reason))
            continue
        present.append(item)
    return present


def _assign_splits(
    kept: list[_Kept], names: _ClassNames, *, config: SplitConfig, excluded: Counter[str]
) -> dict[int, str]:
    """Rules 6-7: 'train', 'test' or 'over_cap' for each kept clip (by position), class by class."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(kept):
        by_class[item.labels[0]].append(i)
    split_of: dict[int, str] = {}
    for cls, members in by_class.items():
        ci = names.label_id[cls]
        unsplit = [i for i in members if kept[i].clip.split is None]
        for i in members:
            if kept[i].clip.split is not None:
                split_of[i] = kept[i].clip.split  # type: ignore[assignment]
        if unsplit:
            order = np.random.default_rng([config.seed, ci, _SEED_TEST]).permutation(len(unsplit))
            n_test = int(round(len(unsplit) * config.test_fraction))
            if config.test_fraction > 0 and len(unsplit) >= 2:
                n_test = max(1, n_test)
            for rank, j in enumerate(order):
                split_of[unsplit[j]] = "test" if rank < n_test else "train"
        if config.cap_per_class is not None:
            train = [i for i in members if split_of[i] == "train"]
            if len(train) > config.cap_per_class:
                order = np.random.default_rng([config.seed, ci, _SEED_CAP]).permutation(len(train))
                for j in order[config.cap_per_class :]:
                    split_of[train[j]] = "over_cap"
                excluded["over_cap"] += len(train) - config.cap_per_class
    return split_of


def _task_plans(
    kept: list[_Kept],
    keys: list[str],
    split_of: dict[int, str],
    resolved: list[tuple[TaskSpec, list[str]]],
    *,
    names: _ClassNames,
    config: SplitConfig,
    warnings: list[str],
) -> list[TaskPlan]:
    """Rules 8-9 for every task: order, sample indices (counted over the tasks in order), shards, retrieval."""
    by_task: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(kept):
        by_task[item.task].append(i)
    tasks = []
    index = 0
    for ti, (spec, members) in enumerate(resolved):
        in_task = by_task[ti]
        train = [i for i in in_task if split_of[i] == "train"]
        test = [i for i in in_task if split_of[i] == "test"]
        train = [train[j] for j in np.random.default_rng([config.seed, ti, _SEED_ORDER]).permutation(len(train))]
        test.sort(key=lambda i: (names.label_id[kept[i].labels[0]], keys[i]))
        jobs: dict[str, list[ClipJob]] = {}
        for split, positions in (("train", train), ("test", test)):
            jobs[split] = [
                _job(kept[i], keys[i], index + n, task=spec.name, split=split, names=names)
                for n, i in enumerate(positions)
            ]
            index += len(positions)
        tasks.append(_task_plan(spec.name, members, jobs, names=names, config=config))
        present = {j.label_names[0] for js in jobs.values() for j in js}
        empty = [c for c in members if c not in present]
        if empty:
            warnings.append(f"task {spec.name!r}: {len(empty)} classes have no clips: {', '.join(empty[:5])}")
    return tasks


def _job(item: _Kept, key: str, index: int, *, task: str, split: str, names: _ClassNames) -> ClipJob:
    clip, labels = item.clip, item.labels
    return ClipJob(
        key=key,
        index=index,
        source=clip.source,
        path=clip.path,
        start=clip.start,
        labels=tuple(names.label_id[x] for x in labels),
        label_names=tuple(labels),
        category=names.category_of.get(labels[0], "all"),
        task=task,
        split=split,
        audio_path=clip.audio_path,
    )


def _task_plan(
    name: str, members: list[str], jobs: dict[str, list[ClipJob]], *, names: _ClassNames, config: SplitConfig
) -> TaskPlan:
    """A task's shards and, per class, its test keys in the seeded order retrieval clips are taken from."""
    test_of: dict[str, list[str]] = defaultdict(list)
    for job in jobs["test"]:
        test_of[job.label_names[0]].append(job.key)
    candidates: dict[str, list[str]] = {}
    for cls in members:
        cls_test = test_of[cls]
        order = np.random.default_rng([config.seed, names.label_id[cls], _SEED_RETRIEVAL]).permutation(len(cls_test))
        candidates[cls] = [cls_test[j] for j in order]
    size = config.shard_size
    return TaskPlan(
        name=name,
        category="+".join(dict.fromkeys(names.category_of.get(c, "all") for c in members)),
        classes=members,
        shards={s: [js[k : k + size] for k in range(0, len(js), size)] for s, js in jobs.items()},
        retrieval_candidates=candidates,
    )


def _reject_record(clip: SourceClip, code: str, reason: str) -> dict[str, Any]:
    record = {"source": clip.source, "reason": reason, "code": code, "path": clip.path}
    if clip.origin:
        record["listed_in"] = clip.origin
    return record


def _unique_keys(clips: list[SourceClip]) -> list[str]:
    """Tar-safe keys from the clips' ids; a collision gets a short hash of the source appended."""
    import hashlib

    base = [sample_key(c.video_id) for c in clips]
    counts = Counter(base)
    out = []
    for clip, key in zip(clips, base, strict=True):
        if counts[key] > 1:
            digest = hashlib.sha1(f"{clip.path}|{clip.start}|{clip.audio_path}".encode()).hexdigest()[:8]
            key = f"{key}-{digest}"
        out.append(key)
    dup = [k for k, n in Counter(out).items() if n > 1]
    if dup:
        raise SplitError(f"the inputs list the same clip id twice with the same file: {dup[:3]}")
    return out
