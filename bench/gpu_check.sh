#!/usr/bin/env bash
# The GPU check: what a GPU changes, measured on an NVIDIA GPU host in under
# 10 minutes on one GPU (docs/GPU.md).
#
#   bench/gpu_check.sh                     # on a GPU host (uses GPU 0)
#   bench/gpu_check.sh --cpu --venv=DIR    # the same steps on a CPU, small:
#                                          # shows that the script runs
#
# Steps, and what each prints:
#   1. a fresh virtual environment with requirements-gpu.txt and pytest (or
#      --venv=DIR, an existing one): the GPU (nvidia-smi), jax's version and
#      the devices JAX sees;
#   2. the tests a GPU changes: XLA's convolutions (conv_impl='xla') against
#      the blocked patches, bfloat16 against float32, and three real train
#      steps on one device against the grouped oracle (TF32 matmuls could
#      break their tolerances): pytest's summary line;
#   3. bench/gpu_step.py on the paper's config, float32 then bfloat16: for
#      the train and the eval step, images/s on synthetic uint8 batches and
#      its fraction of the `--mode=compile` roofline bound;
#   4. one minute of the digits default (main.py, stopped by SIGTERM, which
#      checkpoints), then that checkpoint's test error: the last progress
#      line and the evaluation lines.
# Everything it makes (environment, run, logs) is left in the temporary
# directory it names first.
set -euo pipefail
cd "$(dirname "$0")/.."

cpu=0
venv=
for arg in "$@"; do
  case "$arg" in
    --cpu) cpu=1 ;;
    --venv=*) venv="${arg#--venv=}" ;;
    *) echo "error: unknown argument $arg (see the comment at the top)" >&2
       exit 1 ;;
  esac
done
work="$(mktemp -d -t alexnet-gpu-check-XXXXXX)"
echo "== Working in $work"

if [[ -z "$venv" ]]; then
  venv="$work/venv"
  requirements=requirements-gpu.txt
  [[ $cpu == 1 ]] && requirements=requirements.txt
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$requirements" pytest==9.2.0
fi
python="$venv/bin/python"

if [[ $cpu == 1 ]]; then
  export JAX_PLATFORMS=cpu
  bench_flags=(--variant=tiny --allow_cpu --gpu=h100 --steps=3 --warmup=1)
else
  # One GPU; the tests' conftest would otherwise choose the CPU.
  export CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  bench_flags=(--devices=1)
fi
"$python" -c 'import jax; print("jax", jax.__version__, jax.devices())'

echo "== Tests a GPU changes"
"$python" -m pytest -q -p no:cacheprovider \
  'tests/test_parallel.py::test_three_train_steps_equal_grouped_oracle[1-True-2-False-xla]' \
  'tests/test_parallel.py::test_three_train_steps_equal_grouped_oracle[1-True-2-True-patches]' \
  'tests/test_parallel.py::test_three_train_steps_equal_grouped_oracle[1-True-1-True-patches]' \
  tests/test_model.py::test_bfloat16_compute_keeps_float32_parameters \
  tests/test_model.py::test_blocked_patch_convolutions_equal_xla_gradients_included \
  tests/test_model.py::test_bfloat16_gradient_step_follows_float32 \
  2>&1 | tail -3 || true  # A failure is a finding: the check goes on.

echo "== The paper's steps, synthetic uint8 batches"
for dtype in float32 bfloat16; do
  "$python" bench/gpu_step.py "${bench_flags[@]}" --dtype=$dtype 2>&1 \
    | grep -E '^(train|eval|error)' || true
done

echo "== One minute of the digits default"
run="$work/runs/digits"
timeout --signal=TERM 60 "$python" main.py \
  --config=configs/alexnet.py:digits --workdir="$run" > "$work/train.log" 2>&1 \
  || true  # Stopped by SIGTERM after a checkpoint.
grep -E '\| loss ' "$work/train.log" | tail -1 || true
"$python" main.py --config=configs/alexnet.py:digits --workdir="$run" \
  --mode=eval 2>&1 | grep -E '^(Checkpoint|  |error)' || true
