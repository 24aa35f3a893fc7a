#!/usr/bin/env bash
# Train on every GPU of this machine with the deepspeed launcher.
#   launch/single_node.sh model=gpt_1_3b trainer.max_steps=20000
# Env: NUM_GPUS (default: all visible), JOB_NAME (run directory name; reuse it to resume),
#      FTLM_RUNS (parent of run directories, default ~/.cache/ftlm/runs), MASTER_PORT (default 29500).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

JOB_NAME="${JOB_NAME:-ftlm-$(date +%Y%m%d-%H%M%S)}"
train_args_for_job "$JOB_NAME" "$@"
gpus=()
[[ -n "${NUM_GPUS:-}" ]] && gpus=(--num_gpus "$NUM_GPUS")
launch_forwarding_stop "$DEEPSPEED" "${gpus[@]}" --master_port "${MASTER_PORT:-29500}" --module ftlm.train.main "${TRAIN_ARGS[@]}"
