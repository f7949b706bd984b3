"""The backend switch, the automatic fallback to the references, and the rng helpers."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import kernels
from kernels import _utils

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def test_set_and_use_backend():
    before = kernels.get_backend()
    with kernels.use_backend("ref"):
        assert kernels.get_backend() == "ref"
        with pytest.raises(RuntimeError), kernels.use_backend("triton"):
            assert kernels.get_backend() == "triton"
            raise RuntimeError("inside")
        assert kernels.get_backend() == "ref"  # restored after an exception
    assert kernels.get_backend() == before
    with pytest.raises(ValueError, match="'cuda'"):
        kernels.set_backend("cuda")


def test_dispatch_decision_without_interpreter():
    """A compiled (not interpreted) kernel cannot take CPU tensors: "auto" falls back, "triton" refuses."""
    compiled_kernel = object()  # anything that is not an InterpretedFunction
    cpu = torch.zeros(2)
    assert not _utils.triton_can_run([cpu], interpreted=False)
    assert _utils.triton_can_run([cpu], interpreted=True)
    with kernels.use_backend("auto"):
        assert not _utils.use_triton(compiled_kernel, cpu)
    with kernels.use_backend("ref"):
        assert not _utils.use_triton(compiled_kernel, cpu)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match=r"\['cpu'\]"):
        _utils.use_triton(compiled_kernel, cpu)


def test_auto_falls_back_to_references_on_cpu_without_interpreter(monkeypatch):
    """Simulate CPU tensors without TRITON_INTERPRET: every public op runs its reference, none launches Triton."""
    monkeypatch.setattr(_utils, "is_interpreted", lambda kernel: False)
    modules = ["attention_importance", "replay_correlation", "weighted_sample", "chunk_select", "patch_gather"]
    for name in modules:
        mod = importlib.import_module(f"kernels.{name}")
        for attr in dir(mod):
            if attr.endswith("_triton"):
                monkeypatch.setattr(mod, attr, _refuse(f"{name}.{attr}"))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 32, 16, generator=gen), torch.randn(2, 3, 64, 16, generator=gen)
    rng = kernels.new_rng(0)
    with kernels.use_backend("auto"):
        imp = kernels.attention_importance(q, k, 0.25, 0.4)
        assert torch.equal(imp, kernels.attention_importance_ref(q, k, 0.25, 0.4))
        cand = kernels.topk_mask(imp, 32)
        qbar = kernels.pooled_query(q, torch.rand(2, 32, generator=gen), cand[:, :32])
        pi = kernels.replay_correlation(torch.randn(2, 3, 16), qbar, k, 0.25, cand)
        ids_v = kernels.select_video(imp, pi, 32, rng)
        ids_a = kernels.select_audio(imp, pi, 32, rng, chunk_times=2, freq_patches=4)
        assert ids_v.shape == ids_a.shape == (2, 32)
        patches = kernels.gather_audio_patches(torch.randn(2, 256, 64), ids_a)  # 16 x 4 patches
        assert patches.shape == (2, 32, 256)


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} launched although Triton cannot run here")

    return refuse


def test_rng_helpers():
    rng = kernels.new_rng(5, offset=3)
    assert rng.dtype == torch.int64 and rng.tolist() == [5, 3]
    assert kernels.advance_rng(rng, 4) is rng and rng.tolist() == [5, 7]
    with pytest.raises(ValueError, match="seed -1"):
        kernels.new_rng(-1)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        kernels.advance_rng(torch.zeros(3, dtype=torch.int64))

    def draw(r: torch.Tensor, stream: int) -> torch.Tensor:
        return kernels.philox_uniform_ref(r, torch.arange(4), stream)[0]

    assert torch.equal(draw(rng, 0), draw(rng, 0))
    assert not torch.equal(draw(rng, 0), draw(rng, 1))
    assert not torch.equal(draw(rng, 0), draw(kernels.new_rng(5, offset=8), 0))
    assert _utils.stream_id(3, 2) == 50
    with pytest.raises(ValueError, match="stream"):
        _utils.stream_id(-1, 0)


def test_a_bad_backend_name_is_reported_where_it_is_used_not_at_import() -> None:
    """FASTAV_KERNELS is read when a backend is first needed; a run sets the backend from model.kernels, which the
    configuration validates."""
    import subprocess
    import sys

    from fastav.config import ConfigError, load_config

    code = (
        "import kernels\n"
        "try:\n    kernels.get_backend()\nexcept ValueError as err:\n    print('refused:', err)\n"
        "kernels.set_backend('ref'); print('set:', kernels.get_backend())\n"
    )
    env = {**os.environ, "FASTAV_KERNELS": "fast"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: FASTAV_KERNELS='fast': expected one of auto, triton, ref" in done.stdout
    assert "set: ref" in done.stdout
    with pytest.raises(ConfigError, match="model.kernels: 'fast' is not accepted; choose one of auto, triton, ref"):
        load_config("debug", ["model.kernels=fast"])
