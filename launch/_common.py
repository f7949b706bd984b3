"""What the launchers share: argument parsing (recipe + dotted overrides) and error reporting."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fastav.config import RECIPES, Config, ConfigError, load_config


def parse(prog: str, description: str, argv: list[str] | None, extra: Callable[[argparse.ArgumentParser], None] = None):
    """``--recipe NAME [overrides]`` (plus ``extra`` arguments); returns (args, cfg) or exits 2 on a bad config."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--recipe", default="debug", choices=sorted(RECIPES))
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the launcher
    if extra is not None:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="section.field=value (python -m fastav.config explain lists them)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        cfg.validate(require_data=cfg.data.source == "shards")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg


def fail(err: Exception) -> int:
    """Print a user-facing error on one line and return the exit status."""
    print(f"error: {err}", file=sys.stderr)
    return 2 if isinstance(err, ConfigError) else 1


def describe(cfg: Config) -> str:
    source = "synthetic clips" if cfg.data.source == "synthetic" else cfg.data_root()
    return f"recipe {cfg.recipe}, method {cfg.method.name}, data {source}"
