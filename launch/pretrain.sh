#!/usr/bin/env bash
''':'  # bash: the no-op `:`. Python: a string, to the end of this script (see the bottom).
# Pretrain with the deepspeed launcher on this machine, or on several with a hostfile.
#
#   bash launch/pretrain.sh CONFIG [--dotted.overrides ...]
#   deepspeed [--num_gpus N] [--num_nodes N] [--hostfile F] launch/pretrain.sh CONFIG [...]
#   bash launch/pretrain.sh --help     this text and every config key
#
# Environment:
#   NUM_GPUS     processes per node (default: the hostfile's slots; without HOSTFILE,
#                every GPU here, or 2 CPU ranks without GPUs)
#   NUM_NODES    nodes to use from HOSTFILE (default: all of them)
#   HOSTFILE     deepspeed hostfile ("host slots=N" per line) for multi-node runs
#   MASTER_ADDR  address of rank 0 (default: the launcher's choice)
#   MASTER_PORT  rendezvous port (default: a free one; one busy here is an error)
#   PYTHON       interpreter (default: the project's .venv, else python3)
#
# Started by the deepspeed launcher (`deepspeed launch/pretrain.sh CONFIG`, with or without
# --no_python), once per rank with RANK and WORLD_SIZE set, the script runs the trainer
# directly; the launcher's own flags pick the ranks and nodes.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3)

args=()
for arg in "$@"; do
  case "$arg" in
    --local_rank=*) ;;  # added by the deepspeed launcher; ranks come from the environment
    *) args+=("$arg") ;;
  esac
done
case "${args[0]:-}" in
  -h|--help)
    # The comment block above, then the config reference from the dataclasses.
    awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "${BASH_SOURCE[0]}"
    echo
    exec "$python" -m pretrain config --help
    ;;
esac
if [ ${#args[@]} -lt 1 ]; then
  echo "usage: bash launch/pretrain.sh CONFIG [--dotted.overrides ...] (--help: every key)" >&2
  exit 2
fi
config=${args[0]}
overrides=("${args[@]:1}")

if [ -n "${RANK:-}" ] && [ -n "${WORLD_SIZE:-}" ]; then
  exec "$python" -m pretrain.train --config "$config" "${overrides[@]}"
fi

# One check before any rank starts: a bad config, an output_dir that cannot be written or
# data that does not load ends here in one line, not once per rank.
"$python" -m pretrain check "$config" "${overrides[@]}" || exit $?

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -eq 0 ]; then
  # CPU ranks: one OpenMP thread each, or step times swing wildly on shared cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  num_gpus=${NUM_GPUS:-2}
else
  num_gpus=${NUM_GPUS:-$gpus}
fi

if [ -n "${HOSTFILE:-}" ]; then
  launcher=("$python" -m deepspeed.launcher.runner --hostfile "$HOSTFILE")
  # The hosts the runner starts ranks on: the hostfile's first NUM_NODES (all by default).
  hosts=$(awk -v n="${NUM_NODES:-0}" '!/^[[:space:]]*(#|$)/ && (n == 0 || c++ < n) { print $1 }' \
    "$HOSTFILE" | paste -sd, -)
  # --num_gpus would replace every node's slots with this machine's count.
  [ -n "${NUM_GPUS:-}" ] && launcher+=(--num_gpus "$NUM_GPUS")
  [ -n "${NUM_NODES:-}" ] && launcher+=(--num_nodes "$NUM_NODES")
  [ -n "${MASTER_ADDR:-}" ] && launcher+=(--master_addr "$MASTER_ADDR")
else
  case "$num_gpus" in
    ''|*[!0-9]*|0*) echo "error: NUM_GPUS must be a positive number of processes, not '$num_gpus'" >&2; exit 2 ;;
  esac
  # One machine: DeepSpeed's per-node launcher, started as DeepSpeed's runner starts it for
  # localhost (these ranks, this address), without the runner's own start-up and exit
  # around it (about 2 s of every job, for a process that would only start this one).
  world_info=$("$python" -c 'import base64, json, sys
ranks = {"localhost": list(range(int(sys.argv[1])))}
print(base64.urlsafe_b64encode(json.dumps(ranks).encode()).decode())' "$num_gpus")
  launcher=("$python" -u -m deepspeed.launcher.launch --world_info="$world_info"
    --master_addr="${MASTER_ADDR:-127.0.0.1}")
fi
# The rendezvous port: rank 0 listens on it. On one machine (no HOSTFILE), check the port
# now (a busy one is one line here, not a bare EADDRINUSE per rank) or pick a free one.
if [ -z "${HOSTFILE:-}" ]; then
  MASTER_PORT=$("$python" - "${MASTER_PORT:-}" <<'PY'
import socket, sys
wanted = int(sys.argv[1]) if sys.argv[1] else 0
with socket.socket() as s:
    try:
        s.bind(("", wanted))
    except OSError:
        sys.exit(f"error: MASTER_PORT {wanted} is in use on this machine (another job?);"
                 " choose another, or leave MASTER_PORT unset to pick a free one")
    print(s.getsockname()[1])
PY
) || exit 2
fi
[ -n "${MASTER_PORT:-}" ] && launcher+=(--master_port "$MASTER_PORT")

# DeepSpeed's launchers do not pass SIGTERM/SIGINT on to the ranks as a save-and-exit, so
# this script does: every rank then saves a checkpoint and exits (as under SLURM, where each
# task receives the signal itself). Only the ranks get it: the launcher would exit at once
# and leave them saving after this script had returned, so whatever supervises the job
# would think it over while the save still ran. This script exits when the launcher does,
# after every rank, with its status. With a hostfile the ranks run under each node's sshd,
# not under this script: each node is told through pdsh, as the runner reaches them, and
# the ranks of this job are found by the id it gives them (--launch_id).
launch_id="$(hostname)-$$-$(date +%s%N)"
descendants() {
  local child
  for child in $(pgrep -P "$1"); do
    echo "$child"
    descendants "$child"
  done
}
forward() {
  local pid
  for pid in $(descendants $$); do
    case "$(ps -o args= -p "$pid" 2>/dev/null)" in
      *"-m pretrain.train --local_rank="*) kill -s "$1" "$pid" 2>/dev/null || true ;;
    esac
  done
  if [ -n "${HOSTFILE:-}" ]; then
    # The ranks only (not their per-node launcher, which would end them as a failure);
    # "[.]" matches a dot in a rank's arguments but not itself in this command's.
    PDSH_RCMD_TYPE=ssh pdsh -S -w "$hosts" "pkill -$1 -f -- \
      '-m pretrain[.]train --local_rank=[0-9]+ .*--launch_id=$launch_id' || true" \
      >/dev/null 2>&1 || true
  fi
}

"${launcher[@]}" --module pretrain.train --config "$config" "${overrides[@]}" \
  --launch_id="$launch_id" &
child=$!
trap 'forward TERM' TERM
trap 'forward INT' INT
# `wait` returns early when a trapped signal arrives; keep waiting until the launcher ends.
while :; do
  status=0
  wait "$child" || status=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"

# The deepspeed launcher runs its script as `python -u launch/pretrain.sh ...` unless given
# --no_python. Python reads everything from line 2 to here as one string, then runs the lines
# below, which hand this file to bash with the same arguments. Bash never gets here (the
# script has exited) and parses them as a heredoc it discards.
: <<'PYTHON'
'''
import os
import sys

os.execvp("bash", ["bash", *sys.argv])
PYTHON
