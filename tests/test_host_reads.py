"""The ``host_reads`` recorder (tests/conftest.py) that stands in for CUDA's sync debug mode on the CPU."""

from __future__ import annotations

import torch


def test_recorder_sees_each_kind_of_host_read(host_reads) -> None:
    x = torch.rand(10)
    with host_reads() as rec:
        x.sum().item()  # a scalar read
        x.nonzero()  # a data-dependent size
        x[x > 0.5]  # bool-mask indexing
        x[x > 0.9] = 0.0  # and assignment through a mask
        bool((x > 2).any())  # Python branching on a tensor value
    calls = set(rec.calls)
    assert {"aten._local_scalar_dense.default", "aten.nonzero.default"} <= calls
    assert any(c.startswith("aten.index.") for c in calls) and any(c.startswith("aten.index_put") for c in calls)


def test_recorder_passes_a_sync_free_computation(host_reads) -> None:
    x = torch.rand(4, 10)
    with host_reads() as rec:
        y = torch.where(x > 0.5, x, 0.0).topk(3, dim=1).indices
        torch.gather(x, 1, y).sum()
        x.masked_fill(x < 0.1, 0.0).softmax(-1)
    assert not rec.calls, dict(rec.calls)
