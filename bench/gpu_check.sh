#!/usr/bin/env bash
# bench/gpu_check.sh: the real training path on ONE CUDA GPU, with PyTorch and transformers only.
#
# NOT YET RUN ON A GPU: this project's machines have none. Its CPU mode (`--cpu`: the same
# commands, tiny sizes) is what was run here. Expect to fix small things on the first GPU run.
#
# What it does (sized to finish within 10 minutes on one GPU: an estimate, never measured; no
# vLLM there: sampling.Sampler falls back to transformers.generate, forced with MRT_SAMPLER=hf so it
# is the same where vLLM is installed):
#   1. a toy base: runs/toy/base if built, else a tiny one (toy.py --preset tiny)
#   2. the realistic-shape model (tests/realistic.py: Llama-3 vocabulary 128,256, 1,048,576
#      positions and bf16 in its config, Llama-3 chat template), fitted briefly from that base
#   3. grpo.py --preset paper (MRT-B, beta 0.04: a reference model; lr 1e-6) on it, --dtype auto
#      (bf16 compute on GPU), killed after its checkpoint half way, then --resume to the end
#   4. prints step time, sampling and training time and tokens/s from metrics.jsonl
#
# Run:   bash bench/gpu_check.sh            # on a machine with one CUDA GPU
#        bash bench/gpu_check.sh --cpu      # the same commands on CPU, tiny sizes (a check of the script)
# Output: runs/gpu_check/ (OUT=... to change), the report on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-runs/gpu_check}
export MRT_SAMPLER=hf
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$SECONDS

if [ "$MODE" = gpu ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA GPU visible to torch (run with --cpu to check the script on CPU)" >&2; exit 2; }
  "$PY" -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
  # half the steps, then a resume to the end; sizes keep transformers.generate within the budget
  HALF=2; P=4; G=4; MB=8; MAXTOK=128; EVAL=16; EVALS=2; MU=4
else
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  HALF=1; P=2; G=2; MB=2; MAXTOK=24; EVAL=2; EVALS=1; MU=2
fi
STEPS=$((2 * HALF))

# 1. toy base
if [ -f runs/toy/base/build.json ]; then
  TOY=runs/toy
else
  TOY=$OUT/toy-tiny
  [ -f "$TOY/base/build.json" ] || "$PY" toy.py --preset tiny --out "$TOY" --eval-samples 0 --n-train 2000 --n-test 64
fi
echo "toy base: $TOY/base ($((SECONDS - T0)) s)"

# 2. realistic-shape model
MODEL=$("$PY" tests/realistic.py --out "$OUT/realistic" --base "$TOY/base" | tail -1)
echo "realistic-shape model: $MODEL ($((SECONDS - T0)) s)"

# 3. grpo: killed after its checkpoint at step HALF (the only one before the end), then resumed
RUN=$OUT/grpo
rm -rf "$RUN"
FLAGS=(--model "$MODEL" --train-data "$TOY/data/train.jsonl" --test-data "$TOY/data/test.jsonl" --out "$RUN"
       --preset paper --steps "$STEPS" --prompts-per-step "$P" --group-size "$G" --micro-batch-size "$MB"
       --max-tokens "$MAXTOK" --eval-problems "$EVAL" --eval-samples "$EVALS" --mu-samples "$MU"
       --save-every "$HALF" --dtype auto)
"$PY" grpo.py "${FLAGS[@]}" &
PID=$!
while kill -0 "$PID" 2>/dev/null; do
  if grep -q "\"step\": $HALF," "$RUN/metrics.jsonl" 2>/dev/null && compgen -G "$RUN/checkpoint*" >/dev/null; then
    sleep 2  # the checkpoint is written after the metrics line; let it land
    kill -9 "$PID"
    break
  fi
  sleep 0.2
done
wait "$PID" || true
compgen -G "$RUN/checkpoint*" >/dev/null || { echo "error: no checkpoint after step $HALF" >&2; exit 1; }
echo "killed after the step-$HALF checkpoint ($((SECONDS - T0)) s)"
"$PY" grpo.py "${FLAGS[@]}" --resume
echo "resumed to $STEPS steps ($((SECONDS - T0)) s)"

# 4. report
"$PY" - "$RUN" "$STEPS" <<'EOF'
import json, sys

run, steps = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
got = [r["step"] for r in rows]
if got != list(range(1, steps + 1)):
    sys.exit(f"error: metrics.jsonl has steps {got}, expected 1..{steps} (resume broken?)")
mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
print(f"steps {steps} (resumed at {steps // 2}): step time {mean('time_step'):.2f} s "
      f"(sampling {mean('time_sample'):.2f} s, training {mean('time_train'):.2f} s), "
      f"sampling {mean('tokens_per_s'):.0f} tokens/s, logprob gap {max(r['logprob_gap'] for r in rows):.2e}, "
      f"accuracy {[round(r['accuracy'], 3) for r in rows]}")
print("held-out accuracy:", json.load(open(f"{run}/eval.json")))
EOF
echo "gpu_check ($MODE) done in $((SECONDS - T0)) s"
