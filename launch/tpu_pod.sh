#!/usr/bin/env bash
# Trains ito_jax on a Cloud TPU VM slice (one host or a multi-host pod):
#
#   1. creates the slice, or reuses it when one of that name is READY;
#   2. ships this checkout's committed HEAD (git archive) to every worker;
#   3. installs it on every worker (--worker=all) into ~/ito_jax_venv:
#      requirements.txt plus jax[tpu] at the pinned jax version and gcsfs
#      (so gs:// paths work through etils.epath);
#   4. starts the same training command on all hosts with --distributed=on;
#      jax.distributed finds the pod's coordinator, process count and process
#      id itself (from the TPU VM metadata server).
#
#   launch/tpu_pod.sh --name=ito-v5e-32 --zone=us-west4-a \
#       --accelerator_type=v5litepod-32 --version=v2-alpha-tpuv5-lite \
#       --config=configs/clip_vit_b16.py --workdir=gs://BUCKET/runs/clip_b16 \
#       [--project=PROJECT] [--spot] [--detach] [--dry_run] \
#       [-- --config.total_steps=20000 ...]
#
# Flags:
#   --name, --zone        the TPU VM (required); --project defaults to gcloud's.
#   --accelerator_type    slice type when creating (default v5litepod-16).
#   --version             TPU software version when creating (default v2-alpha-tpuv5-lite,
#                         the v5e runtime; v4: tpu-ubuntu2204-base, v6e: v2-alpha-tpuv6e).
#   --spot                create the slice as Spot VMs.
#   --config, --workdir   passed to ito_jax.main (required). The config file must be
#                         committed (the slice gets HEAD). The workdir may be gs://...:
#                         metrics, TensorBoard events and the rest go there through epath.
#   --data_dir            local disk on each worker for the generated data set, used when
#                         the workdir is remote (default /tmp/ito_jax_data).
#   --python              interpreter for the venv on the workers (default python3.11; the
#                         stack needs Python >= 3.11; installed with apt when missing).
#   --detach              start training in the background (log: ~/ito_jax_train.log on
#                         each worker) instead of streaming every worker's output.
#   --dry_run             print every command (one per line) instead of running it; the
#                         slice is taken to be absent, so the create command shows too.
#   after --               extra flags for ito_jax.main, e.g. --config.FIELD=VALUE.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/common.sh
source "$ROOT/launch/common.sh"

name="" zone="" project="" accelerator_type="v5litepod-16" version="v2-alpha-tpuv5-lite"
spot=0 config="" workdir="" data_dir="/tmp/ito_jax_data" python="python3.11" detach=0
extra=()
while (($#)); do
  case $1 in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --spot) spot=1 ;;
    --config=*) config=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --data_dir=*) data_dir=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --detach) detach=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; extra=("$@"); break ;;
    -h | --help) usage ;;
    *) unknown_flag "$1" ;;
  esac
  shift
done
[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ -n $config ]] || die "--config is required"
[[ -n $workdir ]] || die "--workdir is required"
config_file=${config%%:*}
[[ -f $ROOT/$config_file ]] || die "--config=$config: no file $config_file in $ROOT"
# The slice gets `git archive HEAD`, not the working tree: a config that is
# only on this disk would be missing there, after the slice was created.
git -C "$ROOT" cat-file -e "HEAD:$config_file" 2>/dev/null ||
  die "--config=$config: $config_file is not committed, and the slice gets only the committed" \
      "HEAD (git archive); commit it first (git add $config_file && git commit)"
git -C "$ROOT" diff --quiet HEAD -- "$config_file" ||
  note "warning: $config_file has uncommitted changes; the slice trains HEAD's version of it"

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z $project ]] || where+=("--project=$project")
jax_version=$(pinned jax)
gcsfs_version=2026.9.0  # each gcsfs pins the fsspec of its own release; pip installs that one

# ---- 1. the slice ------------------------------------------------------------
state=""
if ((DRY_RUN)); then
  run "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)'
else
  state=$("${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null) || state=""
fi
if [[ -z $state ]]; then
  note "creating $accelerator_type slice $name in $zone"
  create=(create "$name" "${where[@]}" "--accelerator-type=$accelerator_type" "--version=$version")
  ((spot)) && create+=(--spot)
  run "${tpu[@]}" "${create[@]}"
elif [[ $state == READY ]]; then
  note "reusing slice $name (READY)"
else
  die "TPU $name exists in state $state; wait for READY or delete it"
fi

# ---- 2. code to every worker -------------------------------------------------
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
  note "warning: uncommitted changes are not shipped (git archive HEAD)"
fi
tarball="${TMPDIR:-/tmp}/ito_jax-$name.tar.gz"
run git -C "$ROOT" archive --format=tar.gz "--output=$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$name:ito_jax.tar.gz" "${where[@]}" --worker=all

# ---- 3. install on every worker ----------------------------------------------
# One line for the worker's shell; `~` stays unexpanded so it is the worker's home.
py=$(quote "$python")
install="(command -v $py >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv))"
install+=" && rm -rf ~/ito_jax && mkdir -p ~/ito_jax && tar -xzf ~/ito_jax.tar.gz -C ~/ito_jax"
install+=" && ([ -x ~/ito_jax_venv/bin/python ] || $py -m venv ~/ito_jax_venv)"
install+=" && ~/ito_jax_venv/bin/pip install -q -r ~/ito_jax/requirements.txt"
install+=" $(quote "jax[tpu]==$jax_version" "gcsfs==$gcsfs_version")"
note "installing on every worker of $name"
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$install"

# ---- 4. train on every host --------------------------------------------------
# --distributed=on: on a TPU VM slice the worker list comes from the metadata
# server, which `auto` (environment variables only) cannot see; every host,
# one or many, joins the runtime, so a multi-host pod never trains as
# independent single-host runs.
args=(-m ito_jax.main --distributed=on "--config=$config" "--workdir=$workdir")
[[ $workdir != *://* ]] || args+=("--config.data.data_dir=$data_dir")
args+=("${extra[@]}")
train="cd ~/ito_jax && ~/ito_jax_venv/bin/python $(quote "${args[@]}")"
if ((detach)); then
  train="cd ~/ito_jax && setsid nohup ~/ito_jax_venv/bin/python $(quote "${args[@]}")"
  train+=" > ~/ito_jax_train.log 2>&1 < /dev/null &"
fi
note "training on every host of $name (workdir $workdir)"
# Orbax writes each host's checkpoint shards under the workdir: on a slice of
# several hosts a local path puts them on separate disks, and no host can
# restore the checkpoint. (A one-host slice is fine.)
[[ $workdir == *://* ]] ||
  note "warning: --workdir=$workdir is local to each worker; on a multi-host slice use gs://..."
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$train"
