"""Named continual-split recipes: STELLA's VGGSound 8-task and AudioSet 7-task protocols.

A preset fixes the task order, the classes per task, the per-class cap, the multi-category rule and the
retrieval size; the user supplies the class -> category file (and the class index whose order "first 20 in
label-file order" refers to). Category names are matched case-insensitively, ignoring '_'/'-'/spaces and a
plural 's' (``animal`` matches ``animals``). Source: the continual-learning task splits of the STELLA
paper (Lee et al., ICML 2024) and its released code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shards.split import SplitConfig, TaskSpec

STELLA_OTHERS_PART1 = (
    "fireworks banging",
    "slot machine",
    "machine gun shooting",
    "civil defense siren",
    "missile launch",
    "cap gun shooting",
    "printer printing",
    "lathe spinning",
)
"""The 8 VGGSound 'others' classes STELLA moves into task 7 next to the tools category."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    cap_per_class: int | None
    exclude_multi_category: bool
    retrieval_per_class: int
    expected_classes: dict[str, int] = field(default_factory=dict)
    """Classes per task in the paper; a different count is reported as a warning, not an error."""

    def split_config(self, **overrides: object) -> SplitConfig:
        """The preset's SplitConfig; ``overrides`` that are not None replace the preset's values."""
        values: dict[str, object] = {
            "tasks": self.tasks,
            "cap_per_class": self.cap_per_class,
            "exclude_multi_category": self.exclude_multi_category,
            "retrieval_per_class": self.retrieval_per_class,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SplitConfig(**values)  # type: ignore[arg-type]


PRESETS: dict[str, Preset] = {
    "stella-vggsound": Preset(
        name="stella-vggsound",
        description="STELLA VGGSound: 8 tasks x 20 classes (first 20 in label-file order), <= 400 train clips "
        "per class, all test clips, 5 retrieval clips per class",
        tasks=(
            TaskSpec("sports", ("sports",), max_classes=20),
            TaskSpec("music", ("music",), max_classes=20),
            TaskSpec("vehicle", ("vehicle",), max_classes=20),
            TaskSpec("people", ("people",), max_classes=20),
            TaskSpec("animals", ("animals",), max_classes=20),
            TaskSpec("home_nature", ("home", "nature"), max_classes=20),
            TaskSpec("others_part1", ("tools",), classes=STELLA_OTHERS_PART1, max_classes=20),
            TaskSpec("others_part2", ("others",), max_classes=20),
        ),
        cap_per_class=400,
        exclude_multi_category=False,
        retrieval_per_class=5,
        expected_classes={
            t: 20
            for t in ("sports", "music", "vehicle", "people", "animals", "home_nature", "others_part1", "others_part2")
        },
    ),
    "stella-audioset": Preset(
        name="stella-audioset",
        description="STELLA AudioSet: 7 tasks (161 classes), clips whose labels span categories excluded, "
        "5 retrieval clips per class",
        tasks=tuple(
            TaskSpec(name, (name,)) for name in ("human", "vehicle", "nature", "animal", "others", "home", "music")
        ),
        cap_per_class=None,
        exclude_multi_category=True,
        retrieval_per_class=5,
        expected_classes={
            "human": 35,
            "vehicle": 14,
            "nature": 9,
            "animal": 27,
            "others": 34,
            "home": 18,
            "music": 24,
        },
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}") from None
