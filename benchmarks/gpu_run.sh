#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool): correctness checks, then the benchmarks
# with --device cuda. Results land in benchmarks/results/*_gpu.* and, packed, in $OUT.
set -u
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, transformers, safetensors; import peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/env.txt"
run() { echo "== $*"; timeout "$1" "${@:2}" 2>&1 | grep -vE "Warning|warn" | tail -40; }
run 120 python3 -m benchmarks.gpu_check cuda
run 120 python3 -m benchmarks.bench_train --device cuda --quick --reps 10
run 150 python3 -m benchmarks.bench_train --device cuda --quick --reps 10 --dtype bfloat16
run 90 python3 -m benchmarks.bench_infer --device cuda --reps 20 --dtype bfloat16
run 40 python3 -m benchmarks.bench_adapters --device cuda
run 120 python3 -m benchmarks.bench_multi_adapter --device cuda --dtype bfloat16 --reps 10
tar -czf "$OUT/results_gpu.tgz" benchmarks/results/*_gpu* 2>/dev/null
ls -la benchmarks/results/
