#!/usr/bin/env bash
# One node, NPROC processes (default: all GPUs, or 2 on CPU), restarted up to MAX_RESTARTS times;
# a restarted job resumes from its latest complete checkpoint.
#   launch/single_node.sh model=qwen3-0.6b parallel.cp=8 data.seq_len=131072
set -euo pipefail
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
RUN_DIR=${RUN_DIR:-runs/$(date +%Y-%m-%d_%H-%M-%S)}
# A restarted worker group must not reuse the dead group's rendezvous store: with the shared store
# (torch's default) restarted gloo/NCCL workers read stale peer addresses and fail or hang
# (pytorch/pytorch#135712, #167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
source "$(dirname "$0")/collectives.sh"  # collective timeouts and the flight recorder's dumps
exec torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-3}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
  -m trainer.train hydra.run.dir="$RUN_DIR" checkpoint.resume=auto "$@"
