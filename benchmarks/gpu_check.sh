#!/usr/bin/env bash
# The GPU check, run from the repo root on a machine with CUDA, DALI and webdataset importable.
# Writes one log per step under ${OUT:-gpu_out}; each step has its own time limit.
# STEPS="env gpu_tests ..." runs a subset.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
steps=${STEPS:-env gpu_tests stream_threads tokenizer tokenize pretrain pretrain_compiled tokenizer_compiled}
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "=== $name" | tee -a "$out/summary.txt"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -h '^{' "$out/$name.log" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log" | sed 's/^/    /' >> "$out/summary.txt"
  echo "    rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$out/summary.txt"
}
step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import torch, timm, nvidia.dali as d; print(torch.__version__, torch.version.cuda, timm.__version__, d.__version__)"'
step gpu_tests 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step stream_threads 120 python -m benchmarks.stream_threads --device cuda --images 2048 --batch-size 256 --batches 6 \
  --num-threads 8
step tokenizer 120 python -m benchmarks.tokenizer --device cuda --batch-size 256 --cudnn-benchmark
step tokenize 180 python -m benchmarks.tokenize_shards --device cuda --images 2048 --views 10 --batch-size 32 \
  --tokenizer-config dalle --num-threads 8
step pretrain 240 python -m benchmarks.pretrain --device cuda --model beit_mim_base_patch16_224 --batch-size 256 \
  --tokenizer-config dalle --images 2048 --workers 15 --num-threads 8 --steps 20 --warmup 5
step pretrain_compiled 240 python -m benchmarks.pretrain --device cuda --model beit_mim_base_patch16_224 \
  --batch-size 256 --tokenizer-config dalle --images 2048 --num-threads 8 --steps 20 --warmup 8 --compile \
  --skip-reference
step tokenizer_compiled 150 python -m benchmarks.tokenizer --device cuda --batch-size 256 --compile --cudnn-benchmark
cat "$out/summary.txt"
