#!/usr/bin/env bash
# Train on the nodes of a hostfile (see hostfile.example) through the deepspeed launcher's pdsh/ssh path.
# Run it on the first node; every node needs passwordless ssh, the same paths, and a shared run directory.
#   HOSTFILE=launch/hostfile launch/multi_node.sh model=gpt_1_3b trainer.micro_batch_size=4
# Env: HOSTFILE (default ./hostfile), JOB_NAME, FTLM_RUNS, MASTER_ADDR (default: the first host's address),
#      MASTER_PORT (default 29500), LAUNCHER (pdsh, openmpi, mvapich, ...; default pdsh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

HOSTFILE="${HOSTFILE:-hostfile}"
LAUNCHER="${LAUNCHER:-pdsh}"
if [[ ! -s "$HOSTFILE" ]]; then
  echo "multi_node.sh: no hostfile at '$HOSTFILE': copy launch/hostfile.example, list your nodes, and set HOSTFILE=<path>" >&2
  exit 1
fi

# Every host must answer ssh without a prompt before anything starts, or the launcher hangs or fails per node.
hosts=()
while read -r host _; do
  [[ -n "$host" ]] && hosts+=("$host")
done < <(sed -e 's/#.*//' "$HOSTFILE")
if [[ ${#hosts[@]} -eq 0 ]]; then
  echo "multi_node.sh: '$HOSTFILE' lists no hosts: write one line per node, e.g. 'node-1 slots=8'" >&2
  exit 1
fi
for host in "${hosts[@]}"; do
  if ! why="$(ssh -o BatchMode=yes -o ConnectTimeout=5 "$host" true 2>&1 </dev/null)"; then
    why="$(printf '%s' "$why" | tail -n 1 | tr -d '\r')"
    echo "multi_node.sh: host '$host' from $HOSTFILE does not answer ssh (${why:-no reason given}): fix its name, or set up passwordless ssh so that 'ssh -o BatchMode=yes $host true' succeeds (ssh-copy-id $host)" >&2
    exit 1
  fi
done
if [[ "$LAUNCHER" == pdsh ]] && ! command -v pdsh >/dev/null; then
  echo "multi_node.sh: pdsh is not installed on this node: install it (apt-get install pdsh) or set LAUNCHER=openmpi" >&2
  exit 1
fi

JOB_NAME="${JOB_NAME:-ftlm-$(date +%Y%m%d-%H%M%S)}"
train_args_for_job "$JOB_NAME" "$@"
# The pdsh path joins the arguments into one command line that each node's shell parses again: ${model.name},
# quotes, parentheses and $ in overrides would change or break there. They travel as one base64 argument (no
# character a shell acts on) that ftlm.train.main expands back to exactly what was given (ftlm.config).
encoded="--ftlm-overrides-b64=$(printf '%s\0' "${TRAIN_ARGS[@]}" | base64 -w0 | tr '+/' '-_')"
master=()
[[ -n "${MASTER_ADDR:-}" ]] && master=(--master_addr "$MASTER_ADDR")
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --launcher "$LAUNCHER" "${master[@]}" --master_port "${MASTER_PORT:-29500}" \
  --module ftlm.train.main "$encoded"
