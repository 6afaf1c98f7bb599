#!/usr/bin/env bash
# The same `tunesmith train` and `generate` commands on CUDA, end to end (device machine).
#   run tool: command "bash bench/gpu_smoke.sh", carry ["test-artifacts/bench-gpu"] (made by `bench/gpu.sh prepare`)
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=test-artifacts/bench-gpu
OUT=${OUT:-/tmp/gpu-smoke-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TUNESMITH_HOME=/tmp/tunesmith-home
MODEL=/tmp/smollm2-135m-random
python3 - "$ASSETS/model" "$MODEL" <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
for f in src.iterdir():
    if not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
PY
{
  python3 -m tunesmith.cli train "$ASSETS/sherlock.txt" --base "$MODEL" --out /tmp/run --epochs 1 --max-steps 40 \
    --block-size 512 --batch-size 8 --prompt "It was a dark night"
  python3 -m tunesmith.cli generate /tmp/run "It was a dark night" --max-tokens 40 --seed 1
  python3 -m tunesmith.cli generate /tmp/run "It was a dark night" --max-tokens 40 --seed 1
  python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/run/metrics.jsonl")]
train = [r for r in rows if "training_loss" in r]
print("device run:", json.load(open("/tmp/run/status.json"))["status"], "steps", len(train),
      "loss", round(train[0]["training_loss"], 3), "->", round(train[-1]["training_loss"], 3),
      "tokens/s", round(train[-1]["tokens_per_second"]))
PY
} 2>&1 | tee "$OUT/gpu-smoke.log"
cp /tmp/run/loss.png /tmp/run/samples.md /tmp/run/README.md "$OUT/" || true
