#!/usr/bin/env bash
# The main job on the embedded sample, as far as the stages go: shards -> (later stages).
set -euo pipefail
out=${1:-demo_out}
rm -rf "$out"
mkdir -p "$out"
beit-data sample --out "$out/shards"
echo
echo "demo outputs:"
echo "  shards: $out/shards"
