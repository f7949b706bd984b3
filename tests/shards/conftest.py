"""Real source media for the shard-builder tests, written once per session with PyAV (small: 64-96 px, 2 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
from media_cases import write_all


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def media_folder(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    """A folder input: good and bad files spread over the classes ``alpha`` and ``beta``."""
    root = tmp_path_factory.mktemp("folder")
    for i, (name, path) in enumerate(sorted(media.items())):
        target = root / ("alpha" if i % 2 == 0 else "beta") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return root
