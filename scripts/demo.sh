#!/usr/bin/env bash
# The whole job on the embedded sample, on the CPU (or this machine's GPU):
# shards -> train a tiny dVAE -> tokenize -> pretrain a tiny BEiT -> export -> inspect.
# tests/system/test_demo.py runs the beit-data commands of steps 1, 2, 3 and 5 as they are written
# here and holds the run to learning: its held-out top-1 beats always predicting the most common code.
set -euo pipefail
out=${1:-demo_out}
rm -rf "$out"
mkdir -p "$out"

echo "== 1/7 shards of the embedded photographs, in a seeded random order"
beit-data sample --out "$out/shards" --holdout 2 --holdout-out "$out/holdout"   # 12 to train on, 2 held out
python - "$out/shards" <<'PY'
import json, sys
from beit_data.shards import expand_shards, iter_samples
for shard in expand_shards(sys.argv[1])[:1]:
    for s in list(iter_samples(shard))[:4]:
        print(f"  {shard.name}  key {s.key}  <- {json.loads(s.members['json'])['source']}")
PY

echo "== 2/7 train the tiny dVAE tokenizer: 16 codes for 12 photographs (under a minute on two cores)"
beit-data train-dvae --shards "$out/shards" --out "$out/dvae_tiny.pt" --config tiny --vocab-size 16 --steps 150 \
    --batch-size 8

echo "== 3/7 tokenize: 20 views per image, the dVAE run once"
beit-data tokenize --shards "$out/shards" --tokenizer "$out/dvae_tiny.pt" --out "$out/tokens" --views 20
beit-data tokenize --shards "$out/holdout" --tokenizer "$out/dvae_tiny.pt" --out "$out/holdout_tokens" --views 1

echo "== 4/7 the training order: the first two batches pretrain will see (key/stored view)"
beit-data plan --shards "$out/shards" --tokens "$out/tokens" --batch-size 8 --epochs 2 --steps 1

echo "== 5/7 pretrain the tiny BEiT on the stored tokens, evaluated on the 2 held-out photographs"
beit-data pretrain --shards "$out/shards" --tokens "$out/tokens" --out "$out/run" \
    --model beit_mim_tiny_patch16_224 --steps 100 --batch-size 8 --warmup-steps 20 --lr 2e-3 --drop-path 0 \
    --log-every 10 --checkpoint-every 50 --val-shards "$out/holdout" --val-tokens "$out/holdout_tokens" --val-every 25
python - "$out/run/log.jsonl" <<'PY'
import json, sys
log = [r for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
print("loss curve: " + "  ".join(f"step {r['step']}: {r['loss']:.3f}" for r in log[:: max(1, len(log) // 6)] + log[-1:]))
print(f"training masked-token accuracy: {log[0]['acc']:.3f} at step {log[0]['step']}, {log[-1]['acc']:.3f} at step {log[-1]['step']}")
PY

echo "== 6/7 export the encoder as a folder timm fine-tunes as it is"
beit-data export "$out/run" --out "$out/encoder"
python - "$out/encoder" <<'PY'
import sys, timm
model = timm.create_model(f"local-dir:{sys.argv[1]}", pretrained=True, num_classes=10)
config = timm.data.resolve_data_config({}, model=model)
print(f"timm opened it with a new 10-class head; its input: {config['input_size']}, {config['interpolation']}, "
      f"mean {tuple(config['mean'])}, std {tuple(config['std'])}")
PY

echo "== 7/7 inspect the token files"
beit-data inspect "$out/tokens" --shards "$out/shards" --histogram "$out/token_histogram.png"
beit-data inspect "$out/tokens" --shards "$out/shards" --render 000000002 --view 0 \
    --tokenizer "$out/dvae_tiny.pt" --out "$out/view_000000002.png"  # the cat: the grass of 000000000 is grey

echo
echo "demo outputs in $out/:"
echo "  shards/, holdout/  WebDataset shards + .idx of 12 sample photographs, and of the 2 held out"
echo "  dvae_tiny.pt       the trained tokenizer (report: dvae_tiny.pt.report.json)"
echo "  tokens/            one token Parquet per shard + summary.json (holdout_tokens/: the held-out shard's)"
echo "  run/               pretrain checkpoint.pt, log.jsonl, tb/ (TensorBoard)"
echo "  encoder/           the encoder for timm: timm.create_model('local-dir:$out/encoder', pretrained=True, num_classes=N)"
echo "  view_000000002.png image, crop, tokens and reconstruction of one view"
echo "  token_histogram.png"
