"""Rejected clips as ``build`` and ``split`` report them: counts per reason code, examples naming files, exit 1.

A reject is a ``rejects.jsonl`` record: ``source``, ``reason``, ``code`` and, where known, ``path`` and
``listed_in`` (the input row that named the clip). Both commands print the same report (:func:`report_lines`)
and apply the same rule (:func:`limit_error`): when more than ``--max-reject-fraction`` of the clips considered
were rejected, they say so on stderr and exit 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

HINTS = {
    "missing": "the files are not where the inputs say; check --video-dir and --name-pattern "
    "(a pattern ending in '.*' matches any extension)",
    "empty": "the files are 0 bytes long (an interrupted download?)",
    "unreadable": "the files cannot be opened (permissions, or not a regular file)",
    "bad_input_row": "rows of an input file that name no usable clip: fix or drop them",
}
"""What to do about the common codes; the others' reasons speak for themselves."""

Reject = Mapping[str, Any]


def code_counts(rejects: Sequence[Reject], top: int = 5) -> str:
    """``'missing 360, empty 2'``: the ``top`` most frequent reason codes with their counts."""
    codes = Counter(r["code"] for r in rejects)
    return ", ".join(f"{code} {n}" for code, n in codes.most_common(top))


def report_lines(rejects: Sequence[Reject], *, top: int = 5, examples: int = 2) -> list[str]:
    """Per reason code (most frequent first): its count, a hint, and the first ``examples`` clips it hit."""
    codes = Counter(r["code"] for r in rejects)
    lines = []
    for code, n in codes.most_common(top):
        hint = HINTS.get(code)
        lines.append(f"  {code} ({n} clip{'' if n == 1 else 's'})" + (f": {hint}" if hint else ""))
        for r in [r for r in rejects if r["code"] == code][:examples]:
            where = f" ({r['listed_in']})" if r.get("listed_in") else ""
            lines.append(f"    {r['source']}{where}: {r['reason']}")
    if len(codes) > top:
        lines.append(f"  ... and {len(codes) - top} more codes")
    return lines


def limit_error(rejected: int, considered: int, max_fraction: float, *, stage: str, see: str) -> str | None:
    """The error to print when more than ``max_fraction`` of ``considered`` clips were rejected, else None."""
    fraction = rejected / considered if considered else 0.0
    if fraction <= max_fraction:
        return None
    return (
        f"{rejected} of {considered} clips ({fraction:.1%}) were rejected{stage}, more than --max-reject-fraction "
        f"{max_fraction:g}; {see} (fix the inputs, or raise --max-reject-fraction to accept them)"
    )
