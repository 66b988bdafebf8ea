#!/usr/bin/env bash
# Train on one machine with every GPU (or N CPU processes):
#   launch/single_node.sh CONFIG [--set section.key=value ...]
#   NPROC=4 launch/single_node.sh configs/ct_anisotropic.toml --set run.dir=runs/a
# A worker that fails is restarted (MAX_RESTARTS, default 3) and the run resumes from its latest checkpoint.
# SIGTERM to torchrun (its process group, as `timeout` and shells send it, or torchrun alone): every rank
# stops after the same step with a checkpoint and exits 0, within TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (default 30; torchrun then SIGKILLs the ranks); torchrun itself then exits 1.
set -euo pipefail
config=${1:?usage: launch/single_node.sh CONFIG [--set section.key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
# Each restart gets a fresh TCP store; without it torch 2.13 on gloo fails every restart.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m iunet3d train --config "$config" "$@"
