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
from typing import Any

import numpy as np

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
        lines.append(f"rejected while planning: {len(self.rejects)}")
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
    problems: list[InputProblem] | None = None,
    check_files: bool = True,
) -> Plan:
    """Decide tasks, splits, caps, keys, indices and shards for ``clips`` (see the module docstring)."""
    resolved = resolve_tasks(classes, class_category, config.tasks, config.classes_per_task)
    by_norm = {_norm(c): c for c in classes}
    category_of: dict[str, str] = {}
    unmatched: list[str] = []
    for c, cat in (class_category or {}).items():
        if _norm(c) in by_norm:
            category_of[by_norm[_norm(c)]] = cat
        else:
            unmatched.append(c)
    task_of = {cls: i for i, (_, members) in enumerate(resolved) for cls in members}
    selected = [cls for _, members in resolved for cls in members]
    label_id = {cls: i for i, cls in enumerate(selected)}
    plan = Plan(
        tasks=[],
        classes=selected,
        categories={},
        class_category={c: category_of.get(c, "all") for c in selected},
    )
    for cls in selected:
        plan.categories.setdefault(plan.class_category[cls], []).append(cls)
    excluded: Counter[str] = Counter()
    unknown_examples: list[str] = []
    if unmatched:
        plan.warnings.append(
            f"{len(unmatched)} classes of the category file are not in the class list (ignored): {unmatched[:5]}"
        )
    for p in problems or []:
        plan.rejects.append({"source": p.source, "reason": p.reason, "code": p.code})

    # 2-4: duplicates, labels, multi-category
    seen: set[tuple[str, float, str | None]] = set()
    kept: list[tuple[SourceClip, list[str], int]] = []  # clip, selected labels, task index
    for clip in clips:
        ident = (clip.path, clip.start, clip.audio_path)
        if ident in seen:
            excluded["duplicate"] += 1
            continue
        seen.add(ident)
        labels = [by_norm[_norm(x)] for x in clip.labels if _norm(x) in by_norm]
        if not labels:
            excluded["unknown_class"] += 1
            if len(unknown_examples) < 3:
                unknown_examples.append(f"{clip.origin or clip.source}: {', '.join(clip.labels) or '(no labels)'}")
            continue
        groups = {
            ("task", task_of[x]) if x in task_of else ("category", category_of[x])
            for x in labels
            if x in task_of or x in category_of
        }
        if config.exclude_multi_category and len(groups) > 1:
            excluded["multi_category"] += 1
            continue
        chosen = [x for x in labels if x in task_of]
        if not chosen:
            excluded["not_in_tasks"] += 1
            continue
        kept.append((clip, list(dict.fromkeys(chosen)), task_of[chosen[0]]))
    if unknown_examples:
        plan.warnings.append(
            f"{excluded['unknown_class']} clips have no label in the class list, e.g. {'; '.join(unknown_examples)}"
        )

    # 5: files that are not there
    if check_files:
        present = []
        for item in kept:
            clip = item[0]
            try:
                check_file(clip.path)
                if clip.audio_path is not None:
                    check_file(clip.audio_path)
            except ClipRejected as rej:
                plan.rejects.append(_reject_record(clip, rej.code, rej.reason))
                continue
            present.append(item)
        kept = present

    # keys: unique over the dataset
    keys = _unique_keys([clip for clip, _, _ in kept])

    # 6: test split where the input has none; 7: cap
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, (_, labels, _) in enumerate(kept):
        by_class[labels[0]].append(i)
    split_of: dict[int, str] = {}
    for cls, members in by_class.items():
        ci = label_id[cls]
        unsplit = [i for i in members if kept[i][0].split is None]
        for i in members:
            if kept[i][0].split is not None:
                split_of[i] = kept[i][0].split  # type: ignore[assignment]
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

    # 8: order, indices, shards; 9: retrieval candidates
    by_task: dict[int, list[int]] = defaultdict(list)
    for i, (_, _, ti) in enumerate(kept):
        by_task[ti].append(i)
    index = 0
    for ti, (spec, members) in enumerate(resolved):
        in_task = by_task[ti]
        train = [i for i in in_task if split_of[i] == "train"]
        test = [i for i in in_task if split_of[i] == "test"]
        train = [train[j] for j in np.random.default_rng([config.seed, ti, _SEED_ORDER]).permutation(len(train))]
        test.sort(key=lambda i: (label_id[kept[i][1][0]], keys[i]))
        jobs: dict[str, list[ClipJob]] = {}
        for split, idx in (("train", train), ("test", test)):
            jobs[split] = []
            for i in idx:
                clip, labels, _ = kept[i]
                jobs[split].append(
                    ClipJob(
                        key=keys[i],
                        index=index,
                        source=clip.source,
                        path=clip.path,
                        start=clip.start,
                        labels=tuple(label_id[x] for x in labels),
                        label_names=tuple(labels),
                        category=plan.class_category[labels[0]],
                        task=spec.name,
                        split=split,
                        audio_path=clip.audio_path,
                    )
                )
                index += 1
        test_of: dict[str, list[str]] = defaultdict(list)
        for job in jobs["test"]:
            test_of[job.label_names[0]].append(job.key)
        candidates: dict[str, list[str]] = {}
        for cls in members:
            cls_test = test_of[cls]
            order = np.random.default_rng([config.seed, label_id[cls], _SEED_RETRIEVAL]).permutation(len(cls_test))
            candidates[cls] = [cls_test[j] for j in order]
        size = config.shard_size
        plan.tasks.append(
            TaskPlan(
                name=spec.name,
                category="+".join(dict.fromkeys(plan.class_category[c] for c in members)),
                classes=members,
                shards={s: [js[k : k + size] for k in range(0, len(js), size)] for s, js in jobs.items()},
                retrieval_candidates=candidates,
            )
        )
        present = {j.label_names[0] for js in jobs.values() for j in js}
        empty = [c for c in members if c not in present]
        if empty:
            plan.warnings.append(f"task {spec.name!r}: {len(empty)} classes have no clips: {', '.join(empty[:5])}")
    plan.excluded = dict(sorted(excluded.items()))
    names = [t.name for t in plan.tasks]
    if len(set(names)) != len(names):
        raise SplitError(f"task names repeat: {names}")
    return plan


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
