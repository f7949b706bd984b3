#!/usr/bin/env bash
# One call on a lent GPU machine (H100 / H200): every check and figure that needs the GPU, in about 10 minutes.
#
#   bash scripts/gpu_check.sh [WHEEL_DIR]
#
# WHEEL_DIR: the carried wheels (PyAV, DALI, DeepSpeed, webdataset, xformers, pytest, ...), unpacked into .gpu/site
# (no network, no dependency resolution: the image's torch 2.11 and triton stay); leave it out when they are
# installed already. Runs with the image's python3 ($GPU_PY to change it), from the repository root:
#
#   1. machine: GPU, driver, versions; torch must see CUDA
#   2. libnvcuvid (NVDEC) loads
#   3. the gpu-marked tests, kernels at their fixed config (FASTAV_KERNEL_TUNING=fixed)
#   4. bench/kernels.py at B = 48 (tuned configs, as a run would use them)
#   5. bench/throughput.py --data-only (the data row at base size: 4 x 224 px frames, 1024 x 128 fbank)
#   6. bench/throughput.py --rows train,e2e at base size (recipe stella_vggsound, batch 12): fastav's STELLA, DER++
#      and Finetune steps against the official STELLA step (clips/s, peak memory, MFU), then shards -> loader ->
#      STELLA step
#
# The stage limits (30 + 15 + 280 + 120 + 120 + 180 s) are each cut to what is left of $GPU_CHECK_BUDGET_S (default
# 580 s, under the 10-minute limit of one call), and a stage with less than 30 s left is skipped (exit 124); a stage
# over its limit is killed and counts as failed. Writes $GPU_CHECK_OUT (default $OUT when set, else runs/gpu-check) /gpu_check.json with every figure, and one log
# per stage beside it. Exit status 0 only when every stage passed; the JSON is written either way.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${GPU_PY:-python3}"
OUT_DIR="${GPU_CHECK_OUT:-${OUT:-$REPO/runs/gpu-check}}"
mkdir -p "$OUT_DIR"
STAGES="$OUT_DIR/stages.tsv"
: >"$STAGES"
export PYTHONUNBUFFERED=1 FASTAV_NO_PROGRESS=1

if [[ $# -ge 1 ]]; then
  WHEELS="$1"
  SITE="$REPO/.gpu/site"
  mkdir -p "$SITE"
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "gpu_check: no .whl in $WHEELS" >&2
    exit 2
  fi
  for whl in "${wheels[@]}"; do
    # a wheel is a zip laid out for site-packages; unpacking it is the install (its dependencies are the image's)
    "$PY" -m zipfile -e "$whl" "$SITE" || { echo "gpu_check: cannot unpack $whl" >&2; exit 2; }
  done
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: ${#wheels[@]} wheels unpacked into $SITE"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

BUDGET="${GPU_CHECK_BUDGET_S:-580}"

# stage NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $OUT_DIR/NAME.log, records rc and seconds; the
# limit is cut to what is left of the budget, and the stage skipped (exit 124) with less than 30 s left
stage() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 30)); then
    echo "=== $name: skipped, ${left} s of the ${BUDGET}-s budget left" | tee "$OUT_DIR/$name.log"
    printf '%s\t%s\t%s\n' "$name" 124 0 >>"$STAGES"
    return
  fi
  ((left < limit)) && limit=$left
  echo "=== $name (at most ${limit} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$STAGES"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

stage machine 30 "$PY" -c '
import json, shutil, subprocess, torch, triton
assert torch.cuda.is_available(), "torch sees no CUDA device"
query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
smi = subprocess.run(query, capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None
print(json.dumps({"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                  "nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "triton": triton.__version__}))'

if [[ "$(tail -n 1 "$STAGES" | cut -f 2)" != 0 ]]; then
  echo "gpu_check: no usable GPU here; the other stages need one" >&2
else
stage nvcuvid 15 "$PY" -c '
import ctypes, ctypes.util, json
name = "libnvcuvid.so.1"
ctypes.CDLL(name)  # raises when NVDEC is not reachable: DALI mixed video decoding then cannot work
print(json.dumps({"libnvcuvid": name, "found_by_ldconfig": ctypes.util.find_library("nvcuvid")}))'

stage gpu_tests 280 env FASTAV_KERNEL_TUNING=fixed "$PY" -m pytest -m gpu -p no:cacheprovider -q -rfEs \
  --junitxml="$OUT_DIR/gpu_tests.xml" tests

stage bench_kernels 120 "$PY" bench/kernels.py --batch 48

stage bench_data 120 "$PY" bench/throughput.py --data-only

stage bench_train 180 "$PY" bench/throughput.py --rows train,e2e --steps 10 --repeats 3
fi

"$PY" - "$OUT_DIR" <<'PYEOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])


def last_json(name):
    """The last JSON line a stage printed (every bench ends with one), or None."""
    path = out / f"{name}.log"
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


stages = {}
for row in (out / "stages.tsv").read_text().splitlines():
    name, rc, seconds = row.split("\t")
    stages[name] = {"exit": int(rc), "seconds": int(seconds), "passed": rc == "0"}
tests = None
if (out / "gpu_tests.xml").exists():
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["seconds"] = float(suite.get("time", 0))
    tests["cases"] = [
        {
            "name": f"{case.get('classname')}::{case.get('name')}",
            "seconds": float(case.get("time", 0)),
            "outcome": next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed"),
        }
        for case in suite.iter("testcase")
    ]
report = {
    "passed": all(s["passed"] for s in stages.values()),
    "stages": stages,
    "machine": last_json("machine"),
    "nvcuvid": last_json("nvcuvid"),
    "gpu_tests": tests,
    "kernels": last_json("bench_kernels"),
    "data": last_json("bench_data"),
    "train": last_json("bench_train"),
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print(f"gpu_check: wrote {out / 'gpu_check.json'}")
for name, s in stages.items():
    print(f"  {name:<14} {'ok' if s['passed'] else 'FAILED (exit %d)' % s['exit']:<18} {s['seconds']:>5} s")
if tests:
    print(f"  gpu tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
          f"{tests['skipped']} skipped")
sys.exit(0 if report["passed"] else 1)
PYEOF
