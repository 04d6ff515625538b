#!/usr/bin/env bash
# Every GPU measurement of the project in one go, sized for a short lease on one GPU (about 10 minutes):
#   bash tools/gpu_session.sh [OUT_DIR]          # logs and JSON reports land in OUT_DIR (default: gpu_session)
# A compile smoke test first (the tiny model's compiled training step; if it fails, everything after runs eager,
# TORCHDYNAMO_DISABLE=1, and the log says so), then the scan and loss benchmarks, then ttt-gpu-check (tools.gpu.check) with the
# time that is left. Wheels in .whl/ (for a machine that cannot reach a package index) are installed first.
set -o pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_session}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TRITON_DEFAULT_FP_FUSION=1
budget=${GPU_SESSION_BUDGET_S:-570}
began=$(date +%s)
elapsed() { echo $(( $(date +%s) - began )); }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
timeout 150 python3 - <<'PY' 2>&1 | tail -5 | tee "$out/smoke.log"
import torch
from tools.gpu.check import build_training_step
from trainer.compose import one_process_job
from trainer.loop import setup_ranks
step, training = build_training_step(one_process_job("tiny", "ntp", 2048), setup_ranks(1))
for _ in range(3):
    step(2048)
torch.cuda.synchronize()
print("compile smoke test passed")
PY
grep -q "compile smoke test passed" "$out/smoke.log" || { export TORCHDYNAMO_DISABLE=1; echo "compile smoke test failed: eager from here" | tee -a "$out/smoke.log"; }
echo "smoke: $(elapsed) s"
timeout 110 python3 -m tools.bench.scan --out "$out/bench_scan.json" 2>&1 | tee "$out/bench_scan.log"
echo "bench_scan: $(elapsed) s"
timeout 75 python3 -m tools.bench.loss --repeats 3 --out "$out/bench_loss.json" 2>&1 | tee "$out/bench_loss.log"
echo "bench_loss: $(elapsed) s"
left=$(( budget - $(elapsed) ))
timeout "$left" python3 -m tools.gpu.check --budget-s $(( left - 25 )) --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
echo "total: $(elapsed) s"
