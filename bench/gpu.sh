#!/usr/bin/env bash
# A short CUDA benchmark (training tokens/s tunesmith vs HF Trainer, generation tokens/s), for the
# device machine (one H100/H200, torch and transformers installed, nothing downloadable).
#
#   bench/gpu.sh prepare      # here: copy config, tokenizer and corpus (~4 MB) into test-artifacts/bench-gpu
#   run tool: command "bash bench/gpu.sh", carry ["test-artifacts/bench-gpu"], timeout_s 600
#
# The 540 MB checkpoint cannot travel (64 MiB limit), so the GPU run uses SmolLM2-135M's exact
# architecture with seeded random weights: speed is the same, and both sides start from the same
# weights, so their losses still compare (the absolute loss is that of a random model).
# Writes $OUT/gpu.md, $OUT/gpu.json, $OUT/nvidia-smi.txt and $OUT/log.txt; ~6-9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=test-artifacts/bench-gpu

if [ "${1:-}" = prepare ]; then
  mkdir -p "$ASSETS/model"
  .venv/bin/python - "$ASSETS" <<'PY'
import shutil, sys
from pathlib import Path
from tunesmith.models import resolve
src, dst = resolve("smollm2-135m"), Path(sys.argv[1])
for f in src.iterdir():
    if f.suffix != ".safetensors" and f.name != "tunesmith-source.json":
        shutil.copy2(f, dst / "model" / f.name)
shutil.copy2(Path("../shared/corpora/sherlock.txt"), dst / "sherlock.txt")
print("prepared", dst, sorted(p.name for p in (dst / "model").iterdir()))
PY
  exit 0
fi

OUT=${OUT:-/tmp/bench-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TUNESMITH_HOME=/tmp/tunesmith-home
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
MODEL=/tmp/smollm2-135m-random
python3 - "$ASSETS/model" "$MODEL" <<'PY' 2>&1 | tee "$OUT/log.txt"
import shutil, sys, torch, transformers, peft
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      torch.cuda.get_device_name(0))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
for f in src.iterdir():
    if not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
PY
timeout 540 python3 bench/run.py --device cuda --model "$MODEL" --corpus "$ASSETS/sherlock.txt" \
  --steps "${STEPS:-12}" --warmup 2 --repeats 3 --only peaks --only train --only generate --results "$OUT" --name gpu \
  --weights-note "random (seeded) weights in SmolLM2-135M's architecture: the checkpoint cannot travel to the GPU machine" \
  2>&1 | tee -a "$OUT/log.txt"
