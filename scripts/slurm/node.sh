#!/usr/bin/env bash
# One SLURM task per node (started by scripts/slurm/job.sh through srun): `accelerate launch` of this
# node's ranks, with the node's rank and the main node's address from the SLURM environment.
#
#   node.sh <train_stage1.py|train_stage2.py> --config <recipe config> [--set key=value ...]
#
# Environment: LAUNCH_CONFIG (accelerate launch file, default configs/accelerate/ddp.yaml), GPUS_PER_NODE
# (default 8), MAIN_PORT (default 29500); relative paths are taken from COORDEXP_REPO (the repository).
set -u
repo=${COORDEXP_REPO:?set by scripts/slurm/job.sh}
script=$1
shift
nodes=${SLURM_JOB_NUM_NODES:?run under srun}
node_rank=${SLURM_NODEID:?run under srun}
main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
per_node=${GPUS_PER_NODE:-8}
launch_config=${LAUNCH_CONFIG:-configs/accelerate/ddp.yaml}
case $launch_config in /*) ;; *) launch_config=$repo/$launch_config ;; esac
python -m accelerate.commands.launch --config_file "$launch_config" --num_machines "$nodes" \
  --machine_rank "$node_rank" --main_process_ip "$main_ip" --main_process_port "${MAIN_PORT:-29500}" \
  --num_processes $((nodes * per_node)) "$repo/$script" "$@" &
launcher=$!
# SIGTERM goes to the ranks themselves (the launcher's children): they agree at the next micro-step, save
# checkpoint-<step> of the last completed optimizer step and exit 143. Sent to the launcher it would kill
# ranks that are still saving 30 s later (torch elastic's grace period).
trap 'pkill -TERM -P "$launcher"' TERM
wait "$launcher"
rc=$?
while kill -0 "$launcher" 2>/dev/null; do  # `wait` returns early when the trap ran
  wait "$launcher"
  rc=$?
done
exit "$rc"
