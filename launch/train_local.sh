#!/usr/bin/env bash
# Train on this machine: torchrun with one process per visible GPU, then `visprune train RECIPE [overrides]`.
# The recipe holds every hyperparameter; this script only picks the number of processes.
#
# usage: launch/train_local.sh RECIPE [dotted.key=value ...]
#   NPROC=N         processes (default: GPUs in CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`; 2 without a GPU)
#   PYTHON=python   interpreter to run torchrun with (default: `torchrun` on PATH), e.g. PYTHON=.venv/bin/python
#   DRY_RUN=1       print the command instead of running it
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  echo "usage: $0 RECIPE [dotted.key=value ...]   (env: NPROC, PYTHON, DRY_RUN)" >&2
  exit 2
fi
recipe=$1
shift
if [[ ! -f "$recipe" ]]; then
  echo "$0: recipe not found: $recipe" >&2
  exit 2
fi

count_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    # set but empty (or -1) hides every GPU; otherwise one entry (index or UUID) per GPU
    if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1 ]]; then
      echo 0
    else
      awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

num_gpus=$(count_gpus)
nproc=${NPROC:-$((num_gpus > 0 ? num_gpus : 2))}
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NPROC must be a positive integer, got '$nproc'" >&2
  exit 2
fi

if [[ -n "${PYTHON:-}" ]]; then
  torchrun=("$PYTHON" -m torch.distributed.run)
elif command -v torchrun >/dev/null 2>&1; then
  torchrun=(torchrun)
else
  echo "$0: torchrun not found: activate the environment visprune is installed in, or set PYTHON=.venv/bin/python" >&2
  exit 127
fi

cmd=("${torchrun[@]}" --standalone --nnodes 1 --nproc_per_node "$nproc"
     -m visprune.trainer.cli train "$recipe" "$@")
echo "$0: $nproc process(es), $num_gpus GPU(s) visible" >&2
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
