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
