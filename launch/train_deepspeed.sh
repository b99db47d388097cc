#!/usr/bin/env bash
# Train with the `deepspeed` launcher (pdsh/ssh to the hosts of a hostfile) running
# `visprune train RECIPE [overrides]`; the ZeRO stage comes from the recipe (distributed.zero_stage).
#
# usage: launch/train_deepspeed.sh RECIPE [dotted.key=value ...]
#   HOSTFILE=hostfile    lines `host slots=N`; if the default ./hostfile is absent, DeepSpeed uses this machine
#   MASTER_PORT=29500    a free TCP port on the first host
#   PYTHON=python        interpreter to run the launcher with (default: `deepspeed` on PATH)
#   DRY_RUN=1            print the command instead of running it
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.bash"
require_recipe "$0" "HOSTFILE, MASTER_PORT, PYTHON, DRY_RUN" "$@"
recipe=$1
shift
if [[ -n "${HOSTFILE:-}" && ! -f "$HOSTFILE" ]]; then
  echo "$0: HOSTFILE=$HOSTFILE does not exist" >&2
  exit 2
fi
hostfile=${HOSTFILE:-hostfile}

mapfile -t launcher < <(find_launcher "$0" deepspeed deepspeed.launcher.runner)
[[ ${#launcher[@]} -gt 0 ]] || exit 127

# --no_local_rank: the CLI takes RECIPE and overrides only; ranks come from the LOCAL_RANK/RANK env vars
cmd=("${launcher[@]}" --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --no_local_rank
     --module visprune.trainer.cli train "$recipe" "$@")
run_or_print "${cmd[@]}"
