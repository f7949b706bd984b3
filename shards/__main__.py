"""Command line: ``python -m shards {synth,info} ...``.

Exit codes: 0 success, 2 the command itself failed (bad arguments, unreadable dataset, unwritable output).
"""

from __future__ import annotations

import argparse
import sys
import time

from shards.manifest import ManifestError, load_manifest, summary


def _synth(args: argparse.Namespace) -> int:
    from shards.synth import SynthSpec, generate

    spec = SynthSpec(
        categories=args.categories,
        classes_per_category=args.classes_per_category,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards", description="fastav shard tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate a synthetic audio-video dataset (one task per category)")
    p.add_argument("--out", required=True, help="output dataset directory (empty, new, or an earlier synth)")
    p.add_argument("--categories", type=int, default=3, help="categories = continual tasks (default 3)")
    p.add_argument("--classes-per-category", type=int, default=4)
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
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)

    p = sub.add_parser("info", help="print the summary of a dataset directory")
    p.add_argument("root")
    p.set_defaults(func=_info)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ManifestError, FileExistsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
