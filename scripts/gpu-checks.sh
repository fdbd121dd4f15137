#!/usr/bin/env bash
# The checks that need a GPU, in one short run (about 6 minutes on one H200):
#
#   1. the CUDA tests: tests/test_cuda.py (CPU vs GPU forward, loss, gradients, every sampler,
#      the sample CLI, exact resume on CUDA, compiled bf16 training, torchrun) and
#      tests/test_timesteps.py::test_cuda;
#   2. a bf16 training step of PFT-XL/2 vs SiT-XL/2 (ImageNet-256 latents 4x32x32, 1000 classes,
#      batch 32 per GPU) as a share of the GPU's bf16 matmul peak measured in the same run
#      (benchmarks/train_speed.py);
#   3. a bf16 training step of the paper's text-to-image preset, PFT-T2I-1.2B vs SiT-T2I-1.2B
#      (FLUX.2 latents 32x32x32, 256 caption tokens of width 2048, batch 32) with its share of
#      the peak (benchmarks/t2i_step.py);
#   4. sampling throughput of PFT-B/2 in bf16: one network call per variant and whole sampler
#      runs at equal NFE (benchmarks/inference_step.py);
#   5. torch.compile of the training step, PFT-B/2 vs SiT-B/2 (benchmarks/train_speed.py).
#
# Each part has its own time limit and its own log, so one failure does not hide the others.
#
# Usage:  scripts/gpu-checks.sh [OUTDIR]        (default gpu-checks/; needs CUDA and the package
#         importable, e.g. `pip install -e .` or PYTHONPATH=src)
# Environment: PYTHON (default python3).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to OUT_DIR/NAME.log, report the status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n 40 "$OUT_DIR/$name.log"
    echo "$name $rc $((SECONDS - t0))" >>"$OUT_DIR/status.txt"
}

: >"$OUT_DIR/status.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT_DIR/gpu.txt" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
    >>"$OUT_DIR/gpu.txt" 2>&1
cat "$OUT_DIR/gpu.txt"

part tests 200 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py "tests/test_timesteps.py::test_cuda"
part train-xl 120 "$PY" benchmarks/train_speed.py --model PFT-XL/2 --channels 4 --num-classes 1000 \
    --batch-size 32 --variants fp32,bf16,bf16+fused --repeats 5 --gemm-size 8192 --markdown
part t2i-1.2b 120 "$PY" benchmarks/t2i_step.py --size 1.2B --channels 32 --text-dim 2048 --text-len 256 \
    --batch-size 32 --device cuda --dtype bf16 --repeats 5 --train-repeats 5 --gemm-size 8192 --markdown
part sampling 60 "$PY" benchmarks/inference_step.py --device cuda --dtype bf16 --model-size B --batch-size 64 \
    --nfe 40 --sampler-batch 64 --markdown
part compile-b 90 "$PY" benchmarks/train_speed.py --model PFT-B/2 --channels 4 --num-classes 1000 \
    --batch-size 64 --variants bf16,bf16+fused,bf16+fused+compile --repeats 5 --gemm-size 8192 --markdown
echo "=== status (part, exit code, seconds):"
cat "$OUT_DIR/status.txt"
