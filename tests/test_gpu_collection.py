"""`make gpu-test` collects every GPU test on the lent machines' image, which lacks packages fastav's CPU suite has
(PyAV, DALI, DeepSpeed, webdataset, xformers come from carried wheels, installed or not).

A collection dry run of ``pytest -m gpu`` in a subprocess where those packages cannot be imported (a meta-path
finder installed by ``sitecustomize``) must list the same GPU tests as the same dry run with everything installed,
with no collection error: a GPU test module that imports PyAV at load time, say, fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent(
    """
    import sys

    LACKING = {lacking!r}


    class _Lacking:
        def find_spec(self, name, path=None, target=None):
            if any(name == pkg or name.startswith(pkg + ".") for pkg in LACKING):
                raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)", name=name)
            return None


    sys.meta_path.insert(0, _Lacking())
    """
)


def _collect_gpu_tests(extra_path: Path | None) -> tuple[set[str], str]:
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path, ROOT) if p] + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--co", "-q", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    assert not re.search(r"\berrors?\b", out.splitlines()[-1]), out[-4000:]
    return {line for line in proc.stdout.splitlines() if "::" in line}, out


def test_gpu_tests_collect_without_the_packages_the_gpu_image_lacks(tmp_path, gpu_image_lacks) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(lacking=gpu_image_lacks))
    lacking, out = _collect_gpu_tests(tmp_path)
    assert "not on the GPU image" in out or "not collected (needs" in out, "the blocker did not take effect"
    everything, _ = _collect_gpu_tests(None)
    assert everything, "no gpu-marked test at all"
    assert lacking == everything, f"lost on the GPU image: {sorted(everything - lacking)}"
