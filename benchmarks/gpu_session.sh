#!/usr/bin/env bash
# Everything a lent GPU machine should run, as one command (see docs/performance.md):
# build the CUDA extension, run the GPU tests (compiled Triton kernels, CUDA masking, CUDA graphs, bf16), then
# the full performance report and its charts, then the model's training and inference eager and compiled
# (torch.compile "reduce-overhead": CUDA graphs) side by side with the reference row. Results go to $OUT (the
# device tool's folder) or benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr -s _)"
NAME="${NAME:-run_all_$GPU}"
mkdir -p "$OUT"
python -m pip install -q -e ".[dev]" --no-build-isolation 2>&1 | tail -3
TRITON_INTERPRET=0 python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python benchmarks/run_all.py --device cuda --out "$OUT/$NAME.json"
python benchmarks/plot.py "$OUT/$NAME.json"
python benchmarks/bench_model.py --device cuda --compile --out "$OUT/model_compile_$GPU.json"
