"""Shared fixtures. Kernels run under Triton's interpreter when there is no GPU (set before any import)."""

from __future__ import annotations

import ast
import collections
import importlib.util
import os
import random
import traceback
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------------------------
# The step's device code on fake CUDA tensors: blocking host <-> device copies and syncing calls, with their place
# ---------------------------------------------------------------------------------------------------------------

_REPO = Path(__file__).resolve().parents[1]
_LIBRARY = tuple(str(_REPO / d) + os.sep for d in ("fastav", "kernels", "shards"))


def _caller() -> str:
    """file:line of the innermost fastav / kernels / shards frame on the stack (else the innermost test frame)."""
    frames = traceback.extract_stack()[:-2]
    for frame in reversed(frames):
        if frame.filename.startswith(_LIBRARY):
            return f"{os.path.relpath(frame.filename, _REPO)}:{frame.lineno}"
    for frame in reversed(frames):
        if frame.filename.startswith(str(_REPO / "tests")) and frame.filename != __file__:
            return f"{os.path.relpath(frame.filename, _REPO)}:{frame.lineno}"
    return "?"


def _transfer(name: str, args: tuple, kwargs: dict) -> str | None:
    """'host-to-device copy' / 'device-to-host copy' when this ATen call moves data between the host and a device."""
    if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
        src, dst = args[0].device, torch.device(kwargs.get("device") or args[0].device)
    elif name == "copy_" and len(args) > 1 and all(isinstance(a, torch.Tensor) for a in args[:2]):
        src, dst = args[1].device, args[0].device
    elif name in ("_copy_from", "_copy_from_and_resize") and len(args) > 1:
        src, dst = args[0].device, args[1].device
    else:
        return None
    if src.type == dst.type or "cpu" not in (src.type, dst.type) or "meta" in (src.type, dst.type):
        return None
    return "host-to-device copy" if src.type == "cpu" else "device-to-host copy"


def _host_operand(args: tuple) -> bool:
    """A host tensor (not a 0-dim scalar) among the operands of an op on device tensors: ATen copies it over
    inside the op (e.g. CPU indices of a CUDA tensor), a copy no dispatch mode sees as such."""
    flat = [t for a in args for t in (a if isinstance(a, list | tuple) else (a,)) if isinstance(t, torch.Tensor)]
    on_device = any(t.device.type not in ("cpu", "meta") for t in flat)
    return on_device and any(t.device.type == "cpu" and t.dim() > 0 for t in flat)


class DeviceSyncs(HostReads):
    """``HostReads`` plus every copy between the host and a device, each with the file:line that made it.

    Used over fake CUDA tensors (``fake_cuda``): the ATen calls of a step run on shapes only, on a machine without a
    GPU, and every call that would make the host wait for the device (a read of a device value, a data-dependent
    size, a copy to or from the host, a host tensor among a device op's operands) is listed in ``where`` as
    {"kind: aten op": Counter({"file:line": n})}. A
    copy to the device of constant host data (a table built on the CPU each batch) is the typical find: on a GPU it
    blocks the host and fails under ``torch.cuda.set_sync_debug_mode("error")``. A read of a device value cannot run
    on fake tensors at all: it is recorded, then raises (the record names the line).
    """

    def __init__(self) -> None:
        super().__init__()
        self.where: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        before = sum(self.calls.values())
        kind = _transfer(func.overloadpacket.__name__, args, kwargs)
        if kind is None and _host_operand(args):
            kind = "host tensor copied into a device op"
        if kind is not None:
            self.calls[str(func)] += 1
            self.where[f"{kind}: {func}"][_caller()] += 1
            return func(*args, **kwargs)
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        except Exception as exc:
            if sum(self.calls.values()) > before:  # a read of a device value, which fake tensors cannot give
                place = _caller()
                self.where[f"host read: {func}"][place] += 1
                raise AssertionError(f"host read: {func} at {place} (needs a device value)") from exc
            raise
        if sum(self.calls.values()) > before:
            self.where[f"host read: {func}"][_caller()] += 1
        return out

    def report(self) -> str:
        return "; ".join(f"{what} at {dict(places)}" for what, places in self.where.items())


@pytest.fixture
def device_syncs() -> type[DeviceSyncs]:
    """``with device_syncs() as rec: ...`` then ``rec.where`` / ``rec.report()`` (see ``DeviceSyncs``)."""
    return DeviceSyncs


FAKE_ACCELERATOR = "fakegpu"


def register_fake_accelerator() -> str:
    """Register a device type that stands in for CUDA where the autograd engine needs a device (its CUDA guard asks
    the driver about every device it touches, so a backward pass over fake "cuda" tensors fails without a GPU):
    PyTorch's PrivateUse1 slot as a Python backend with dummy guard and hooks. Use it with ``fake_cuda()``; no data
    ever exists on it. Process-wide and permanent (``torch.accelerator`` then names it), so call it in a
    subprocess, never in the test session."""
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    if torch._C._get_privateuse1_backend_name() != FAKE_ACCELERATOR:
        _setup_privateuseone_for_python_backend(FAKE_ACCELERATOR)
    return FAKE_ACCELERATOR


@pytest.fixture
def fake_cuda() -> Any:
    """``with fake_cuda(): ...``: tensors made inside are fake, and may live on "cuda" without a GPU (shapes, dtypes
    and devices propagate through ATen's meta functions; no data exists). Host tensors made before stay usable."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return lambda: FakeTensorMode(allow_non_fake_inputs=True)


# ---------------------------------------------------------------------------------------------------------------
# Collection on a machine that lacks optional packages (the GPU image: `make gpu-test` before wheels are installed)
# ---------------------------------------------------------------------------------------------------------------

GPU_IMAGE_LACKS = ("av", "nvidia.dali", "deepspeed", "webdataset", "xformers")
"""Packages the lent GPU machines' image does not have (they come from carried wheels)."""

_STEPPED_AROUND: dict[str, list[str]] = {}


@pytest.fixture
def gpu_image_lacks() -> tuple[str, ...]:
    return GPU_IMAGE_LACKS


def _lacking(name: str) -> str | None:
    """The optional package ``name`` belongs to, when this machine cannot import it."""
    for pkg in GPU_IMAGE_LACKS:
        if name == pkg or name.startswith(pkg + "."):
            try:
                found = importlib.util.find_spec(pkg) is not None
            except (ImportError, ValueError):
                found = False
            return None if found else pkg
    return None


def _local_module(name: str, near: Path) -> list[Path]:
    """The repository files importing ``name`` executes (package __init__ files included), [] if not ours."""
    parts = name.split(".")
    for base in (near, _REPO):
        files = []
        for i in range(1, len(parts) + 1):
            p = base.joinpath(*parts[:i])
            if (p / "__init__.py").is_file():
                files.append(p / "__init__.py")
            elif i == len(parts) and p.with_suffix(".py").is_file():
                files.append(p.with_suffix(".py"))
            else:
                break
        if len(files) == len(parts):
            return files
    return []


def _missing_at_import(path: Path, seen: set[Path]) -> set[str]:
    """Optional packages that importing ``path`` needs (module-level imports, followed through repository modules)
    and this machine lacks."""
    missing: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            local = _local_module(name, path.parent)
            for file in local:
                if file not in seen:
                    seen.add(file)
                    missing |= _missing_at_import(file, seen)
            if not local and (pkg := _lacking(name)):
                missing.add(pkg)
    return missing


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In a marker-selected run (``-m gpu``), leave out test modules and directories that cannot be imported here
    for want of an optional package, unless they hold a gpu test: `make gpu-test` on the GPU image then collects
    every GPU test instead of stopping at collection errors. A full run still fails loudly on a missing package."""
    if not config.option.markexpr:
        return None
    if collection_path.is_dir():
        target, sources = collection_path / "conftest.py", list(collection_path.rglob("*.py"))
    elif collection_path.name.startswith("test_") and collection_path.suffix == ".py":
        target, sources = collection_path, [collection_path]
    else:
        return None
    if not target.is_file():
        return None
    missing = _missing_at_import(target, set())
    if not missing or any("mark.gpu" in source.read_text() for source in sources):
        return None
    _STEPPED_AROUND[os.path.relpath(collection_path, _REPO)] = sorted(missing)
    return True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for path, missing in sorted(_STEPPED_AROUND.items()):
        terminalreporter.write_line(f"not collected (needs {', '.join(missing)}, missing here; no gpu test): {path}")
