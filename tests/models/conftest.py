"""One intra-op thread for the tiny models here: on a shared 2-core machine, OpenMP threads competing with other
processes make a debug-size step a hundred times slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
