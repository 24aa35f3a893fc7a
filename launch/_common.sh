# Sourced by the launch scripts. Hydra overrides ("$@") pass through untouched; each job gets its own run
# directory, $FTLM_RUNS/<job name>, unless the overrides already name one with trainer.out_dir=.
FTLM_RUNS="${FTLM_RUNS:-$HOME/.cache/ftlm/runs}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

# True when the user's overrides set KEY (also as +KEY= or ++KEY=).
has_override() {
  local key="$1" arg
  shift
  for arg in "$@"; do
    case "$arg" in "$key="* | "+$key="* | "++$key="*) return 0 ;; esac
  done
  return 1
}

# The overrides with trainer.out_dir added for job NAME, into the array TRAIN_ARGS.
train_args_for_job() {
  local name="$1"
  shift
  TRAIN_ARGS=("$@")
  has_override trainer.out_dir "$@" || TRAIN_ARGS+=("trainer.out_dir=$FTLM_RUNS/$name")
}

# Run the launcher ("$@") and pass a SIGTERM or SIGHUP (kill, timeout, a scheduler's stop, a closed ssh session) on to
# the training ranks. The deepspeed launcher on one machine dies of it without passing it on (only its pdsh path
# does), and its ranks went on training, holding the run directory. Each rank saves a checkpoint at its next log or
# save step and exits (trainer.resume=auto continues from it), and the launcher exits with them. Ctrl-C needs none
# of this: the terminal sends it to every process of the job.
launch_forwarding_stop() {
  "$@" &
  LAUNCHER_PID=$!
  trap forward_stop TERM HUP
  local rc
  while :; do
    rc=0
    wait "$LAUNCHER_PID" || rc=$?
    kill -0 "$LAUNCHER_PID" 2>/dev/null || break # else a trapped signal ended the wait, not the launcher
  done
  exit "$rc"
}

# The ranks are the launcher's grandchildren (deepspeed runner -> launch -> one process per rank); their own
# children (data workers) are left to them. Before the ranks exist, the middle process is told instead.
forward_stop() {
  local middle ranks=()
  middle="$(ps -o pid= --ppid "$LAUNCHER_PID" 2>/dev/null || true)"
  for pid in $middle; do
    for rank in $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do ranks+=("$rank"); done
  done
  if ((${#ranks[@]})); then
    echo "stopping: SIGTERM to the ${#ranks[@]} training process(es); each saves a checkpoint and exits" >&2
    kill -TERM "${ranks[@]}" 2>/dev/null || true
  else
    kill -TERM $middle "$LAUNCHER_PID" 2>/dev/null || true
  fi
}
