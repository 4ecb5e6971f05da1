#!/usr/bin/env bash
# Trains ito_jax on one machine's GPUs: one process drives every local GPU
# (or those --gpus names); the mesh spans them all (config.mesh).
#
#   launch/gpu_single_host.sh --config=configs/clip_vit_b16.py --workdir=workdirs/clip_b16 \
#       [--gpus=0,1,2,3] [--install=cuda12|cuda13] [--dry_run] [-- --config.FIELD=VALUE ...]
#
# Flags:
#   --config, --workdir  passed to ito_jax.main (required); the workdir may be gs://...
#                        (needs gcsfs) with a local --config.data.data_dir after --.
#   --gpus               CUDA_VISIBLE_DEVICES for the run (default: all GPUs).
#   --install            first install requirements.txt and jax's CUDA plugin at the
#                        pinned jax version, jax[cuda12] (default) or jax[cuda13]: into
#                        .venv (built with make venv), or into $PYTHON's environment
#                        when PYTHON is set.
#   --dry_run            print every command (one per line) instead of running it.
#   after --             extra flags for ito_jax.main.
# Environment: PYTHON (default: the checkout's .venv/bin/python).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

config="" workdir="" gpus="" install=""
extra=()
while (($#)); do
  case $1 in
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --gpus=*) gpus=${1#*=} ;;
    --install) install=cuda12 ;;
    --install=*) install=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) unknown_flag "$1" ;;
  esac
  shift
done
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"
[[ -z $install || $install == cuda12 || $install == cuda13 ]] ||
  die "--install=$install: expected cuda12 or cuda13"
[[ -z $gpus || $gpus =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$gpus: expected a list like 0,1,2"
python=${PYTHON:-$ROOT/.venv/bin/python}

if [[ -n $install ]]; then
  if [[ -n ${PYTHON:-} ]]; then  # the user's own environment: make venv would build another
    note "installing requirements.txt and jax[$install] into $python's environment"
    run "$python" -m pip install -q -r "$ROOT/requirements.txt" "jax[$install]==$(pinned jax)"
  else
    note "building .venv and adding jax[$install]"
    run make -C "$ROOT" venv
    run "$python" -m pip install -q "jax[$install]==$(pinned jax)"
  fi
fi

environment=("PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}")
[[ -z $gpus ]] || environment+=("CUDA_VISIBLE_DEVICES=$gpus")
note "training on ${gpus:-all} local GPUs (workdir $workdir)"
run env "${environment[@]}" "$python" -m ito_jax.main "--config=$config" "--workdir=$workdir" \
  "${extra[@]}"
