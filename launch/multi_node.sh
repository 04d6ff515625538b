#!/usr/bin/env bash
# Run the same command on every node. Required: NNODES, NODE_RANK, MASTER_ADDR; RUN_DIR must be the
# same shared-filesystem path on every node (all ranks write checkpoints there).
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 RUN_DIR=/shared/runs/qwen3-8b-256k \
#     launch/multi_node.sh model=qwen3-8b parallel.cp=32 data.seq_len=262144
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${RUN_DIR:?set RUN_DIR}"
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 1)")}
# A restarted worker group must not reuse the dead group's rendezvous store: with the shared store
# (torch's default) restarted gloo/NCCL workers read stale peer addresses and fail or hang
# (pytorch/pytorch#135712, #167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
source "$(dirname "$0")/collectives.sh"  # collective timeouts and the flight recorder's dumps
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-$(basename "$RUN_DIR")}" \
  --max-restarts "${MAX_RESTARTS:-3}" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  -m trainer.train hydra.run.dir="$RUN_DIR" checkpoint.resume=auto "$@"
