"""star.py: MRT-B on STaR (MRT paper Alg. 1, Fig. 4, Table 1) and its baselines STaR and RISE.

One iteration k = 1..K of Alg. 1 (--method mrt), for every training problem q:
  z0       one attempt of the BASE model (cut at the backtrack marker if the model writes one).
           All z0 are sampled once, at the start, while the engine holds the base weights
           (stored in <out>/z0.jsonl); every iteration reuses them. An attempt cut at
           --max-tokens or without a box is resampled, and a problem with none usable in
           sampling.Z0_TRIES tries is dropped and counted (sampling.sample_z0, every stage's rule).
  r0       J(mu | q, z0): the meta-prover's success rate after the attempt (Def. 5.1;
           sampling.MetaProver, mu = the current model in the same engine, or --mu-model).
  sample   G continuations z_{1:2} from the CURRENT model given (q, z0), with grpo.py's
           context: z0 + "\\n" + MARKER + "\\nStep" (infogain.backtrack_cue); the model names
           the restart step (" k: ...") and writes the revised attempt. Each continuation is
           split into episodes with infogain.split_continuation(z0, cue + continuation).
  reward   r_i = J(mu | q, z0, z1_i), so r_i - r0 is the information gain of the backtrack
           episode z1_i; a continuation that does not parse has no z1 and r_i = 0 (its gain is
           -r0, infogain.backtrack_gain; mu is not asked about it). z2_i is graded on its own
           (z0's box never counts), 0 when cut at --max-tokens (sampling.sample_outcome).
  filter   keep (q, z0, z_{1:2}) of select_continuation(r0, r, correct, --min-gain): the
           continuation with the highest r_i among those whose z2 is correct and whose gain
           r_i - r0 > 0 (Alg. 1, the default; --min-gain G: r_i - r0 >= G, and --min-gain 0 is
           Fig. 4's reading, gain >= 0); ties go to the first; none when no continuation qualifies.
  SFT      fine-tune the BASE model on the examples kept in ALL iterations so far (STaR starts
           every iteration from the base), loss on the continuation z_{1:2} only (z0 is in the
           prompt; --z0-loss trains on it too), with training.sft (the shared SFT loop).
  sync     the fine-tuned weights go into the engine in place (sampling.Sampler.sync_weights):
           the next iteration samples continuations, and mu answers, from the new model.

Baselines (--method):
  star  plain STaR: G direct attempts per problem from the current model (cut at the marker),
        keep the first correct one, fine-tune the base on them. Model format "direct".
  rise  RISE-style self-correction that restarts from the beginning instead of backtracking:
        the continuation context is z0 + "\\n" + MARKER + "\\nStep 1:" (restart forced at step
        1); keep the first continuation whose z2 is correct. r_i and r0 are still computed
        and logged (the gains of kept and discarded continuations), never used to select.
        Model format "backtrack".

Run (the toy task is the default; each command runs in a few minutes on 2 CPU cores):
    python star.py                         # MRT-B STaR -> runs/star/mrt
    python star.py --method star           # plain STaR  -> runs/star/star
    python star.py --method rise           # RISE        -> runs/star/rise
    torchrun --nproc_per_node 2 star.py    # 2 ranks: problems split, SFT batches split (FSDP2)
    python star.py --resume --iterations 3 # continue runs/star/mrt after its last finished iteration
    torchrun --nproc_per_node 8 star.py --model runs/warmstart/model --data train.jsonl \\
        --test-data test.jsonl --preset paper --gradient-checkpointing     # Table 1, 8 GPUs
The starting model (--model) defaults to runs/warmstart/model when warmstart.py fine-tuned it
from the current toy build, else the toy base (built if missing: toy.default_model); the
base model (--base: z0 and the start of every SFT) defaults to the starting model.

Outputs in <out> (default runs/star/<method>): z0.jsonl (the base's attempts, train and
held-out), data_iter{k}.jsonl (examples kept in iteration k: problem, answer, prompt, z0,
z1, z2, restart step, completion, r0, the r_i and correctness of all G continuations, the
kept index, its gain), sft_iter{k}.jsonl (SFT loss per step of iteration k), iterations.jsonl
(per iteration: kept fraction, the fraction each reading of the filter would keep, gain > 0
and gain >= 0, the share of continuations that parse and that do not, mean gain r_i - r0 of
kept vs discarded continuations, held-out accuracy before and after, SFT losses, timings),
model/ (the latest fine-tuned model, HF checkpoint + mrt.json with "format"), args.json (the
run's arguments, checked by --resume), summary.json (with z0_dropped: the train and held-out problems dropped for want of a usable z0; z0.jsonl
marks them "dropped" and holds their last try).

Decisions / departures from the paper (it publishes no code for this algorithm):
- The filter reads "keep the argmax i when r_i > r0 and z2 is correct" as: argmax of r_i over
  the continuations that are correct AND beat r0. An incorrect argmax is skipped in favour of
  the best correct continuation with r_i > r0 (the other reading, "drop the problem when the
  overall argmax is wrong", would throw away correct gains). Ties go to the first.
- A continuation is a candidate only if it parses (infogain.split_continuation, split where
  the cue was appended: marker, then "Step k:" with one step and no box, a line break, and a
  z2 with a step line or a box), ended by itself (EOS, not cut at --max-tokens: the rule of
  every stage, sampling.sample_outcome) and its z2 is correct. An unparsed one is never kept;
  its logged r_i is 0 and its gain -r0, as grpo.py's bonus gives it (infogain.backtrack_gain).
- Alg. 1 keeps a continuation with r_i > r0; Fig. 4 writes r_i >= r0. With m mu answers J
  is a multiple of 1/m, so ties are common: the default is Alg. 1, --min-gain 0 is Fig. 4, and
  iterations.jsonl reports both readings' keep rates whichever ran.
- z0 is sampled once per problem at the start (the base never changes); r0 is re-estimated
  every iteration because mu is the current model (fixed with --mu-model).
- The data set accumulates over iterations (a problem may contribute one example per
  iteration); every SFT starts from the base with a fresh optimizer, seed + k.
- STaR and RISE keep the first correct sample of G (STaR's one rationale per problem).
- Held-out accuracy is measured in the method's own format (backtrack: the base's z0 for the
  test problem, the cue, graded on z2 only; direct: a plain attempt), --eval-samples samples
  per problem, the same seed every time, so before/after differ only by the model.
- Table 1 gives lr 1e-6, 3 epochs, batch 256, max length 4096, bf16 (dtype auto on GPU),
  warmup 0.1; the other paper preset values (iterations, G, max tokens, mu samples, weight
  decay, schedule: warmstart's linear warmup then cosine) are assumptions.
- On the toy task the MRT-B filter can keep few problems: a continuation is kept only if z2 is
  correct and r_i > r0, and a backtrack episode's mean gain there is negative (RESULTS.md,
  from `python study.py`, has the kept fractions and accuracies of every method).
  tests/test_star.py also checks the filter end to end with scripted samples.
- --resume continues at an iteration boundary: the iterations logged in iterations.jsonl
  (with their data_iter<k>.jsonl) are skipped, their kept examples reread, and the engine
  loads model/ (the last finished iteration's SFT, redone from the same data and seed when a
  kill left model/ from another iteration); z0 is resampled from the base with the same seeds.
  An iteration interrupted midway starts again (its SFT checkpoint is deleted once its model
  is saved). With the same arguments it ends as an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

# One OpenMP thread unless told otherwise: the vLLM engine and the trainer share this process,
# and OpenMP spin-waits slow both on a shared CPU (as in grpo.py). Must precede `import torch`.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import sampling  # noqa: E402
import toy  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from infogain import backtrack_cue, backtrack_gain, split_continuation  # noqa: E402

METHODS = {"mrt": "backtrack", "star": "direct", "rise": "backtrack"}  # method -> model format

PRESETS = {
    # toy: `python star.py` runs in a few minutes on 2 CPU cores
    "toy": dict(iterations=2, problems=96, group_size=4, max_tokens=160, mu_samples=8, sample_batch=48,
                eval_problems=64, eval_samples=4, lr=1e-4, epochs=8, batch_size=16, micro_batch_size=8,
                max_length=512, warmup_ratio=0.1, weight_decay=0.0, save_every=0),
    # paper: Table 1 (lr 1e-6, 3 epochs, batch 256, max length 4096, bf16 via dtype auto, warmup 0.1);
    # iterations, G, max tokens, mu samples and weight decay are assumptions
    "paper": dict(iterations=3, problems=0, group_size=4, max_tokens=2048, mu_samples=8, sample_batch=256,
                  eval_problems=500, eval_samples=1, lr=1e-6, epochs=3, batch_size=256, micro_batch_size=4,
                  max_length=4096, warmup_ratio=0.1, weight_decay=0.0, save_every=0),
}


@dataclass
class Args:
    method: str = "mrt"
    """mrt | star | rise (MRT-B STaR, plain STaR, RISE-style restart from step 1)"""
    preset: str = "auto"
    """toy | paper | auto (toy when --model is empty, else paper): defaults of the None fields"""
    model: str = ""
    """starting model ('' : runs/warmstart/model if fine-tuned from this toy build, else the toy base)"""
    base: str = ""
    """base model: samples z0 and is the start of every SFT ('' : the starting model)"""
    data: str = ""
    """training problems: .jsonl, .parquet or a hub dataset org/name[:split] ('' : the toy train split)"""
    test_data: str = ""
    """held-out problems for the accuracy before/after each iteration ('' : the toy test split)"""
    problem_field: str = "problem"
    """field of a data record holding the problem text"""
    answer_field: str = "answer"
    """field of a data record holding the gold answer"""
    instruction: str | None = None
    """instruction in the user turn for models with a chat template (default: the one in the
    model's mrt.json when this project wrote it, else the standard one)"""
    out: str = ""
    """run folder ('' : runs/star/<method>)"""
    seed: int = 0
    """seeds sampling, data order and initialisation"""
    # STaR
    iterations: int | None = None
    """K: sample -> filter -> fine-tune rounds"""
    problems: int | None = None
    """training problems used (the first N; 0: all)"""
    group_size: int | None = None
    """G: continuations (mrt, rise) or attempts (star) per problem and iteration"""
    max_tokens: int | None = None
    """token limit of z0 and of each continuation / attempt"""
    temperature: float = 1.0
    """sampling temperature of z0, continuations and attempts"""
    top_p: float = 1.0
    """nucleus sampling"""
    sample_batch: int | None = None
    """problems per generate call on one rank (progress granularity)"""
    # meta-prover
    mu_model: str = ""
    """meta-prover model ('' : the current model, in the same engine)"""
    mu_suffix: str = utils.MU_SUFFIX
    """forced suffix that makes mu answer now"""
    mu_samples: int | None = None
    """m: mu answers per context for J(mu | context)"""
    mu_max_tokens: int = 16
    """max tokens of a mu answer"""
    mu_mode: str = "forced"
    """forced: mu answers right after the context and --mu-suffix; rollout: mu continues the
    context for up to --mu-rollout-tokens, its last boxed answer graded (sampling.MetaProver)"""
    mu_rollout_tokens: int = 128
    """B: tokens mu writes per sample in --mu-mode rollout"""
    mu_temperature: float = 1.0
    """mu's sampling temperature"""
    min_gain: float | None = None
    """--method mrt's filter: keep a correct continuation whose gain r_i - r0 >= MIN_GAIN;
    unset (default): gain > 0 (Alg. 1); 0: gain >= 0 (Fig. 4's reading)"""
    # held-out accuracy
    eval_problems: int | None = None
    """held-out problems measured before and after each iteration (0: skip)"""
    eval_samples: int | None = None
    """samples per held-out problem"""
    # SFT (training.sft)
    lr: float | None = None
    """peak learning rate (AdamW)"""
    epochs: int | None = None
    """passes over the accumulated examples per iteration"""
    batch_size: int | None = None
    """sequences per optimizer step, over all ranks"""
    micro_batch_size: int | None = None
    """sequences per forward/backward on one rank"""
    max_length: int | None = None
    """prompt + completion tokens in SFT; longer completions are cut"""
    warmup_ratio: float | None = None
    """fraction of optimizer steps in linear warmup"""
    weight_decay: float | None = None
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    save_every: int | None = None
    """SFT checkpoint every N optimizer steps (0: only at the end of each SFT)"""
    report_to: str = "none"
    """live metrics besides the JSONL files: none | tensorboard | wandb | trackio (optional packages)"""
    dtype: str = "auto"
    """compute dtype: auto (bf16 on GPU, fp16 on one without bf16, fp32 on CPU) | bf16 | fp16 | fp32;
    weights and optimizer state stay fp32"""
    gradient_checkpointing: bool = False
    """recompute activations in backward"""
    z0_loss: bool = False
    """also train on the attempt z0; default: z0 is in the prompt, loss on z_{1:2} only"""
    max_model_len: int = 0
    """engine context length (0: what the longest prompt + z0 + continuation + mu's answer need, capped at the model's positions)"""
    gpu_memory_utilization: float = 0.3
    """share of GPU memory the vLLM engine may take (its weights and KV cache)"""
    sleep_mode: str = "auto"
    """auto | on | off: vLLM sleep mode, the engine's weights and KV cache leave the GPU during each SFT (auto: on with CUDA; vLLM's CPU build has none)"""
    reward: str = ""
    """custom reward, module:function or path/to/file.py:function: a callable (completion text,
    gold answer, problem record) -> float in [0, 1] that replaces the math-verify grader at every
    grading site, the meta-prover's included (empty: utils.grade)"""
    answer_from: str = ""
    """field of a worked solution whose last \\boxed{} is the gold answer (e.g. solution,
    NuminaMath style; --answer-field is then not read); empty: --answer-field as is"""
    resume: bool = False
    """continue the run in --out after its last finished iteration (same arguments; --iterations may be raised)"""


def resolve_args(args: Args, world: int = 1) -> Args:
    """Fill the None fields from the preset, check them, derive sizes."""
    if args.method not in METHODS:
        raise utils.UserError(f"--method must be one of {sorted(METHODS)}, got {args.method!r}")
    preset = args.preset if args.preset != "auto" else ("toy" if not args.model else "paper")
    if preset not in PRESETS:
        raise utils.UserError(f"--preset must be toy, paper or auto, got {args.preset!r}")
    fill = {k: v for k, v in PRESETS[preset].items() if getattr(args, k) is None}
    args = dataclasses.replace(args, preset=preset, **fill)
    training.check_sft_args(args, world)
    for name in ("iterations", "group_size", "max_tokens", "sample_batch", "mu_samples", "mu_max_tokens",
                 "mu_rollout_tokens", "eval_samples"):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("problems", "eval_problems", "max_model_len", "save_every"):
        if getattr(args, name) < 0:
            raise utils.UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise utils.UserError("--temperature must be > 0 and 0 < --top-p <= 1")
    if args.mu_mode not in sampling.MU_MODES:
        raise utils.UserError(f"--mu-mode must be one of {sampling.MU_MODES}, got {args.mu_mode!r}")
    if args.min_gain is not None and not -1.0 <= args.min_gain <= 1.0:
        raise utils.UserError(f"--min-gain must be in [-1, 1] (a gain is a difference of two success rates), "
                              f"got {args.min_gain}")
    if args.min_gain is not None and args.method != "mrt":
        raise utils.UserError(f"--min-gain sets --method mrt's filter; --method {args.method} keeps the first "
                              f"correct sample")
    return args


# --------------------------------------------------------------------------------------
# The filter (pure functions)
# --------------------------------------------------------------------------------------


RESUME_FREE = ("out", "resume", "iterations", "save_every", "report_to", "dtype", "gpu_memory_utilization", "sleep_mode",
               "gradient_checkpointing", "max_model_len")
"""Arguments a --resume may change (--iterations may be raised); any other differing from the
run's <out>/args.json is refused (utils.resume_mismatch): it would change what the run computes."""


def finished_iterations(out: str) -> tuple[list[dict], list[dict]]:
    """(records, kept examples) of the iterations a run in `out` finished: the records of
    iterations.jsonl numbered 1, 2, ... in order whose data_iter<k>.jsonl exists, and the
    examples of those files in iteration order (the accumulated SFT data)."""
    path = os.path.join(out, "iterations.jsonl")
    history, examples = [], []
    for rec in utils.read_records(path) if os.path.isfile(path) else []:
        data = os.path.join(out, f"data_iter{len(history) + 1}.jsonl")
        if rec.get("iteration") != len(history) + 1 or not os.path.isfile(data):
            break
        history.append(rec)
        examples += utils.read_records(data)
    return history, examples


def select_continuation(r0: float, rewards, correct, min_gain: float | None = None) -> int | None:
    """MRT's filter (Alg. 1, Fig. 4): the index i of the highest r_i among the continuations
    whose revised attempt z2 is correct and whose gain r_i - r0 passes: r_i > r0 when
    min_gain is None (Alg. 1, the default), else r_i - r0 >= min_gain (0: Fig. 4's reading,
    gain >= 0); ties go to the first. None when no continuation qualifies. An incorrect
    continuation never counts, however high its r_i."""
    if len(rewards) != len(correct):
        raise ValueError(f"{len(rewards)} rewards but {len(correct)} correctness flags")
    passes = (lambda r: r > r0) if min_gain is None else (lambda r: r - r0 >= min_gain)  # noqa: E731
    best = None
    for i, (r, ok) in enumerate(zip(rewards, correct)):
        if ok and passes(r) and (best is None or r > rewards[best]):
            best = i
    return best


def select_first_correct(correct) -> int | None:
    """The STaR / RISE filter: the first correct sample, None when none is."""
    return next((i for i, ok in enumerate(correct) if ok), None)


def continuation_cue(method: str, z0: str) -> str:
    """The text after the prompt that continuations are sampled from: z0, the marker and
    "Step" (mrt: the model names the restart step) or "Step 1:" (rise: restart forced)."""
    return backtrack_cue(z0) + (" 1:" if method == "rise" else "")


def parse_continuation(method: str, z0: str, text: str, finish_reason: str, gold: str, reward: str = "",
                       record: dict | None = None) -> dict:
    """Episodes and correctness of one continuation: {completion, episodes (or None), correct}.
    Correct means: it parses into z0/z1/z2, split where the cue was appended, and z2 alone is
    graded correct by sampling.sample_outcome (0 when cut at the token limit: the rule of every
    stage; `reward` and `record` as sampling.sample_outcome's)."""
    completion = continuation_cue(method, z0) + text
    ep = split_continuation(z0, completion)
    ok = ep is not None and sampling.sample_outcome(ep.z2, gold, finish_reason, reward, record) == 1.0
    return {"completion": completion, "episodes": ep, "correct": ok}


# --------------------------------------------------------------------------------------
# Sampling: z0 from the base, continuations (or attempts) from the current model
# --------------------------------------------------------------------------------------


def rollout_chunk(sampler, mu: sampling.MetaProver | None, problems: list[dict], z0s: dict, args: Args, seed: int) -> list[dict]:
    """One record per problem: its G samples (text, parsed, correct, r_i), r0 and the kept
    index (None if none), and the kept example."""
    if not problems:
        return []
    tok, G = sampler.tokenizer, args.group_size
    if args.method == "star":
        outs = sampling.sample_attempts(sampler, [p["prompt"] for p in problems], G, temperature=args.temperature, top_p=args.top_p,
                               max_tokens=args.max_tokens, seed=seed)
        records = []
        for p, group in zip(problems, outs):
            correct = [sampling.sample_outcome(s.text, p["answer"], s.finish_reason, args.reward, p.get("record")) == 1.0
                       for s in group]
            kept = select_first_correct(correct)
            example = None if kept is None else {
                "id": p["id"], "problem": p["problem"], "answer": p["answer"], "prompt": p["prompt"],
                "completion": group[kept].text, "index": kept, "correct": correct}
            records.append({"id": p["id"], "samples": [{"text": s.text, "correct": c} for s, c in zip(group, correct)],
                            "r0": None, "kept": kept, "example": example})
        return records

    cues = [continuation_cue(args.method, z0s[p["id"]]) for p in problems]
    outs = sampler.generate([utils.encode(tok, p["prompt"] + c) for p, c in zip(problems, cues)], n=G,
                            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=seed,
                            logprobs=False)
    parsed = [[parse_continuation(args.method, z0s[p["id"]], s.text, s.finish_reason, p["answer"],
                                  args.reward, p.get("record")) for s in group]
              for p, group in zip(problems, outs)]
    # J(mu | q, z0) and J(mu | q, z0, z1_i) of the parsed continuations in one call; an unparsed
    # continuation has no backtrack episode: J after it is 0 (infogain.backtrack_gain), mu is not asked
    before = [p["prompt"] + z0s[p["id"]] for p in problems]
    where = [(i, j) for i, group in enumerate(parsed) for j, c in enumerate(group) if c["episodes"]]
    after = [problems[i]["prompt"] + parsed[i][j]["episodes"].z0 + parsed[i][j]["episodes"].z1 for i, j in where]
    golds = [p["answer"] for p in problems] + [problems[i]["answer"] for i, _ in where]
    J = mu.success_rates(before + after, golds, seed=utils.derive_seed(seed, "meta-prover"))
    r0s, rs = J[: len(problems)], np.zeros((len(problems), G))  # (P,), (P, G)
    for (i, j), x in zip(where, J[len(problems):]):
        rs[i, j] = x
    records = []
    for p, group, samples, r0, r in zip(problems, parsed, outs, r0s, rs):
        correct = [c["correct"] for c in group]
        rewards = [float(x) for x in r]
        kept = (select_continuation(float(r0), rewards, correct, args.min_gain) if args.method == "mrt"
                else select_first_correct(correct))
        example = None
        if kept is not None:
            ep = group[kept]["episodes"]
            example = {"id": p["id"], "problem": p["problem"], "answer": p["answer"], "prompt": p["prompt"], "z0": ep.z0,
                       "z1": ep.z1, "z2": ep.z2, "restart_step": ep.restart_step,
                       "completion": group[kept]["completion"], "r0": float(r0), "r": rewards[kept],
                       "gain": backtrack_gain(float(r0), rewards[kept]), "index": kept, "rewards": rewards,
                       "correct": correct}
        records.append({"id": p["id"], "r0": float(r0), "kept": kept, "example": example,
                        "samples": [{"text": s.text, "parsed": c["episodes"] is not None, "correct": c["correct"],
                                     "r": x, "gain": backtrack_gain(float(r0), x if c["episodes"] else None)}
                                    for s, c, x in zip(samples, group, rewards)]})
    return records


def collect(sampler, mu: sampling.MetaProver | None, problems: list[dict], z0s: dict, args: Args, iteration: int) -> list[dict]:
    """rollout_chunk over every training problem: problems split over the ranks, in chunks of
    --sample-batch (the same number of chunks on every rank), gathered in problem order."""
    from tqdm import tqdm

    rank, world = utils.rank(), utils.world_size()
    mine, B = problems[rank::world], args.sample_batch
    n_chunks = math.ceil(len(problems) / (world * B))
    records = []
    for c in tqdm(range(n_chunks), desc=f"{args.method} iteration {iteration}: sample", disable=not utils.is_main()):
        seed = utils.derive_seed(args.seed, "rollout", iteration, c * world + rank)
        records += rollout_chunk(sampler, mu, mine[c * B:(c + 1) * B], z0s, args, seed)
    merged = [r for part in utils.all_gather(records) for r in part]
    return sorted(merged, key=lambda r: r["id"])


def heldout_accuracy(sampler, problems: list[dict], z0s: dict, args: Args, seed: int) -> float | None:
    """Mean accuracy of --eval-samples samples per held-out problem in the method's format
    (backtrack: the base's z0, the cue, graded on z2 only; direct: a plain attempt); a sample
    cut at --max-tokens scores 0 (sampling.sample_outcome)."""
    if not problems:
        return None
    rank, world = utils.rank(), utils.world_size()
    mine, scores = problems[rank::world], []
    if mine and args.method == "star":
        outs = sampling.sample_attempts(sampler, [p["prompt"] for p in mine], args.eval_samples, temperature=args.temperature,
                               top_p=args.top_p, max_tokens=args.max_tokens, seed=utils.derive_seed(seed, rank))
        scores = [sampling.sample_outcome(s.text, p["answer"], s.finish_reason, args.reward, p.get("record"))
                  for p, g in zip(mine, outs) for s in g]
    elif mine:
        cues = [continuation_cue(args.method, z0s[p["id"]]) for p in mine]
        outs = sampler.generate([utils.encode(sampler.tokenizer, p["prompt"] + c) for p, c in zip(mine, cues)],
                                n=args.eval_samples, temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=utils.derive_seed(seed, rank), logprobs=False)
        for p, c, g in zip(mine, cues, outs):
            for s in g:
                ep = split_continuation(z0s[p["id"]], c + s.text)
                scores.append(sampling.sample_outcome(ep.z2, p["answer"], s.finish_reason, args.reward, p.get("record"))
                              if ep else 0.0)
    return float(np.mean([x for part in utils.all_gather(scores) for x in part]))


# --------------------------------------------------------------------------------------
# Statistics of one iteration
# --------------------------------------------------------------------------------------


def iteration_stats(records: list[dict], method: str) -> dict:
    """Kept fraction, sample accuracy and (backtrack methods) the share of continuations that
    parse and that do not, r0, r_i, the mean gain r_i - r0 of the kept continuations vs all the
    others, and the fraction of problems MRT's filter keeps under each reading of it
    (select_continuation): gain > 0 (Alg. 1, kept_fraction_gain_pos) and gain >= 0 (Fig. 4,
    kept_fraction_gain_nonneg), whatever --min-gain this run used."""
    mean = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None  # noqa: E731
    kept = [r for r in records if r["kept"] is not None]
    out = {"problems": len(records), "samples": sum(len(r["samples"]) for r in records), "kept": len(kept),
           "kept_fraction": mean([r["kept"] is not None for r in records]),
           "sample_accuracy": mean([s["correct"] for r in records for s in r["samples"]])}
    if method != "star":
        g_kept = [r["samples"][r["kept"]]["gain"] for r in kept]
        g_other = [s["gain"] for r in records for i, s in enumerate(r["samples"]) if i != r["kept"]]
        readings = {name: mean([select_continuation(r["r0"], [s["r"] for s in r["samples"]],
                                                    [s["correct"] for s in r["samples"]], bar) is not None
                                for r in records]) for name, bar in (("gain_pos", None), ("gain_nonneg", 0.0))}
        out.update({"parsed_fraction": mean([s["parsed"] for r in records for s in r["samples"]]),
                    "unparsed_fraction": mean([not s["parsed"] for r in records for s in r["samples"]]),
                    "kept_fraction_gain_pos": readings["gain_pos"],
                    "kept_fraction_gain_nonneg": readings["gain_nonneg"],
                    "r0_mean": mean([r["r0"] for r in records]),
                    "r_mean": mean([s["r"] for r in records for s in r["samples"]]),
                    "gain_kept_mean": mean(g_kept), "gain_discarded_mean": mean(g_other),
                    "restart_step_mean": mean([r["example"]["restart_step"] for r in kept])})
    return out


# --------------------------------------------------------------------------------------
# Main: Alg. 1
# --------------------------------------------------------------------------------------


def main(args: Args, sampler: sampling.Sampler | None = None) -> dict:
    """Run the iterations; returns the summary. `sampler`: a ready engine on a model of the
    same architecture (tests); the base weights are synced into it first, and it is left
    holding the last fine-tuned model."""
    rank, world, _ = utils.init_distributed()
    args = resolve_args(args, world)
    fmt = METHODS[args.method]
    out = args.out or os.path.join("runs", "star", args.method)

    # ---- inputs first: bad input fails before an engine starts or a file is written -------
    for flag, path in (("--data", args.data), ("--test-data", args.test_data)):
        if path and not os.path.isfile(path):
            raise utils.UserError(f"{flag}: no such file: {path}")
    model_path, base_path, toy_paths = args.model, args.base, None
    if not (args.model and args.data and args.test_data):
        default_path, toy_paths = toy.default_model()
        model_path = model_path or default_path
    base_path = base_path or model_path
    args = dataclasses.replace(args, instruction=utils.stage_instruction(args.instruction, model_path))
    for path in dict.fromkeys(p for p in (model_path, base_path, args.mu_model) if p):
        utils.load_tokenizer(path)  # a missing or unloadable model is a one-line error
    args_path, own_args = os.path.join(out, "args.json"), json.loads(json.dumps(dataclasses.asdict(args)))
    history, accumulated = finished_iterations(out) if args.resume else ([], [])
    if args.resume and os.path.isfile(args_path):
        diff = utils.resume_mismatch(json.load(open(args_path)), own_args, RESUME_FREE)
        if diff:
            raise utils.UserError(f"--resume: {out} was run with other arguments: {', '.join(diff)}; "
                                  f"give the run's values or a new --out", every_rank=True)
    tok = utils.load_tokenizer(base_path)
    mu_tokens = args.mu_rollout_tokens if args.mu_mode == "rollout" else args.mu_max_tokens
    budget = args.max_tokens + (args.max_tokens + 64 + mu_tokens if fmt == "backtrack" else 0)
    room = (args.max_model_len or sampling.model_positions(base_path)) - budget
    data = dict(problem_field=args.problem_field, answer_field=args.answer_field, tokenizer=tok,
                instruction=args.instruction, max_prompt_tokens=room, too_long="lower --max-tokens or raise --max-model-len",
                answer_from=args.answer_from, keep_record=bool(args.reward))
    grade = utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    train = utils.load_problems(args.data or toy_paths["train"], limit=args.problems, **data)
    test = utils.load_problems(args.test_data or toy_paths["test"], limit=args.eval_problems, **data) if args.eval_problems else []
    utils.seed_everything(args.seed)
    utils.print0(f"star: method {args.method} ({fmt}), preset {args.preset}, model {model_path}, base {base_path}, "
                 f"{len(train)} problems x G={args.group_size}, {args.iterations} iterations, world {world}")

    # ---- engine on the base: z0 for every train and held-out problem, then the start model --
    t0 = time.time()
    longest = max(p["prompt_tokens"] for p in train + test)
    engine_kw = dict(seed=args.seed, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                     max_model_len=args.max_model_len or sampling.engine_length(base_path, longest + budget))
    if sampler is None:
        sampler = sampling.Sampler(base_path, sleep_mode=args.sleep_mode, **engine_kw)
    else:  # it may hold other weights: z0 must come from the base (read on the CPU: the engine has the GPU)
        sampler.sync_weights(sampling.load_on_host(base_path, args.dtype))
    train_z0, test_z0, z0_dropped = {}, {}, None
    if fmt == "backtrack":  # a cut or box-less z0 is resampled, then its problem dropped (sampling.sample_z0)
        z0_kw = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
        train_z0, train_lost = sampling.sample_z0(sampler, train, **z0_kw, seed_parts=(args.seed, "z0", "train"))
        test_z0, test_lost = sampling.sample_z0(sampler, test, **z0_kw, seed_parts=(args.seed, "z0", "test"))
        if not train_z0:
            raise utils.UserError(f"no training problem has a usable attempt z0 (every one cut at --max-tokens "
                                  f"{args.max_tokens} or without a box in {sampling.Z0_TRIES} tries): raise --max-tokens")
        if utils.is_main():
            utils.write_jsonl(os.path.join(out, "z0.jsonl"),
                              [{"split": s, "id": p["id"], "problem": p["problem"], "answer": p["answer"],
                                "z0": z[p["id"]] if p["id"] in z else lost[p["id"]], "dropped": p["id"] in lost}
                               for s, ps, z, lost in (("train", train, train_z0, train_lost),
                                                      ("test", test, test_z0, test_lost)) for p in ps])
        z0_dropped = {"train": len(train_lost), "test": len(test_lost)}
        train, test = [p for p in train if p["id"] in train_z0], [p for p in test if p["id"] in test_z0]
        utils.print0(f"sampled z0 of the base for {len(train)} train and {len(test)} held-out problems "
                     f"in {time.time() - t0:.0f}s (train accuracy "
                     f"{np.mean([grade(train_z0[p['id']], p['answer'], p.get('record')) for p in train]):.3f}); dropped "
                     f"{z0_dropped['train']} train and {z0_dropped['test']} held-out problems with no usable z0 in "
                     f"{sampling.Z0_TRIES} tries (cut at --max-tokens or no box)")
    if model_path != base_path:
        sampler.sync_weights(sampling.load_on_host(model_path, args.dtype))
    if fmt == "backtrack" and utils.model_format(model_path) != "backtrack":
        utils.print0(f"warning: the starting model {model_path} has no mrt.json with format 'backtrack' (not "
                     f"warmstarted): expect few parsable, correct continuations; run warmstart.py first")
    mu = None
    if fmt == "backtrack":
        mu_sampler = sampling.make_sampler(args.mu_model, **dict(engine_kw, sleep_mode="off")) if args.mu_model else sampler
        mu = sampling.MetaProver(mu_sampler, suffix=args.mu_suffix, m=args.mu_samples, temperature=args.mu_temperature,
                        max_tokens=args.mu_max_tokens, mode=args.mu_mode, rollout_tokens=args.mu_rollout_tokens,
                        reward=args.reward)

    eval_seed = utils.derive_seed(args.seed, "held-out")
    accuracy = [history[0]["accuracy_before"] if history else heldout_accuracy(sampler, test, test_z0, args, eval_seed)]
    if test:
        utils.print0(f"held-out accuracy of the starting model: {accuracy[0]:.4f} ({len(test)} x {args.eval_samples})")
    if utils.is_main():
        utils.write_json(args_path, own_args)

    def finetune(k: int, rec: dict) -> None:  # SFT of the base on everything kept so far; the engine gets it
        log_path = os.path.join(out, f"sft_iter{k}.jsonl")
        card = {"stage": "star", "method": args.method, "variant": args.method, "format": fmt, "base": base_path,
                "start": model_path, "iteration": k, "examples": len(accumulated), "args": dataclasses.asdict(args)}
        ckpt = os.path.join(out, f".sft_iter{k}")
        # the engine sleeps through the SFT (--sleep-mode); the next iteration (and mu) sample from the new model
        sampling.update_asleep(sampler, lambda: training.sft(
            base_path, [training.sft_example(e, args.z0_loss) for e in accumulated],
            dataclasses.replace(args, seed=args.seed + k), model_dir=os.path.join(out, "model"),
            log_path=log_path, ckpt_path=ckpt, card=card, log_extra={"method": args.method, "iteration": k}))
        gc.collect()
        if utils.is_main() and os.path.exists(ckpt):
            shutil.rmtree(ckpt)
        if utils.is_main():
            losses = [r["loss"] for r in utils.read_records(log_path, ["loss"])]
            rec.update(sft_steps=len(losses), sft_loss_first=losses[0], sft_loss_last=losses[-1])

    # ---- resume: the finished iterations' model in the engine (their data is `accumulated`) ---
    done, model_saved = len(history), bool(history) and bool(accumulated)
    accuracy += [r["accuracy_after"] for r in history]
    if model_saved:
        card_path = os.path.join(out, "model", "mrt.json")
        card = json.load(open(card_path)) if os.path.isfile(card_path) else {}
        if card.get("iteration") == done and card.get("examples") == len(accumulated):
            sampler.sync_weights(sampling.load_on_host(os.path.join(out, "model"), args.dtype))
        else:  # killed after the next iteration's SFT wrote model/: iteration `done`'s SFT again (same data, seed)
            finetune(done, {})
    if done:
        utils.print0(f"resumed {out} after iteration {done} ({len(accumulated)} examples kept so far)")

    # ---- iterations: sample -> filter -> SFT the base on everything kept -> sync ------------
    logger = utils.JsonlLogger(os.path.join(out, "iterations.jsonl"), resume_step=done if args.resume else None,
                               report_to=args.report_to, config=dataclasses.asdict(args))
    for k in range(done + 1, args.iterations + 1):
        t0 = time.time()
        records = collect(sampler, mu, train, train_z0, args, k)
        kept = [dict(r["example"], iteration=k) for r in records if r["example"] is not None]
        accumulated += kept
        if utils.is_main():
            utils.write_jsonl(os.path.join(out, f"data_iter{k}.jsonl"), kept)
        rec = {"step": k, "iteration": k, "method": args.method, **iteration_stats(records, args.method),
               "accumulated": len(accumulated), "seconds_sample": round(time.time() - t0, 1)}
        utils.print0(f"iteration {k}: kept {rec['kept']}/{rec['problems']}" +
                     (f", gain kept {rec['gain_kept_mean']} vs discarded {rec['gain_discarded_mean']}"
                      if fmt == "backtrack" else "") + f", {len(accumulated)} examples in all")

        t0 = time.time()
        if accumulated:
            finetune(k, rec)
            model_saved = True
        else:
            utils.print0(f"iteration {k}: nothing kept so far, no fine-tuning (the model stays as it is)")
        rec["seconds_sft"] = round(time.time() - t0, 1)

        t0 = time.time()
        accuracy.append(heldout_accuracy(sampler, test, test_z0, args, eval_seed))
        rec.update(accuracy_before=accuracy[-2], accuracy_after=accuracy[-1], seconds_eval=round(time.time() - t0, 1))
        if test:
            utils.print0(f"iteration {k}: held-out accuracy {accuracy[-2]:.4f} -> {accuracy[-1]:.4f}")
        logger.log(rec)
        history.append(rec)

    summary = {"method": args.method, "format": fmt, "model": model_path, "base": base_path,
               "problems": len(train), "heldout_problems": len(test), "z0_dropped": z0_dropped, "accuracy": accuracy,
               "examples": len(accumulated), "model_dir": os.path.join(out, "model") if model_saved else None,
               "iterations": history, "args": dataclasses.asdict(args)}
    if utils.is_main():
        utils.write_json(os.path.join(out, "summary.json"), summary)
    utils.print0(f"wrote {out}: " + ("z0.jsonl, " if fmt == "backtrack" else "") + "data_iter*.jsonl, " +
                 ("sft_iter*.jsonl, " if model_saved else "") + "iterations.jsonl, summary.json" +
                 (", model/" if model_saved else " (no model: nothing was kept)"))
    return summary


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
