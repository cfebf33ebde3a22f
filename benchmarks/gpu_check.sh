#!/usr/bin/env bash
# The checks a CPU-only CI cannot make, in one run on any machine with an NVIDIA GPU (about 8 minutes on an H200):
#   1. bench_training on CUDA (bf16, channels_last, batch 128): the >= 0.90 x model-alone target,
#      for the pipeline ("toolkit") and for the training loop itself ("loop");
#   2. train.py --demo on CUDA: bf16 autocast, fused AdamW (no per-step host sync) against the
#      host-checked step, then torch.compile;
#   3. evaluate.py on CUDA (CUDA-event latency, gates), monitor_gpu.py --once (real NVML).
# Each step has its own time limit; a failing step is reported and the others still run.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # logs and JSON in OUT_DIR (default: gpu_check_out/)
#
# Install the requirements first (pip install -r requirements.txt). MLflow and W&B are switched off here.
set -u
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch, pydantic, timm" 2>/dev/null || { echo "install the requirements first: pip install -r requirements.txt" >&2; exit 2; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device visible to torch" >&2; exit 2; }

step() {  # step NAME SECONDS COMMAND...: run, keep the log, print its exit code and tail
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $?"
    grep -v "it/s\]" "$out/$name.log" | tail -n "${TAIL:-12}"
}

off="--set monitoring.mlflow.enabled=false --set monitoring.wandb.mode=disabled"
runs="$out/runs"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

step bench_training 300 python benchmarks/bench_training.py --device cuda --amp --channels-last \
    --batch-size 128 --batches 30 --repeats 5 --workers 4
tail -n 1 "$out/bench_training.log" >"$out/bench_training.json"

# The demo (64 px) on the GPU: images/s per epoch with the fused step and with the host-checked one.
step train_fused 150 python train.py --model resnet18 --demo --epochs 4 $off \
    --set train.output_dir="$runs/fused" --set performance.fused_optimizer=auto
step train_host_checked 150 python train.py --model resnet18 --demo --epochs 4 $off \
    --set train.output_dir="$runs/host" --set performance.fused_optimizer=false
step train_compiled 240 python train.py --model resnet18 --demo --epochs 2 $off \
    --set train.output_dir="$runs/compiled" --set performance.compile_model=true
grep -h "img/s" "$out"/train_*.log | sed 's/^ *//' >"$out/train_img_s.txt"

step evaluate 120 python evaluate.py --model resnet18 --demo --medical-validation \
    --checkpoint "$runs/fused/resnet18_outputs/best_model.pth" $off
step monitor 30 python monitor_gpu.py --once --save "$out/monitor.json"
