#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (e.g. v5p-64 = 8 hosts x 4 chips): create the slice or reuse it, copy
# this checkout to every worker, install it, and start the same command on all workers at once.
#
#   TPU_NAME=iclm-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 RUNTIME=v2-alpha-tpuv5 \
#     launch/tpu_pod.sh --workdir=gs://my-bucket/runs/smol --config=experiments/configs/smollm2.py \
#       --config.model.dtype=bfloat16 --config.mesh.data=1 --config.mesh.fsdp=-1   # fsdp=32 chips
#
# Everything after the script name goes to `python -m iclm_jax.main`. --distributed makes each worker
# call jax.distributed.initialize() with no arguments: on a TPU VM JAX reads the slice's metadata
# (worker id, peers), so no coordinator address is needed. The workdir must be shared by all hosts
# (a gs:// bucket, or a filesystem mounted on every worker): checkpoints are written collectively.
#
# Env: TPU_NAME, ZONE, ACCELERATOR, RUNTIME (the TPU software version: see
# `gcloud compute tpus tpu-vm versions list --zone=$ZONE`), PROJECT (default: gcloud's), SPOT=1 for
# spot capacity, SKIP_SETUP=1 to skip the copy/install (code unchanged since the last run),
# REMOTE_DIR (default iclm). Rerunning the script after a preemption resumes from the last checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5p-64}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-iclm}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

# 1. Create the slice unless it exists (a READY slice is reused as is).
if ! "${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  echo "creating $ACCELERATOR slice $TPU_NAME in $ZONE (runtime $RUNTIME)"
  "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${extra[@]}"
fi

# 2. Copy the package (source only: a tarball of tracked and untracked-not-ignored files) to every
#    worker and install it with its TPU extra into a virtualenv there.
if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  tarball=$(mktemp -t iclm-XXXXXX.tar.gz)
  trap 'rm -f "$tarball"' EXIT
  (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -T - -czf "$tarball")
  "${gc[@]}" scp "$tarball" "$TPU_NAME:iclm.tar.gz" "${where[@]}" --worker=all
  "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="
    set -e; mkdir -p $REMOTE_DIR && tar -xzf iclm.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR &&
    python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
    .venv/bin/pip install -q -e . 'jax[tpu]'"
fi

# 3. The same command on every worker, simultaneously (jax.distributed waits for all of them).
args=$(printf '%q ' "$@")
"${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="
  cd $REMOTE_DIR && .venv/bin/python -u -m iclm_jax.main --distributed --init_timeout_s=600 $args"
