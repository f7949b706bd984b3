"""Shared fixtures. Kernels run under Triton's interpreter when there is no GPU (set before any import)."""

from __future__ import annotations

import collections
import os
import random
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("FASTAV_NO_PROGRESS", "1")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-test` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the test models are tiny, and on a shared 2-core machine OpenMP threads competing with
    other processes make a debug-size step a hundred times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory):
    """A small synthetic dataset (3 tasks x 4 classes, 12 clips each), built once per test session."""
    from shards.synth import SynthSpec, generate

    root = tmp_path_factory.mktemp("synth")
    spec = SynthSpec(categories=3, classes_per_category=4, clips_per_class=12, shard_size=16, retrieval_per_class=2)
    manifest = generate(spec, root, workers=2, show_progress=False)
    return root, manifest, spec


# ATen ops that read a device value on the host, or need the size of a data-dependent result, and so synchronise
# a CUDA stream (bool-mask indexing reaches them through index.Tensor / index_put_).
SYNCING_OPS = frozenset(
    {"_local_scalar_dense", "item", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}
    | {"equal", "is_nonzero", "allclose", "repeat_interleave", "_assert_async"}
)


class HostReads(TorchDispatchMode):
    """Records every ATen call that would synchronise on a GPU: the CPU stand-in for
    ``torch.cuda.set_sync_debug_mode("error")``, so the no-sync rule of a step is checked in CI too."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        bool_index = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)
        if name in SYNCING_OPS or bool_index:
            self.calls[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads() -> type[HostReads]:
    """``with host_reads() as rec: ...`` then ``rec.calls``: the syncing ATen calls made inside the block."""
    return HostReads
