#!/usr/bin/env bash
# The GPU check, run from the repo root on a machine with CUDA, DALI and webdataset importable.
# Writes one log per step under ${OUT:-gpu_out}; each step has its own time limit, and the limits
# add up to 12 minutes. The last line is one JSON object with every figure and the ratios the
# targets are stated in (see BENCHMARKS.md). STEPS="env gpu_tests ..." runs a subset.
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
: > "$out/summary.txt"
# The default steps' limits add up to 12 minutes; pretrain (eager, with the reference), pretrain_512,
# pretrain_flex_fused, vqkd, tokenize_vqkd, views and tokenize_engines are named in STEPS for a second call.
steps=${STEPS:-env gpu_tests tokenize_compiled pretrain_compiled profile memory}
B="--device cuda --model beit_mim_base_patch16_224 --batch-size 256 --tokenizer-config dalle --num-threads 8"
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
step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import torch, timm, nvidia.dali as d; print(torch.__version__, torch.version.cuda, timm.__version__, d.__version__)";
  git log -1 --format=%H 2>/dev/null || true'
step gpu_tests 150 python -m pytest -q -p no:cacheprovider -m gpu tests/system/test_gpu.py
# Item 2: tokenize end to end with the compiled tokenizer, 10 views, against the compiled tokenizer alone.
step tokenize_compiled 120 python -m benchmarks.tokenize_shards --device cuda --images 2048 --views 10 \
  --batch-size 32 --tokenizer-config dalle --num-threads 8 --compile --imagenet-like
# Item 1: ImageNet-like JPEGs; model only, end to end, the reference recipe and its loader alone.
step pretrain 120 python -m benchmarks.pretrain $B --imagenet-like --images 2048 --workers 15 --steps 20 --warmup 5 \
  --reference-loader
step pretrain_compiled 120 python -m benchmarks.pretrain $B --imagenet-like --images 2048 --steps 20 --warmup 8 \
  --compile --skip-reference --skip-online
step pretrain_512 60 python -m benchmarks.pretrain $B --images 2048 --steps 20 --warmup 5 --skip-reference --skip-online
# Issue 27 item 1: where the end-to-end step's time goes (torch.profiler over 5 compiled steps, every
# kernel of the process: the model's, DALI's, and the copies).
step profile 120 python -m benchmarks.pretrain $B --imagenet-like --images 2048 --steps 10 --warmup 8 \
  --compile --skip-reference --skip-online --profile 5
# Item 4: the faster step, compiled: FlexAttention for the bias, fused AdamW, CUDA graphs.
step pretrain_flex_fused 120 python -m benchmarks.pretrain $B --images 1024 --steps 20 --warmup 8 --compile \
  --flex-attention --fused-adamw --compile-mode max-autotune-no-cudagraphs --skip-reference --skip-online
# Issue 13 (not in the default steps): BEiT v2's VQ-KD, eager and compiled, and the online reference's cost.
step vqkd 150 python -m benchmarks.tokenizer --tokenizer vqkd --device cuda --batch-size 256 --compile
step tokenize_vqkd 150 python -m benchmarks.tokenize_shards --device cuda --images 1024 --views 10 \
  --batch-size 32 --tokenizer-config vqkd --num-threads 8 --compile
# Issue 37 (not in the default steps): views/s of the plain engine against one Ray actor on one GPU,
# on the same 16 shards of 128 photographs each, with Ray's fixed cost and cost a shard (needs the ray extra).
step tokenize_engines 240 python -m benchmarks.tokenize_engines --device cuda --images 2048 --shards 16 --views 10 \
  --batch-size 32 --tokenizer-config dalle --num-threads 8 --workers 1
# Issue 25 (not in the default steps): the views ablation on the GPU, twice the CPU run's steps:
# V in 1, 2, 5, 10, 20 and online targets, the tiny model on the embedded photographs.
step views 420 python -m benchmarks.views --device cuda --steps 4000 --val-every 250
# Item 3: memory over 2,000 steps of the real trainer.
step memory 180 python -m benchmarks.memory --device cuda --model beit_mim_base_patch16_224 --batch-size 64 \
  --steps 2000
python - "$out/summary.txt" <<'PY'
import json, sys
runs = {}
name = None
for line in open(sys.argv[1]):
    if line.startswith("=== "):
        name = line[4:].strip()
    elif line.startswith("{") and name:
        runs[name] = json.loads(line)
def ratio(a, b):
    return round(a / b, 3) if a and b else None
p, c, t = runs.get("pretrain", {}), runs.get("pretrain_compiled", {}), runs.get("tokenize_compiled", {})
f = runs.get("pretrain_flex_fused", {})
print(json.dumps({"figures": runs, "ratios": {
    "pretrain_e2e_over_model_eager (>=0.97)": p.get("end_to_end_over_model_only"),
    "pretrain_e2e_over_model_compiled (>=0.97)": c.get("end_to_end_over_model_only"),
    "pretrain_e2e_over_reference (>=2.0)": p.get("end_to_end_over_reference"),
    "tokenize_e2e_over_tokenizer_compiled (>=0.90)": t.get("steady_ratio"),
    "imagenet_10_views_minutes (<30)": t.get("imagenet_10_views_minutes"),
    "flex_fused_over_compiled_model_only": ratio(f.get("model_only_img_per_s"), c.get("model_only_img_per_s")),
    "compiled_model_only_over_3700": ratio(c.get("model_only_img_per_s"), 3700)}}))
PY
