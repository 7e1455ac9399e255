#!/usr/bin/env bash
# bench/gpu_check.sh: the real training path on ONE CUDA GPU, under torchrun with a real NCCL group.
#
# NOT YET RUN ON A GPU: this project's machines have none. Its CPU mode (`--cpu`: the same
# commands, tiny sizes, gloo in place of NCCL) is what was run here. Expect to fix small things
# on the first GPU run.
#
# What it does (sized to finish within 10 minutes on one GPU: an estimate, never measured):
#   1. collectives: `torchrun --nproc_per_node 1` starts an NCCL group of one (utils.init_distributed:
#      device_id, long timeout); utils.all_reduce / broadcast_ get CPU tensors, as the stages hand
#      them, and must put them on the GPU; --dtype auto must give bf16 (fp16 on a GPU without it)
#   2. a toy base: runs/toy/base if built, else a tiny one (toy.py --preset tiny)
#   3. warmstart.py under torchrun --nproc_per_node 1: beam search on a vLLM engine (sleep mode on
#      CUDA; transformers.generate where vLLM is not installed), then SFT in the same process with
#      the engine asleep and still referenced; its summary must show the SFT's world and the model
#   4. the realistic-shape model (tests/realistic.py: Llama-3 vocabulary 128,256, 1,048,576
#      positions and bf16 in its config, Llama-3 chat template), fitted briefly from that base
#   5. grpo.py --preset paper (MRT-B, beta 0.04: a reference model; lr 1e-6) on it under
#      torchrun --nproc_per_node 1, --dtype auto, with the transformers sampler (MRT_SAMPLER=hf:
#      the same where vLLM is installed), killed after its checkpoint half way, then --resume to
#      the end; its per-step token count goes through NCCL (grpo.policy_update)
#   6. prints what it verified, step time, sampling and training time and tokens/s
# Not covered: several GPUs (FSDP2 sharding over NCCL), the 3B/8B models, vLLM weight sync in grpo.
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
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
OUT=${OUT:-runs/gpu_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MRT_VLLM_EAGER=${MRT_VLLM_EAGER:-1}  # no torch.compile: a short check
T0=$SECONDS
VERIFIED=()

if [ "$MODE" = gpu ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA GPU visible to torch (run with --cpu to check the script on CPU)" >&2; exit 2; }
  "$PY" -c "import torch; print('gpu:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
  # half the steps, then a resume to the end; sizes keep transformers.generate within the budget
  HALF=2; P=4; G=4; MB=8; MAXTOK=128; EVAL=16; EVALS=2; MU=4; WS_PROBLEMS=16
  BACKEND=nccl
else
  export CUDA_VISIBLE_DEVICES=""
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  HALF=1; P=2; G=2; MB=2; MAXTOK=24; EVAL=2; EVALS=1; MU=2; WS_PROBLEMS=8
  BACKEND=gloo
fi
STEPS=$((2 * HALF))
mkdir -p "$OUT"

# 1. collectives on the real backend, from CPU tensors
cat > "$OUT/collectives.py" <<'EOF'
import sys

import torch
import torch.distributed as dist

import utils

rank, world, device = utils.init_distributed()
backend = dist.get_backend()
want = sys.argv[1]
if backend != want or world != 1:
    sys.exit(f"error: expected a {want} group of 1 under torchrun, got {backend} of {world}")
n = utils.all_reduce(torch.tensor(7.0))  # a CPU tensor, as grpo.policy_update's token count
if n.device.type != "cpu" or n.item() != 7.0:
    sys.exit(f"error: all_reduce gave {n} on {n.device}")
t = torch.arange(3.0)
utils.broadcast_(t, src=0)
dtype = utils.torch_dtype("auto", device)
bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
print(f"collectives: {backend} group of 1, device {utils.collective_device()}, all_reduce and broadcast of CPU "
      f"tensors ok; --dtype auto on {device}: {dtype} (bf16 supported: {bf16})")
EOF
LINE=$("${TORCHRUN[@]}" "$OUT/collectives.py" "$BACKEND" | grep "^collectives:")
echo "$LINE"
VERIFIED+=("$LINE")

# 2. toy base
if [ -f runs/toy/base/build.json ]; then
  TOY=runs/toy
else
  TOY=$OUT/toy-tiny
  [ -f "$TOY/base/build.json" ] || "$PY" toy.py --preset tiny --out "$TOY" --eval-samples 0 --n-train 2000 --n-test 64
fi
echo "toy base: $TOY/base ($((SECONDS - T0)) s)"

# 3. warmstart: search, then SFT in the same process (the engine asleep through it)
WS=$OUT/warmstart
rm -rf "$WS"
"${TORCHRUN[@]}" warmstart.py --model "$TOY/base" --data "$TOY/data/train.jsonl" --out "$WS" --preset toy \
  --problems "$WS_PROBLEMS" --beam-width 2 --expansions 2 --rollouts 2 --attempts 2 --search-batch 8 \
  --epochs 1 --batch-size 4 --micro-batch-size 2 --save-every 0 --dtype auto
LINE=$("$PY" - "$WS" <<'EOF'
import json, os, sys

ws = sys.argv[1]
s = json.load(open(f"{ws}/summary.json"))
engine = s.get("search_engine", {})
if s.get("sft_world") != 1 or not os.path.isfile(f"{ws}/model/config.json"):
    sys.exit(f"error: warmstart summary {s}")
print(f"warmstart: search on {engine.get('backend')} (sleep mode {engine.get('sleep_mode')}) "
      f"{s['search_seconds']} s, {s['traces']['count']} traces, then SFT in the same process (world "
      f"{s['sft_world']}) {s['sft_seconds']} s, model written")
EOF
)
echo "$LINE ($((SECONDS - T0)) s)"
VERIFIED+=("$LINE")

# 4. realistic-shape model
MODEL=$("$PY" tests/realistic.py --out "$OUT/realistic" --base "$TOY/base" | tail -1)
echo "realistic-shape model: $MODEL ($((SECONDS - T0)) s)"

# 5. grpo under torchrun: killed after its checkpoint at step HALF (the only one before the end), then resumed
export MRT_SAMPLER=hf
RUN=$OUT/grpo
rm -rf "$RUN"
FLAGS=(--model "$MODEL" --train-data "$TOY/data/train.jsonl" --test-data "$TOY/data/test.jsonl" --out "$RUN"
       --preset paper --steps "$STEPS" --prompts-per-step "$P" --group-size "$G" --micro-batch-size "$MB"
       --max-tokens "$MAXTOK" --eval-problems "$EVAL" --eval-samples "$EVALS" --mu-samples "$MU"
       --save-every "$HALF" --dtype auto)
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
"${TORCHRUN[@]}" grpo.py "${FLAGS[@]}" &
PID=$!
while kill -0 "$PID" 2>/dev/null; do
  if [ -f "$RUN/checkpoint/latest" ]; then  # written once the step-HALF save is complete
    # torchrun starts its worker in a session of its own: kill the worker with it, by their ids
    kill -9 "$PID" $(descendants "$PID") 2>/dev/null || true
    break
  fi
  sleep 0.1
done
wait "$PID" || true
[ -f "$RUN/checkpoint/latest" ] || { echo "error: no checkpoint after step $HALF" >&2; exit 1; }
echo "killed after the step-$HALF checkpoint ($((SECONDS - T0)) s)"
"${TORCHRUN[@]}" grpo.py "${FLAGS[@]}" --resume 2>&1 | tee "$OUT/resume.log"
grep -q "at step $HALF\b" "$OUT/resume.log" \
  || { echo "error: the resume did not start at step $HALF (the kill came late?)" >&2; exit 1; }
echo "resumed at step $HALF to $STEPS steps ($((SECONDS - T0)) s)"

# 6. report
LINE=$("$PY" - "$RUN" "$STEPS" <<'EOF'
import json, sys

run, steps = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
got = [r["step"] for r in rows]
if got != list(range(1, steps + 1)):
    sys.exit(f"error: metrics.jsonl has steps {got}, expected 1..{steps} (resume broken?)")
mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
print(f"grpo: {steps} steps under torchrun (killed, resumed at {steps // 2}): step time {mean('time_step'):.2f} s "
      f"(sampling {mean('time_sample'):.2f} s, training {mean('time_train'):.2f} s), "
      f"sampling {mean('tokens_per_s'):.0f} tokens/s, logprob gap {max(r['logprob_gap'] for r in rows):.2e}, "
      f"accuracy {[round(r['accuracy'], 3) for r in rows]}, held-out {json.load(open(f'{run}/eval.json'))}")
EOF
)
echo "$LINE"
VERIFIED+=("$LINE")

echo "gpu_check ($MODE) done in $((SECONDS - T0)) s; verified:"
for v in "${VERIFIED[@]}"; do echo "  - $v"; done
