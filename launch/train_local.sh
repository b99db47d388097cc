#!/usr/bin/env bash
# Train on this machine: torchrun with one process per visible GPU, then `visprune train RECIPE [overrides]`.
# The recipe holds every hyperparameter; this script only picks the number of processes.
#
# usage: launch/train_local.sh RECIPE [dotted.key=value ...]
#   NPROC=N         processes (default: GPUs in CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`; 2 without a GPU)
#   PYTHON=python   interpreter to run torchrun with (default: `torchrun` on PATH), e.g. PYTHON=.venv/bin/python
#   DRY_RUN=1       print the command instead of running it
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.bash"
require_recipe "$0" "NPROC, PYTHON, DRY_RUN" "$@"
recipe=$1
shift

nproc=$(processes_per_node "$0" NPROC)
mapfile -t torchrun < <(find_launcher "$0" torchrun torch.distributed.run)
[[ ${#torchrun[@]} -gt 0 ]] || exit 127

cmd=("${torchrun[@]}" --standalone --nnodes 1 --nproc_per_node "$nproc"
     -m visprune.trainer.cli train "$recipe" "$@")
echo "$0: $nproc process(es), $(count_gpus) GPU(s) visible" >&2
run_or_print "${cmd[@]}"
