#!/usr/bin/env bash
# Train on several machines: run this same command on every node (same RDZV_ID and RDZV_ENDPOINT).
#   NNODES=2 RDZV_ENDPOINT=node001:29400 RDZV_ID=kits23-a launch/multi_node.sh configs/ct_anisotropic.toml
# run.dir must be on a file system that every node sees (checkpoints are written by global rank 0 and read
# by all ranks on resume). A failed worker restarts the whole job (MAX_RESTARTS, default 3) from the latest
# checkpoint; NNODES=MIN:MAX allows an elastic node count.
# SIGTERM to torchrun (its process group, as `timeout` and shells send it, or torchrun alone): every rank
# stops after the same step with a checkpoint and exits 0, within TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
# (default 30; torchrun then SIGKILLs the ranks); torchrun itself then exits 1.
set -euo pipefail
config=${1:?usage: launch/multi_node.sh CONFIG [--set section.key=value ...]}
shift
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous (e.g. the first node, port 29400)}"
: "${RDZV_ID:?set RDZV_ID to a name unique to this job}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # a fresh TCP store per restart: torch 2.13 reuses the old one by default and on gloo every restart then fails
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m iunet3d train --config "$config" "$@"
