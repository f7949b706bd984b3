#!/usr/bin/env bash
# `make demo`: the main job on its built-in default, a small continual audio-video pre-training on generated data.
#
#   1. a synthetic dataset (3 categories = 3 continual tasks, plus pre-training classes no task uses), if missing;
#   2. a short pre-training from a random start on the pre-training classes (recipe demo_pretrain), the start of
#      every method, and (when STELLA is among the methods) its AVM stage on the same classes;
#   3. the continual run of each method of $METHODS (recipe demo) from those weights, each printing its retrieval
#      matrices, Average and Forgetting, and writing report.json / report.md / plots in $DEMO_DIR/<method>;
#   4. the methods side by side (python -m fastav.eval compare).
#
# Every step goes through the `deepspeed` launcher ($PROCS processes: the GPUs when there are some, else 2 CPU
# processes on DeepSpeed's CPU accelerator). Re-running skips what is done: the dataset is kept and finished runs
# resume from their last checkpoint (train.resume=auto), so only their reports are rewritten.
#   DEMO_DIR=runs/demo METHODS="finetune er derpp lump multitask stella stella_plus" PROCS=2 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${DEMO_DIR:-runs/demo}
methods=${METHODS:-finetune er stella}
py=${PYTHON:-.venv/bin/python}
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
procs=${PROCS:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
export FASTAV_NO_PROGRESS=${FASTAV_NO_PROGRESS:-1}
if [ "$gpus" -eq 0 ]; then
  # CPU processes share the cores: one OpenMP thread each unless told otherwise
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / procs > 0 ? $(nproc) / procs : 1 ))}
fi
# the launcher's own INFO lines are noise here; its exit status (a failed process fails the demo) is kept
launch() { "$py" -m deepspeed.launcher.runner --num_gpus "$procs" --master_port "${MASTER_PORT:-29517}" "$@" 2>&1 \
  | { grep -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^DeepSpeed .* built successfully' || true; }; }
say() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

say "data: $demo/data"
"$py" -m shards synth --out "$demo/data" --categories 3 --classes-per-category 4 --clips-per-class 24 \
  --pretrain-classes-per-category 4 --retrieval-per-class 6

say "pre-training on the pre-training classes ($procs processes)"
launch launch/pretrain.py --recipe demo_pretrain --eval data.root="$demo/data" train.run_dir="$demo/pretrain" \
  train.resume=auto

init="$demo/pretrain/weights.safetensors"
if [[ " $methods " == *" stella"* ]]; then
  say "STELLA's AVM stage: the matching module on the pre-training classes, backbone frozen"
  launch launch/avm.py --recipe demo data.root="$demo/data" model.init="$init" train.run_dir="$demo/avm" \
    train.resume=auto
fi

runs=()
for method in $methods; do
  say "continual pre-training: $method"
  extra=()
  [[ $method == stella* ]] && extra=(method.stella.avm_init="$demo/avm/avm.safetensors")
  launch launch/continual.py --recipe demo data.root="$demo/data" method.name="$method" model.init="$init" \
    train.run_dir="$demo/$method" train.resume=auto "${extra[@]}"
  runs+=("$demo/$method")
done

say "side by side"
"$py" -m fastav.eval compare "${runs[@]}" --out "$demo"
say "done in $(( $(date +%s) - start )) s: reports in $demo/<method>/report.md, comparison in $demo/comparison.md"
