"""Command line: ``python -m shards {synth,info,build,split,verify,stats,probe} ...``.

Exit codes: 0 success, 2 the command itself failed (bad arguments, unreadable dataset, unwritable output).
``build`` exits 1 when more than ``--max-reject-fraction`` of its clips were rejected (the dataset is still
written), and ``split`` on the same condition for the clips rejected while planning (missing and empty files,
unreadable input rows); both print the count of each reason code with example files. ``verify`` exits 1 when
it finds problems; ``probe`` exits 1 when a file would be rejected.

``split`` takes every option ``build`` takes, so a build command line with ``build`` replaced by ``split`` is its
dry run: the encoding options are checked but nothing is encoded; ``--out`` and the run options other than
``--max-reject-fraction`` are ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from shards.manifest import ManifestError, load_manifest, summary
from shards.rejects import limit_error, report_lines

if TYPE_CHECKING:
    from shards.build import InputOptions
    from shards.split import Plan, SplitConfig, TaskSpec
    from shards.transcode import ClipParams

Commands = argparse._SubParsersAction
"""What ``ArgumentParser.add_subparsers`` returns: each ``_add_<command>`` adds its command to it."""


def _synth(args: argparse.Namespace) -> int:
    from shards.synth import SynthSpec, generate

    spec = SynthSpec(
        categories=args.categories,
        classes_per_category=args.classes_per_category,
        pretrain_classes_per_category=args.pretrain_classes_per_category,
        clips_per_class=args.clips_per_class,
        seed=args.seed,
        size=args.size,
        fps=args.fps,
        duration=args.duration,
        test_fraction=args.test_fraction,
        retrieval_per_class=args.retrieval_per_class,
        shard_size=args.shard_size,
        keyframe_interval=args.keyframe_interval,
        codec=args.codec,
        audio_format=args.audio_format,
    )
    start = time.monotonic()
    manifest = generate(spec, args.out, workers=args.workers, show_progress=not args.quiet)
    elapsed = time.monotonic() - start
    clips = manifest["counts"]["train"] + manifest["counts"]["test"]
    print(summary(manifest))
    print(f"\nwrote {args.out} ({clips} clips) in {elapsed:.1f} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    print(summary(load_manifest(args.root)))
    return 0


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    """The options of ``build`` that decide the plan: where the clips come from, and how they split into tasks."""
    _add_source_args(p)
    _add_split_args(p)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs")
    _add_input_files(g)
    _add_input_reading(g)


def _add_input_files(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="a folder of videos (class = first sub-folder), a .txt list of paths, a VGGSound .csv "
        "(youtube_id,start_seconds,label,split) or a CAV-MAE .json datafile; repeatable",
    )
    g.add_argument(
        "--test-input",
        action="append",
        default=[],
        metavar="PATH",
        help="an input whose clips all go to the test split (e.g. AudioSet's eval datafile); repeatable",
    )
    g.add_argument(
        "--video-dir",
        help="folder of the videos a .csv/.json input names (default: the .csv's folder; "
        "for .json the entry's video_path)",
    )
    g.add_argument(
        "--name-pattern",
        help="file name of a row's video: default '{youtube_id}_{start:06d}.mp4' (.csv), "
        "'{video_id}.mp4' (.json); ending in '.*' matches any extension",
    )
    g.add_argument(
        "--class-index",
        help="class index CSV (index,mid,display_name): the class order, and the names "
        "of AudioSet ids; default: the category file's order, else sorted labels",
    )
    g.add_argument(
        "--categories",
        help="class -> category file (.csv rows 'class,category', or .json "
        "{category: [classes]}); one continual task per category",
    )


def _add_input_reading(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--audio-from",
        choices=["video", "wav"],
        default="video",
        help="audio from the video file (default) or from a .json entry's 'wav' file",
    )
    g.add_argument(
        "--csv-start",
        choices=["ignore", "seek"],
        default="ignore",
        help="ignore (default): .csv files are already cut to the clip; seek: the segment starts at "
        "start_seconds inside the file",
    )
    g.add_argument("--start", type=float, default=0.0, help="seconds into each file where the segment starts")
    g.add_argument("--extensions", default=None, help="comma-separated video extensions of a folder input")


def _add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("continual split")
    g.add_argument(
        "--preset",
        choices=["stella-vggsound", "stella-audioset"],
        help="stella-vggsound (8 tasks x 20 classes, <= 400 train clips per class) or "
        "stella-audioset (7 tasks, multi-category clips excluded); needs --categories",
    )
    g.add_argument(
        "--tasks",
        help="tasks in order: 'cat1,cat2' (one task per category) or 'name=cat1+cat2,...' "
        "(default: every category in category-file order)",
    )
    g.add_argument(
        "--classes-per-task", type=int, default=None, help="keep the first N classes (class-list order) of every task"
    )
    g.add_argument("--cap-per-class", type=int, default=None, help="at most N train clips per class (seeded)")
    g.add_argument(
        "--exclude-multi-category",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="drop clips whose labels span more than one category (AudioSet protocol)",
    )
    g.add_argument(
        "--retrieval-per-class",
        type=int,
        default=None,
        help="test clips per class copied into the retrieval split (default 5)",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="per class, the share of clips without a split in the input that go to test (default 0.2)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--shard-size", type=int, default=256, help="samples per shard (default 256)")


def _add_encoding_args(p: argparse.ArgumentParser, title: str = "clip encoding") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--fps", type=int, default=8, help="video frame rate (default 8)")
    g.add_argument("--size", type=int, default=256, help="square frame side after short-side resize + centre crop")
    g.add_argument("--codec", choices=["vp9", "h264"], default="vp9", help="vp9 (DALI CPU+GPU) or h264 (GPU only)")
    g.add_argument("--keyframe-interval", type=int, default=8, help="frames between keyframes (default 8)")
    g.add_argument("--crf", type=int, default=32, help="constant quality (lower is better; default 32)")
    g.add_argument("--speed", type=int, default=8, help="encoder speed 0-8 (8 fastest; default 8)")
    g.add_argument("--duration", type=float, default=10.0, help="seconds per clip (default 10)")
    g.add_argument(
        "--min-duration",
        type=float,
        default=None,
        help="reject clips whose video or audio covers less (default: half of --duration)",
    )
    g.add_argument(
        "--short-clips",
        choices=["pad", "keep"],
        default="pad",
        help="clips shorter than --duration: pad (hold the last frame, silence) or keep their length",
    )
    g.add_argument(
        "--channel-rule",
        choices=["first", "mean"],
        default="first",
        help="mono from the first channel (CAV-MAE) or the mean of all channels",
    )
    g.add_argument("--sample-rate", type=int, default=16000, help="audio sample rate (default 16000)")
    g.add_argument(
        "--audio-format",
        choices=["flac", "wav"],
        default="flac",
        help="16-bit FLAC (default, a third of the size) or WAV (cheaper to decode; see bench/throughput.py --audio)",
    )


def _input_options(args: argparse.Namespace) -> InputOptions:
    from shards.build import InputOptions
    from shards.sources import VIDEO_EXTENSIONS

    exts = (
        VIDEO_EXTENSIONS
        if not args.extensions
        else tuple(
            e.strip() if e.strip().startswith(".") else f".{e.strip()}" for e in args.extensions.split(",") if e.strip()
        )
    )
    return InputOptions(
        inputs=tuple(args.input),
        test_inputs=tuple(args.test_input),
        video_dir=args.video_dir,
        name_pattern=args.name_pattern,
        class_index=args.class_index,
        categories=args.categories,
        audio_from=args.audio_from,
        csv_start=args.csv_start,
        start=args.start,
        extensions=exts,
    )


def _parse_tasks(text: str) -> tuple[TaskSpec, ...]:
    from shards.split import TaskSpec

    tasks = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, eq, cats = item.partition("=")
        categories = tuple(c.strip() for c in (cats if eq else name).split("+") if c.strip())
        tasks.append(TaskSpec(name.strip(), categories))
    return tuple(tasks)


def _split_config(args: argparse.Namespace) -> SplitConfig:
    from dataclasses import replace

    from shards.presets import get_preset
    from shards.split import SplitConfig

    common = {"test_fraction": args.test_fraction, "seed": args.seed, "shard_size": args.shard_size}
    overrides = {
        "cap_per_class": args.cap_per_class,
        "exclude_multi_category": args.exclude_multi_category,
        "retrieval_per_class": args.retrieval_per_class,
    }
    if args.preset:
        if args.tasks:
            raise ValueError("--preset and --tasks exclude each other: the preset fixes the tasks")
        if not args.categories:
            raise ValueError(f"--preset {args.preset} needs --categories (your class -> category file)")
        config = get_preset(args.preset).split_config(**overrides, **common)
    else:
        values = {k: v for k, v in overrides.items() if v is not None}
        config = SplitConfig(tasks=_parse_tasks(args.tasks) if args.tasks else None, **values, **common)
    if args.classes_per_task is not None:
        config = replace(config, classes_per_task=args.classes_per_task)
    return config


def _clip_params(args: argparse.Namespace) -> ClipParams:
    from shards.transcode import ClipParams

    return ClipParams(
        fps=args.fps,
        size=args.size,
        codec=args.codec,
        keyframe_interval=args.keyframe_interval,
        crf=args.crf,
        speed=args.speed,
        duration=args.duration,
        min_duration=args.min_duration,
        short_clips=args.short_clips,
        sample_rate=args.sample_rate,
        channel_rule=args.channel_rule,
        audio_format=args.audio_format,
    )


def _build(args: argparse.Namespace) -> int:
    from shards.build import build_dataset, make_plan

    _check_max_reject_fraction(args)
    params = _clip_params(args)
    config = _split_config(args)
    opts = _input_options(args)
    plan, inputs = make_plan(opts, config)
    extra = {
        "build": {
            "inputs": inputs.descriptions,
            "preset": args.preset,
            "input_options": {"csv_start": opts.csv_start, "start": opts.start, "audio_from": opts.audio_from},
        }
    }
    report = build_dataset(
        plan,
        params,
        args.out,
        config=config,
        workers=args.workers,
        show_progress=not args.quiet,
        extra=extra,
        clip_timeout=args.clip_timeout or None,
    )
    print(summary(report.manifest))
    for warning in report.warnings:
        print(f"warning: {warning}")
    rate = report.processed / report.seconds if report.seconds > 0 else 0.0
    print(
        f"\nwrote {report.out}: {report.written} clips, {report.built_shards} shards built, {report.skipped_shards} "
        f"already complete; {report.processed} clips processed in {report.seconds:.1f} s ({rate:.2f} clips/s); "
        f"{len(report.rejects)} rejected"
        + (f" ({report.reject_summary()}), see rejects.jsonl" if report.rejects else "")
    )
    _print_rejects(report.rejects)
    see = f"the reasons are in {report.out / 'rejects.jsonl'}"
    return _reject_verdict(len(report.rejects), report.considered, args.max_reject_fraction, stage="", see=see)


def _split(args: argparse.Namespace) -> int:
    from shards.build import make_plan

    _check_max_reject_fraction(args)
    _clip_params(args)  # checked as build checks them, so that the dry run catches a bad build command line
    config = _split_config(args)
    plan, inputs = make_plan(_input_options(args), config)
    print("\n".join(inputs.descriptions))
    print(plan.summary(config.retrieval_per_class))
    _print_rejects(plan.rejects)
    see = "the reasons are above"
    if args.write:
        _write_plan(args.write, plan, config)
        print(f"wrote the plan to {args.write}")
        see += f" and under 'rejects' in {args.write}"
    considered = len(plan.jobs("train")) + len(plan.jobs("test")) + len(plan.rejects)
    return _reject_verdict(len(plan.rejects), considered, args.max_reject_fraction, stage=" while planning", see=see)


def _check_max_reject_fraction(args: argparse.Namespace) -> None:
    if not 0.0 <= args.max_reject_fraction <= 1.0:
        raise ValueError(f"--max-reject-fraction {args.max_reject_fraction}: must be in [0, 1]")


def _print_rejects(rejects: list[dict[str, Any]]) -> None:
    if rejects:
        print("rejected, by reason:")
        print("\n".join(report_lines(rejects)))


def _reject_verdict(rejected: int, considered: int, max_fraction: float, *, stage: str, see: str) -> int:
    """1 (after saying why on stderr) when too many clips were rejected, else 0."""
    error = limit_error(rejected, considered, max_fraction, stage=stage, see=see)
    if error is None:
        return 0
    print(f"error: {error}", file=sys.stderr)
    return 1


def _write_plan(path: str, plan: Plan, config: SplitConfig) -> None:
    doc = {
        "classes": plan.classes,
        "categories": plan.categories,
        "split": config.describe(),
        "excluded": plan.excluded,
        "rejects": plan.rejects,
        "tasks": [
            {
                "name": t.name,
                "category": t.category,
                "classes": t.classes,
                **{
                    s: [
                        {"key": j.key, "source": j.source, "labels": list(j.label_names)}
                        for shard in t.shards[s]
                        for j in shard
                    ]
                    for s in ("train", "test")
                },
                "retrieval_candidates": t.retrieval_candidates,
            }
            for t in plan.tasks
        ],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def _verify(args: argparse.Namespace) -> int:
    from shards.verify import verify_dataset

    report = verify_dataset(args.root, decode=not args.no_decode, workers=args.workers, show_progress=not args.quiet)
    print(report.format(verbose=args.verbose))
    return 0 if report.ok else 1


def _stats(args: argparse.Namespace) -> int:
    from shards.verify import dataset_stats, format_stats

    stats = dataset_stats(args.root)
    if args.json:
        print(json.dumps(stats, indent=1))
    else:
        print(summary(load_manifest(args.root)))
        print()
        print(format_stats(stats))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from shards.transcode import describe

    params = _clip_params(args)
    bad = 0
    for path in args.files:
        line = describe(path, params)
        bad += ": REJECT (" in line
        print(line)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="fastav shard tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_info, _add_build, _add_split, _add_verify, _add_stats, _add_probe):
        add(sub)
    return _run(parser.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    from shards.build import BuildError
    from shards.sources import InputError

    try:
        return args.func(args)
    except (ManifestError, FileExistsError, ValueError, OSError, BuildError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not a user error: show where, still exit 2
        traceback.print_exc()
        print(f"error: {args.command} failed unexpectedly: {err!r}", file=sys.stderr)
        return 2


def _add_synth(sub: Commands) -> None:
    p = sub.add_parser("synth", help="generate a synthetic audio-video dataset (one task per category)")
    p.add_argument("--out", required=True, help="output dataset directory (empty, new, or an earlier synth)")
    p.add_argument("--categories", type=int, default=3, help="categories = continual tasks (default 3)")
    p.add_argument("--classes-per-category", type=int, default=4)
    p.add_argument(
        "--pretrain-classes-per-category",
        type=int,
        default=0,
        metavar="K",
        help="K more classes per category, in no continual task: together they make one last task 'pretrain' "
        "(manifest role 'pretrain') to pre-train on before the continual tasks (default 0: none)",
    )
    p.add_argument("--clips-per-class", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96, help="frame side in pixels (even; default 96)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--duration", type=float, default=4.0, help="clip length in seconds (default 4)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--retrieval-per-class", type=int, default=2, help="test clips per class also in 'retrieval'")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    p.add_argument("--keyframe-interval", type=int, default=8)
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9", help="h264 decodes only on a GPU")
    p.add_argument("--audio-format", choices=["flac", "wav"], default="flac", help="16-bit FLAC (default) or WAV")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)


def _add_info(sub: Commands) -> None:
    p = sub.add_parser("info", help="print the summary of a dataset directory")
    p.add_argument("root")
    p.set_defaults(func=_info)


def _add_build(sub: Commands) -> None:
    p = sub.add_parser("build", help="build shards from real videos (folder, list, VGGSound CSV, CAV-MAE JSON)")
    p.add_argument("--out", required=True, help="dataset directory (new, empty, or an earlier build to resume)")
    _add_plan_args(p)
    _add_encoding_args(p)
    _add_run_args(p)
    p.set_defaults(func=_build)


def _add_split(sub: Commands) -> None:
    p = sub.add_parser(
        "split",
        help="print (and --write) the continual split a build with the same options would make; encodes nothing, "
        "exits 1 on too many rejects as build does",
    )
    p.add_argument("--out", help="ignored (accepted so that a build command line works unchanged)")
    p.add_argument("--write", metavar="PLAN.json", help="write the plan (tasks, splits, keys, rejects) as JSON")
    _add_plan_args(p)
    _add_encoding_args(p, title="clip encoding (checked as build checks it; split encodes nothing)")
    _add_run_args(p, title="run (split uses only --max-reject-fraction)")
    p.set_defaults(func=_split)


def _add_run_args(p: argparse.ArgumentParser, title: str = "run") -> None:
    g = p.add_argument_group(title)
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="clip processes (default: all cores; 0: in this process, no crash isolation)",
    )
    g.add_argument(
        "--clip-timeout",
        type=float,
        default=300.0,
        help="seconds a clip may take in its worker before it is rejected as hung (default 300; 0: no limit)",
    )
    g.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.05,
        help="exit 1 when more of the clips than this are rejected (default 0.05)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_verify(sub: Commands) -> None:
    p = sub.add_parser("verify", help="re-read every shard: tar, index, members, manifest counts; exit 1 on problems")
    p.add_argument("root")
    p.add_argument("--no-decode", action="store_true", help="skip decoding the members (structure and index only)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="list good shards too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_verify)


def _add_stats(sub: Commands) -> None:
    p = sub.add_parser("stats", help="counts, hours, padding, sizes, rejects of a dataset")
    p.add_argument("root")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_stats)


def _add_probe(sub: Commands) -> None:
    p = sub.add_parser("probe", help="show what files hold and whether 'build' would take them (exit 1 if not)")
    p.add_argument("files", nargs="+")
    _add_encoding_args(p)
    p.set_defaults(func=_probe)


if __name__ == "__main__":
    raise SystemExit(main())
