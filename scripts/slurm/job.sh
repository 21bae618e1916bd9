#!/usr/bin/env bash
# The body of scripts/slurm/stage{1,2}.sbatch (docs/SCALING.md "Multi-node"): one srun task per node
# running scripts/slurm/node.sh, the early-warning signal turned into a checkpoint and a requeue.
#
#   job.sh <train_stage1.py|train_stage2.py> --config <recipe config> [--set key=value ...]
#
# - SLURM sends SIGUSR1 to this batch shell `--signal=B:USR1@<seconds>` before the time limit: every
#   rank gets SIGTERM, stops at its next micro-step with checkpoint-<step> of the last completed
#   optimizer step saved, and exits 143; then the job requeues itself (`scontrol requeue`, needs
#   `#SBATCH --requeue`).
# - A requeued run (SLURM_RESTART_COUNT > 0) adds `--set training.resume_from=latest`: it continues
#   in the same run dir (run.output_dir on the shared filesystem), possibly on other nodes.
set -u
repo=${COORDEXP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
export COORDEXP_REPO=$repo
script=$1
shift
resume=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
  resume=(--set training.resume_from=latest)
  echo "job.sh: restart ${SLURM_RESTART_COUNT} of job ${SLURM_JOB_ID}: resuming from the latest checkpoint"
fi
requeue=0
step=
on_warning() {
  requeue=1
  echo "job.sh: SIGUSR1 (time limit near): SIGTERM to every rank (save, stop), then requeue"
  [ -n "$step" ] && kill -TERM "$step" 2>/dev/null  # srun forwards it to the node tasks
}
trap on_warning USR1
srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash "$repo/scripts/slurm/node.sh" "$script" "$@" "${resume[@]}" &
step=$!
wait "$step"
rc=$?
while kill -0 "$step" 2>/dev/null; do  # `wait` returns early when a trap ran: wait for the save to end
  wait "$step"
  rc=$?
done
if [ "$requeue" = 1 ]; then
  echo "job.sh: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
