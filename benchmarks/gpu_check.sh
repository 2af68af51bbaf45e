#!/usr/bin/env bash
# The prepared GPU check: lede at the paper's scale in one command (no network).
#
#   bash benchmarks/gpu_check.sh                                # facebook/layerskip-llama3.2-1B, cuda, bf16
#   MODEL=/models/layerskip-llama2-7B bash benchmarks/gpu_check.sh
#   MODEL=smollm2-135m-instruct HEAD_KIND=affine bash benchmarks/gpu_check.sh   # no checkpoint at hand: the embedded model
#   DEVICE=cpu MODEL=/tmp/tiny QUICK=1 bash benchmarks/gpu_check.sh   # CPU, tiny model (its own test)
#
# Stages, each a lede command (printed before it runs, timed into the JSON):
#   1. greedy traces of the training and held-out prompts (logit-lens exits: LayerSkip
#      checkpoints are trained for early exit), the cost profile measured on the device;
#   2. a Minari dataset from the trace env; 3. a short offline-RL run; 4. export;
#   5. wall clock on held-out prompts, same process, methods interleaved prompt by prompt:
#      AR (lede's loop), transformers generate, the best static (E, K) on training traces, the
#      model card's static (E, K), the agent, the oracle replay, and transformers'
#      assistant_early_exit (LayerSkip's static self-speculation in transformers);
#   6. $OUT/gpu_check.json: speedups vs AR, tokens/round, acceptance, output identical to AR,
#      the teacher-forced greedy-equivalence check (bf16), stage times, device and versions.
#
# Settings (environment variables): MODEL, DEVICE (cuda), DTYPE (auto: bf16 on CUDA), OUT
# (runs/gpu_check), TRAIN_PROMPTS, EVAL_PROMPTS, CALIB_PROMPTS, MAX_NEW_TOKENS, EXITS (default
# every 2nd layer), K_MAX, HEAD_KIND (lens), DRAFT_VOCAB, EPISODES, STEPS, ALGO, HF_EXITS
# (comma-separated assistant_early_exit layers; default the model card's exit, else L/4),
# QUICK=1 (a few prompts and steps: the CPU test), LEDE (the lede executable), PY (python).
# Sized to finish in under 8 minutes on one H100/H200 for a 1B model (see docs/gpus.md).
set -euo pipefail
cd "$(dirname "$0")/.."

LEDE=${LEDE:-.venv/bin/lede}
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-facebook/layerskip-llama3.2-1B}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-auto}
OUT=${OUT:-runs/gpu_check}
if [[ "${QUICK:-0}" == 1 ]]; then
  TRAIN_PROMPTS=${TRAIN_PROMPTS:-humaneval[0:4]}; EVAL_PROMPTS=${EVAL_PROMPTS:-humaneval[24:26]}
  CALIB_PROMPTS=${CALIB_PROMPTS:-humaneval[100:102]}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-16}
  EPISODES=${EPISODES:-12}; STEPS=${STEPS:-50}
fi
TRAIN_PROMPTS=${TRAIN_PROMPTS:-humaneval[0:24]}
EVAL_PROMPTS=${EVAL_PROMPTS:-humaneval[24:40]}
CALIB_PROMPTS=${CALIB_PROMPTS:-humaneval[100:116]}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-96}
EXITS=${EXITS:-}
K_MAX=${K_MAX:-8}
HEAD_KIND=${HEAD_KIND:-lens}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}
EPISODES=${EPISODES:-300}
STEPS=${STEPS:-3000}
ALGO=${ALGO:-discrete_cql}

export LEDE_DEVICE="$DEVICE" LEDE_DTYPE="$DTYPE" TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MINARI_DATASETS_PATH="$OUT/minari"
rm -rf "$MINARI_DATASETS_PATH" "$OUT/train" "$OUT/policy" "$OUT/eval" "$OUT/timings.jsonl"

# Baselines from the model card (LayerSkip checkpoints) or L/4: hf-early-exit:E[,static:E,K]
BASELINES=$("$PY" - "$MODEL" "${HF_EXITS:-}" <<'EOF'
import sys
from transformers import AutoConfig
from lede_env.model import layerskip_card, resolve_model_path
model, hf_exits = sys.argv[1], sys.argv[2]
try:  # fail fast, before any stage, when the model is not on this machine
    L = AutoConfig.from_pretrained(resolve_model_path(model)).num_hidden_layers
except (OSError, FileNotFoundError) as e:
    sys.exit(f"gpu_check: model {model!r} is not on this machine ({type(e).__name__}). Download it where there is "
             "network (gated LayerSkip checkpoints: accept the licence first), e.g. `hf download "
             "facebook/layerskip-llama3.2-1B --local-dir DIR`, then MODEL=DIR; or run on the embedded model: "
             "MODEL=smollm2-135m-instruct HEAD_KIND=affine.")
card = layerskip_card(model)
names = []
if hf_exits:
    names += [f"hf-early-exit:{int(e)}" for e in hf_exits.split(",") if e.strip()]
elif card:
    names.append(f"hf-early-exit:{card['exit_layer']}")
else:
    names.append(f"hf-early-exit:{max(1, L // 4)}")
if card and card["speculation_length"]:
    names.append(f"static:{card['exit_layer']},{card['speculation_length']}")
print(",".join(names))
EOF
)

COMMON=(--model "$MODEL" --max-new-tokens "$MAX_NEW_TOKENS" --head-kind "$HEAD_KIND" --draft-vocab "$DRAFT_VOCAB"
        --calib-prompts "$CALIB_PROMPTS")
[[ -n "$EXITS" ]] && COMMON+=(--exits "$EXITS")
DATASET_ID="lede/$("$PY" -c 'import sys; from agents.store import dataset_model_name; print(dataset_model_name(sys.argv[1]))' "$MODEL")/gpu-check-mixed-v0"

stage() {  # stage NAME CMD...: run, print and time one stage
  local name=$1; shift
  echo "+ $*" >&2
  local t0; t0=$(date +%s.%N)
  "$@"
  local t1; t1=$(date +%s.%N)
  "$PY" -c 'import json,sys; print(json.dumps({"stage": sys.argv[1], "seconds": round(float(sys.argv[3]) - float(sys.argv[2]), 2), "command": sys.argv[4:]}))' \
    "$name" "$t0" "$t1" "$@" >> "$OUT/timings.jsonl"
}

T_START=$(date +%s.%N)
stage traces_train "$LEDE" traces build "${COMMON[@]}" --prompts "$TRAIN_PROMPTS"
stage traces_eval "$LEDE" traces build "${COMMON[@]}" --prompts "$EVAL_PROMPTS"
stage collect "$LEDE" collect --dataset-id "$DATASET_ID" --episodes "$EPISODES" "${COMMON[@]}" \
  --prompts "$TRAIN_PROMPTS" --k-max "$K_MAX"
stage train "$LEDE" train --dataset-id "$DATASET_ID" --algo "$ALGO" --steps "$STEPS" --eval-prompts "$EVAL_PROMPTS" \
  --out "$OUT/train" --wandb disabled
stage export "$LEDE" export --run-dir "$OUT/train" --out "$OUT/policy" --no-onnx
stage evaluate "$LEDE" evaluate --policies "ar,hf,static:best,$BASELINES,agent:$OUT/policy,oracle" \
  --prompts "$EVAL_PROMPTS" --train-prompts "$TRAIN_PROMPTS" "${COMMON[@]}" --k-max "$K_MAX" \
  --out "$OUT/eval" --wandb disabled --no-plots
T_END=$(date +%s.%N)

"$PY" benchmarks/gpu_check_summary.py --out "$OUT" --model "$MODEL" --seconds "$("$PY" -c "print(round($T_END - $T_START, 1))")"
