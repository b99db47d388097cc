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

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  echo "usage: $0 RECIPE [dotted.key=value ...]   (env: HOSTFILE, MASTER_PORT, PYTHON, DRY_RUN)" >&2
  exit 2
fi
recipe=$1
shift
if [[ ! -f "$recipe" ]]; then
  echo "$0: recipe not found: $recipe" >&2
  exit 2
fi
if [[ -n "${HOSTFILE:-}" && ! -f "$HOSTFILE" ]]; then
  echo "$0: HOSTFILE=$HOSTFILE does not exist" >&2
  exit 2
fi
hostfile=${HOSTFILE:-hostfile}

if [[ -n "${PYTHON:-}" ]]; then
  launcher=("$PYTHON" -m deepspeed.launcher.runner)
elif command -v deepspeed >/dev/null 2>&1; then
  launcher=(deepspeed)
else
  echo "$0: deepspeed not found: activate the environment visprune is installed in, or set PYTHON=.venv/bin/python" >&2
  exit 127
fi

# --no_local_rank: the CLI takes RECIPE and overrides only; ranks come from the LOCAL_RANK/RANK env vars
cmd=("${launcher[@]}" --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --no_local_rank
     --module visprune.trainer.cli train "$recipe" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
