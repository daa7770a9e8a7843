#!/usr/bin/env bash
# N training processes on this machine, each with DEVICES_PER_PROCESS fake CPU devices: the multi-host
# code path (jax.distributed, a mesh spanning processes, collective checkpoints) without a cluster.
#
#   launch/local.sh N [train args...]     e.g.  launch/local.sh 2 --workdir=runs/mp --config.train.steps=20
#
# Env: DEVICES_PER_PROCESS (4), PORT (coordinator port; default a free one), PYTHON (python on PATH),
#      GRACE_S (30: seconds the others get to stop after one fails before SIGKILL).
# Exit status: the first non-zero status of any process (the others are then stopped), else 0.
set -uo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [train args...]   (N = number of processes, >= 1)" >&2
  exit 64
fi
N=$1; shift
PY=${PYTHON:-python}
DEVICES=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
killers=()
cleanup() { for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null; done; }
trap 'cleanup; wait; exit 130' INT
trap 'cleanup; wait; exit 143' TERM

for ((i = 0; i < N; i++)); do
  # Each process in its own subshell so its output can be prefixed; `exec` keeps the python
  # process's exit status as the subshell's, and PIPESTATUS carries it past the sed.
  (
    XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
      "$PY" -u -m iclm_jax.main --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" \
      --process_id="$i" "$@" 2>&1 | sed -u "s/^/[$i] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done

status=0
remaining=$N
while ((remaining > 0)); do
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  [[ -z "${done_pid:-}" ]] && break   # nothing left to wait for
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch/local.sh: process with pid $done_pid exited with status $rc; stopping the others" >&2
    # TERM the python (and sed) under each other subshell: a preemption-style stop; KILL after a grace
    # period in case one blocks in a collective on the dead peer.
    for p in "${pids[@]}"; do
      [[ $p == "$done_pid" ]] && continue
      pkill -TERM -P "$p" 2>/dev/null
      ( sleep "${GRACE_S:-30}"; pkill -KILL -P "$p" 2>/dev/null ) >/dev/null 2>&1 &
      killers+=($!)
    done
  fi
done
for k in "${killers[@]}"; do kill "$k" 2>/dev/null; done
exit "$status"
