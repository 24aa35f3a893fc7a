#!/usr/bin/env bash
# Two CPU processes on this machine (the deepspeed launcher over gloo): try multi-process training on a laptop.
#   launch/local_cpu.sh trainer.max_steps=50
# Env: NUM_PROCS (default 2), JOB_NAME, FTLM_RUNS, MASTER_PORT (default 29500), OMP_NUM_THREADS
#      (default: this machine's cores split between the processes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NUM_PROCS="${NUM_PROCS:-2}"
JOB_NAME="${JOB_NAME:-ftlm-cpu-$(date +%Y%m%d-%H%M%S)}"
train_args_for_job "$JOB_NAME" "$@"
has_override trainer.device "$@" || TRAIN_ARGS+=(trainer.device=cpu)
# DeepSpeed's CPU accelerator even on a machine with a GPU; each process gets its share of the cores.
export DS_ACCELERATOR=cpu
cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NUM_PROCS > 0 ? cores / NUM_PROCS : 1 ))}"
launch_forwarding_stop "$DEEPSPEED" --num_gpus "$NUM_PROCS" --master_port "${MASTER_PORT:-29500}" --module ftlm.train.main "${TRAIN_ARGS[@]}"
