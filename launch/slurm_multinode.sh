#!/usr/bin/env bash
# Trains ito_jax on several GPU nodes of a Slurm allocation: one process per
# node (each drives all of its node's GPUs), started by srun. Run it inside the
# allocation, from a checkout on a file system every node sees:
#
#   salloc --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#       launch/slurm_multinode.sh --config=configs/clip_vit_b16.py --workdir=/shared/runs/b16
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#       --wrap="launch/slurm_multinode.sh --config=configs/clip_vit_b16.py --workdir=/shared/runs/b16"
#
# Coordinator discovery: the first node of SLURM_JOB_NODELIST hosts the JAX
# coordinator on --port; each task passes its SLURM_PROCID as --process_id and
# SLURM_NTASKS as --num_processes to ito_jax.main (with --coordinator_address).
#
# Flags:
#   --config, --workdir  passed to ito_jax.main (required).
#   --port               the coordinator's TCP port on the first node (default 8476).
#   --dry_run            print every command (one per line) instead of running it.
#   after --             extra flags for ito_jax.main.
# Environment: PYTHON (default: the checkout's .venv/bin/python, which needs jax's
# CUDA plugin: `make venv && .venv/bin/pip install "jax[cuda12]==$JAX"`, JAX being
# the jax pin in requirements.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

# first_host HOSTLIST: the first host of a Slurm hostlist expression,
# e.g. "gpu[03-04,07],cpu1" -> gpu03, "n[001-002]-ib[3-4]" -> n001-ib3.
first_host() {
  local rest=$1 host="" literal range
  while [[ -n $rest ]]; do
    literal=${rest%%[[,]*}  # up to the next '[' or ','
    host+=$literal
    rest=${rest:${#literal}}
    [[ $rest == "["* ]] || break  # a ',' or the end: the first host is complete
    range=${rest:1}
    range=${range%%]*}
    host+=${range%%[,-]*}  # the first number of the bracket, zero padding kept
    rest=${rest:$((${#range} + 2))}
  done
  printf '%s' "$host"
}

config="" workdir="" port=8476
extra=()
while (($#)); do
  case $1 in
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) unknown_flag "$1" ;;
  esac
  shift
done
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"
[[ $port =~ ^[0-9]+$ ]] || die "--port=$port: expected a number"
[[ -n ${SLURM_JOB_NODELIST:-} ]] ||
  die "SLURM_JOB_NODELIST is not set: run inside a Slurm allocation (salloc or sbatch)"
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
[[ $nodes =~ ^[0-9]+$ ]] || die "SLURM_JOB_NUM_NODES is not set: run inside a Slurm allocation"
coordinator="$(first_host "$SLURM_JOB_NODELIST"):$port"
python=${PYTHON:-$ROOT/.venv/bin/python}

# Each task's own SLURM_PROCID / SLURM_NTASKS are read in the task, so the
# per-task part is a single-quoted script; the rest passes through as "$@".
# shellcheck disable=SC2016
per_task='exec "$0" -m ito_jax.main "$@" --process_id="$SLURM_PROCID" --num_processes="$SLURM_NTASKS"'
note "training on $nodes nodes, coordinator $coordinator (workdir $workdir)"
run srun "--nodes=$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  env "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}" bash -c "$per_task" "$python" \
  "--coordinator_address=$coordinator" "--config=$config" "--workdir=$workdir" "${extra[@]}"
