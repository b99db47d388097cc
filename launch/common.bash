# Shared by the launch scripts (sourced, not run): recipe check, GPU count, launcher lookup, dry run.

# require_recipe SCRIPT USAGE_ENV ARGS...: exit 2 with a usage line unless $1 names an existing file
require_recipe() {
  local script=$1 env_help=$2
  shift 2
  if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    echo "usage: $script RECIPE [dotted.key=value ...]   (env: $env_help)" >&2
    exit 2
  fi
  if [[ ! -f "$1" ]]; then
    echo "$script: recipe not found: $1" >&2
    exit 2
  fi
}

# count_gpus: visible GPUs (CUDA_VISIBLE_DEVICES, else nvidia-smi), 0 without any
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

# processes_per_node SCRIPT VAR_NAME: $VAR_NAME if set, else one per visible GPU, else 2 (CPU, gloo)
processes_per_node() {
  local script=$1 var=$2 gpus nproc
  gpus=$(count_gpus)
  nproc=${!var:-$((gpus > 0 ? gpus : 2))}
  if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
    echo "$script: $var must be a positive integer, got '$nproc'" >&2
    exit 2
  fi
  echo "$nproc"
}

# find_launcher SCRIPT PROGRAM MODULE: prints "$PYTHON -m MODULE" or PROGRAM (one word per line)
find_launcher() {
  local script=$1 program=$2 module=$3
  if [[ -n "${PYTHON:-}" ]]; then
    printf '%s\n' "$PYTHON" -m "$module"
  elif command -v "$program" >/dev/null 2>&1; then
    echo "$program"
  else
    echo "$script: $program not found: activate the environment visprune is installed in, or set PYTHON=.venv/bin/python" >&2
    exit 127
  fi
}

# run_or_print CMD...: print the command when DRY_RUN is set, else replace this shell with it
run_or_print() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  exec "$@"
}
