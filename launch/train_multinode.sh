#!/usr/bin/env bash
# Train on several machines: run this once on every node; torchrun meets the other nodes at
# MASTER_ADDR:MASTER_PORT (static rendezvous) and runs `visprune train RECIPE [overrides]` per GPU.
#
# usage: launch/train_multinode.sh RECIPE [dotted.key=value ...]
#   NNODES=1             number of nodes (default 1)
#   NODE_RANK=0          this node's rank in [0, NNODES) (default: $SLURM_NODEID under Slurm, else 0)
#   MASTER_ADDR          address of node 0; required when NNODES > 1 (default 127.0.0.1 on one node)
#   MASTER_PORT=29500    a free TCP port on node 0
#   NPROC_PER_NODE=N     processes per node (default: visible GPUs, as in train_local.sh; 2 without a GPU)
#   PYTHON=python        interpreter to run torchrun with (default: `torchrun` on PATH)
#   DRY_RUN=1            print the command instead of running it
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.bash"
require_recipe "$0" "NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, PYTHON, DRY_RUN" "$@"
recipe=$1
shift

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
master_port=${MASTER_PORT:-29500}
for name in nnodes node_rank master_port; do
  if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
    echo "$0: ${name^^} must be a non-negative integer, got '${!name}'" >&2
    exit 2
  fi
done
if (( nnodes < 1 || node_rank >= nnodes )); then
  echo "$0: need NNODES >= 1 and 0 <= NODE_RANK < NNODES, got NNODES=$nnodes NODE_RANK=$node_rank" >&2
  exit 2
fi
if (( nnodes > 1 )) && [[ -z "${MASTER_ADDR:-}" ]]; then
  echo "$0: MASTER_ADDR is not set: with NNODES=$nnodes every node needs the address of node 0" >&2
  exit 2
fi
master_addr=${MASTER_ADDR:-127.0.0.1}

nproc=$(processes_per_node "$0" NPROC_PER_NODE)
mapfile -t torchrun < <(find_launcher "$0" torchrun torch.distributed.run)
[[ ${#torchrun[@]} -gt 0 ]] || exit 127

cmd=("${torchrun[@]}" --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
     --master_addr "$master_addr" --master_port "$master_port"
     -m visprune.trainer.cli train "$recipe" "$@")
echo "$0: node $node_rank of $nnodes, $nproc process(es), rendezvous at $master_addr:$master_port" >&2
run_or_print "${cmd[@]}"
