#!/usr/bin/env bash
# The GPU check: the Graft engine against TRL's SFTTrainer (baseline (b) of
# bench/trainer_realistic.py) on a Qwen2.5-1.5B-shaped model with random weights (vocab 151,936,
# hidden 1536, 28 layers, 12/2 heads, intermediate 8960, tied), LoRA r16 on every linear layer
# and QLoRA (nf4, double quantization, bf16 compute), completion-only instruction data, bf16.
# Reports tokens/s, MFU (against a bf16 matrix product measured in the same run and against
# the GPU's nominal dense bf16 peak) and peak GPU memory, as one JSON object.
#
#   bench/gpu_check.sh             # on one H100/H200: < 8 minutes, no network
#   bench/gpu_check.sh --dry-run   # on the CPU, tiny shapes (seconds): what `make test` runs
#
# Needs torch (CUDA build), transformers, peft, accelerate, bitsandbytes, trl and this
# repository's packages (operator/ and trainer-image/ on PYTHONPATH, set below). Where trl or
# bitsandbytes are missing on the GPU machine they travel as wheels beside the tree
# (GRAFT_WHEELS=dir: installed with --no-index before the run). Writes $OUT/gpu_check.json
# when OUT is set (the device tool's output folder), else $TMPDIR or /tmp.
#
# Goals (issue 19): LoRA MFU >= 40%, QLoRA peak memory <= 0.45x LoRA's, engine >= 1.5x (b).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$here/operator:$here/trainer-image:$here${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

if [[ -n "${GRAFT_WHEELS:-}" ]]; then
    "$py" -m pip install --no-index --find-links "$GRAFT_WHEELS" trl bitsandbytes >&2
fi

out="${OUT:-${TMPDIR:-/tmp}}/gpu_check.json"
if [[ "${1:-}" == "--dry-run" ]]; then
    # Same code path, CPU, tiny shapes: the script and its Python cannot rot.
    exec "$py" bench/trainer_realistic.py --smoke --device cpu --models qwen1.5b \
        --methods lora,qlora --contenders trl,graft --json "$out"
fi

"$py" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (use --dry-run on a CPU)")
print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__, file=sys.stderr)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >&2 || true
# 7 minutes at most for the four runs (model built once on the GPU, ~6 GB written to the
# temporary folder, each contender a fresh process: ~20 s to load, 16 steps of 8 records)
exec timeout 420 "$py" bench/trainer_realistic.py --device cuda --precision auto \
    --models qwen1.5b --methods lora,qlora --contenders trl,graft \
    --steps 16 --batch 8 --records 512 --json "$out"
