# Sourced by single_node.sh and multi_node.sh (RUN_DIR set): what a hung collective leaves behind.
# NCCL's watchdog fails a collective that waits longer than parallel.timeout_minutes (default 30; the trainer
# passes it to init_process_group) and tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=3), so torchrun
# restarts the group from the last checkpoint instead of hanging until the job's time limit. Before that, the
# flight recorder dumps each rank's last collectives (TORCH_FR_BUFFER_SIZE of them) to
# $RUN_DIR/nccl_trace/rank_<r>; `python -m torch.distributed.flight_recorder.fr_trace $RUN_DIR/nccl_trace` says which
# rank stopped where. Every variable keeps a value already set in the environment.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$RUN_DIR/nccl_trace/rank_}
mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"
