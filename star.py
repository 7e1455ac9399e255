"""star.py: MRT-B on STaR (MRT paper Alg. 1, Fig. 4, Table 1) and its baselines STaR and RISE.

Alg. 1 (--method mrt), iteration k = 1..K, for every training problem q (rollout_chunk, collect):
  z0      one attempt of the BASE model (cut at the backtrack marker), sampled once at the start
          (<out>/z0.jsonl) and reused by every iteration; a cut or box-less attempt is resampled, a
          problem with none usable in sampling.Z0_TRIES tries dropped and counted (sampling.sample_z0).
  r0      J(mu | q, z0): the meta-prover's success rate after z0 (Def. 5.1, sampling.MetaProver;
          mu = the current model in the same engine, or --mu-model).
  sample  G continuations z_{1:2} of the CURRENT model after z0 + "\\n" + MARKER + "\\nStep"
          (continuation_cue, grpo.py's context): the model names the restart step (" k: ...") and
          writes the revised attempt; parse_continuation splits it (infogain.split_continuation).
  reward  r_i = J(mu | q, z0, z1_i): r_i - r0 is the information gain of episode z1_i; an unparsed
          continuation has no z1 and r_i = 0 (gain -r0, infogain.backtrack_gain; mu is not asked).
          z2_i is graded alone (z0's box never counts), 0 when cut at --max-tokens.
  filter  select_continuation(r0, r, correct, --min-gain): the highest r_i among the continuations
          with a correct z2 and gain r_i - r0 > 0 (Alg. 1, the default); --min-gain G: gain >= G, and
          --min-gain 0 is Fig. 4's reading, gain >= 0; ties go to the first; none if none qualifies.
  SFT     fine-tune the BASE on the examples kept in ALL iterations so far (training.sft), loss on
          z_{1:2} only (z0 in the prompt; --z0-loss trains on it too); sync: the new weights go into
          the engine (sampling.sft_asleep): the next iteration samples, and mu answers, from them.
Baselines: --method star, plain STaR: G direct attempts (cut at the marker), keep the first correct
(select_first_correct), model format "direct"; --method rise, RISE-style restart from the start:
the cue ends "Step 1:", keep the first continuation with a correct z2 (r0, r_i logged, never used).

Run (the toy task is the default; each command runs in a few minutes on 2 CPU cores):
    python star.py                         # MRT-B STaR -> runs/star/mrt
    python star.py --method star           # plain STaR  -> runs/star/star
    python star.py --method rise           # RISE        -> runs/star/rise
    torchrun --nproc_per_node 2 star.py    # 2 ranks: problems split, SFT batches split (FSDP2)
    python star.py --resume --iterations 3 # continue runs/star/mrt after its last finished iteration
    torchrun --nproc_per_node 8 star.py --model runs/warmstart/model --data train.jsonl \\
        --test-data test.jsonl --preset paper --gradient-checkpointing     # Table 1, 8 GPUs

Outputs in <out> (default runs/star/<method>): z0.jsonl (the base's attempts, train and held-out;
a dropped problem marked "dropped", with its last try), data_iter{k}.jsonl (kept examples: problem,
answer, prompt, z0, z1, z2, restart step, completion, r0, the r_i and correctness of all G, the
kept index, its gain), sft_iter{k}.jsonl (SFT loss per step), iterations.jsonl (per iteration,
utils.iteration_stats: kept fraction and that of each filter reading, shares of continuations that
parse and that do not, mean gain of kept vs discarded; held-out accuracy before and after, SFT
losses, timings), model/ (the last fine-tuned model, mrt.json with "format"), args.json (checked
by --resume), summary.json (z0_dropped: train and held-out problems without a usable z0).

Decisions / departures from the paper (it publishes no code for this algorithm):
- "keep the argmax i when r_i > r0 and z2 is correct" is the argmax over the correct continuations
  that beat r0 (dropping the problem when the overall argmax is wrong loses correct gains); a
  candidate parses (marker, "Step k:" with one step and no box, a line break, a z2 with a step line
  or a box) and ended by itself (not cut at --max-tokens).
- Alg. 1 keeps r_i > r0, Fig. 4 writes r_i >= r0; J is a multiple of 1/m, so ties are common: the
  default is Alg. 1, --min-gain 0 is Fig. 4, and iterations.jsonl reports both keep rates.
- z0 once per problem (the base never changes), r0 every iteration (mu is the current model); the
  data accumulates; every SFT starts from the base, fresh optimizer, seed + k. heldout_accuracy:
  the method's format (backtrack: the base's z0, the cue, z2 graded), the same seed every time.
- Table 1 gives lr 1e-6, 3 epochs, batch 256, max length 4096, bf16, warmup 0.1; the other paper
  preset values (iterations, G, max tokens, mu samples, weight decay, warmup-cosine) are assumed.
- On the toy task the filter keeps few problems (a backtrack episode's mean gain is negative
  there: RESULTS.md); tests/test_star.py checks the filter end to end with scripted samples.
- --resume continues at an iteration boundary: logged iterations skipped, their examples reread,
  model/ loaded (its SFT redone, same data and seed, when a kill left the next iteration's); z0
  resampled with the same seeds; with the same arguments it ends as an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

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

PRESETS = {  # toy: `python star.py` in a few minutes on 2 CPU cores; paper: Table 1, the rest assumed
    "toy": dict(iterations=2, problems=96, group_size=4, max_tokens=160, mu_samples=8, sample_batch=48,
                eval_problems=64, eval_samples=4, lr=1e-4, epochs=8, batch_size=16, micro_batch_size=8,
                max_length=512, warmup_ratio=0.1, weight_decay=0.0, save_every=0),
    "paper": dict(iterations=3, problems=0, group_size=4, max_tokens=2048, mu_samples=8, sample_batch=256,
                  eval_problems=500, eval_samples=1, lr=1e-6, epochs=3, batch_size=256, micro_batch_size=4,
                  max_length=4096, warmup_ratio=0.1, weight_decay=0.0, save_every=0),
}


@dataclasses.dataclass
class Args(utils.DataArgs, training.TrainerArgs, sampling.MuArgs):
    """This stage's own flags; the bases add those every stage spells alike (--help lists all)."""
    method: str = "mrt"
    """mrt | star | rise (MRT-B STaR, plain STaR, RISE-style restart from step 1)"""
    preset: str = "auto"
    """toy | paper | auto (toy when --model is empty, else paper): defaults of the None fields"""
    model: str = ""
    """starting model ('': runs/warmstart/model if fine-tuned from this toy build, else the toy base)"""
    base: str = ""
    """base model: samples z0 and is the start of every SFT ('': the starting model)"""
    data: str = ""
    """training problems: .jsonl, .parquet or a hub dataset org/name[:split] ('': the toy train split)"""
    test_data: str = ""
    """held-out problems for the accuracy before/after each iteration ('': the toy test split)"""
    out: str = ""
    """run folder ('': runs/star/<method>)"""
    seed: int = 0
    """seeds sampling, data order and initialisation"""
    iterations: int | None = None
    """K: sample -> filter -> fine-tune rounds (toy preset 2; paper preset 3)"""
    problems: int | None = None
    """training problems used, the first N; 0: all (toy preset 96; paper preset 0)"""
    group_size: int | None = None
    """G: continuations (mrt, rise) or attempts (star) per problem and iteration (toy preset 4; paper 4)"""
    max_tokens: int | None = None
    """token limit of z0 and of each continuation / attempt (toy preset 160; paper preset 2048)"""
    temperature: float = 1.0
    """sampling temperature of z0, continuations and attempts"""
    top_p: float = 1.0
    """nucleus sampling"""
    sample_batch: int | None = None
    """problems per generate call on one rank, progress granularity (toy preset 48; paper preset 256)"""
    mu_samples: int | None = None
    """m: mu answers per context for J(mu | context) (toy preset 8; paper preset 8)"""
    min_gain: float | None = None
    """mrt's filter: keep a correct continuation with gain r_i - r0 >= MIN_GAIN
    (unset, the default: gain > 0, Alg. 1; 0: gain >= 0, Fig. 4's reading)"""
    eval_problems: int | None = None
    """held-out problems measured before and after each iteration; 0: skip (toy preset 64; paper 500)"""
    eval_samples: int | None = None
    """samples per held-out problem (toy preset 4; paper preset 1)"""
    lr: float | None = None
    """peak learning rate, AdamW (toy preset 1e-4; paper preset 1e-6)"""
    epochs: int | None = None
    """passes over the accumulated examples per iteration (toy preset 8; paper preset 3)"""
    batch_size: int | None = None
    """sequences per optimizer step, over all ranks (toy preset 16; paper preset 256)"""
    micro_batch_size: int | None = None
    """sequences per forward/backward on one rank (toy preset 8; paper preset 4)"""
    max_length: int | None = None
    """prompt + completion tokens in SFT, longer completions cut (toy preset 512; paper preset 4096)"""
    warmup_ratio: float | None = None
    """fraction of optimizer steps in linear warmup (toy preset 0.1; paper preset 0.1)"""
    weight_decay: float | None = None
    """AdamW weight decay (toy preset 0.0; paper preset 0.0)"""
    save_every: int | None = None
    """SFT checkpoint every N optimizer steps; 0: only at the end of each SFT (toy preset 0; paper 0)"""
    z0_loss: bool = False
    """also train on the attempt z0; default: z0 is in the prompt, loss on z_{1:2} only"""
    max_model_len: int = 0
    """engine context length (0: longest prompt + z0 + continuation + mu's answer, capped at positions)"""
    resume: bool = False
    """continue the run in --out after its last finished iteration (same arguments; --iterations may rise)"""


def resolve_args(args: Args, world: int = 1) -> Args:
    """Fill the None fields from the preset, check them, derive sizes."""
    utils.check_flags(args, {"method": sorted(METHODS), "preset": ("toy", "paper", "auto")})
    preset = args.preset if args.preset != "auto" else ("toy" if not args.model else "paper")
    args = dataclasses.replace(args, preset=preset, **{k: v for k, v in PRESETS[preset].items()
                                                        if getattr(args, k) is None})
    training.check_sft_args(args, world)
    sampling.check_mu_args(args)
    utils.check_flags(args, at_least=dict.fromkeys(("iterations", "group_size", "max_tokens", "sample_batch",
                                                    "eval_samples"), 1)
                      | dict.fromkeys(("problems", "eval_problems", "max_model_len", "save_every"), 0))
    if not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise utils.UserError("--temperature must be > 0 and 0 < --top-p <= 1")
    if args.min_gain is not None and not -1.0 <= args.min_gain <= 1.0:
        raise utils.UserError(f"--min-gain must be in [-1, 1] (a gain is a difference of two success rates), "
                              f"got {args.min_gain}")
    if args.min_gain is not None and args.method != "mrt":
        raise utils.UserError(f"--min-gain sets --method mrt's filter; --method {args.method} keeps the "
                              f"first correct sample")
    return args


# what --resume may change (--iterations may rise); others unlike <out>/args.json change the run: refused
RESUME_FREE = training.RESUME_FREE + ("iterations", "max_model_len")


# ---- Alg. 1, filter: which of a problem's G continuations (or attempts) is kept ------
def select_continuation(r0: float, rewards, correct, min_gain: float | None = None) -> int | None:
    """MRT's filter (Alg. 1, Fig. 4): the index of the highest r_i among the continuations whose z2
    is correct (never an incorrect one, however high its r_i) and whose gain passes: r_i > r0 if
    min_gain is None (Alg. 1), else r_i - r0 >= min_gain (0: Fig. 4); ties to the first; else None."""
    if len(rewards) != len(correct):
        raise ValueError(f"{len(rewards)} rewards but {len(correct)} correctness flags")
    passes = (lambda r: r > r0) if min_gain is None else (lambda r: r - r0 >= min_gain)  # noqa: E731
    ok = [i for i, (r, c) in enumerate(zip(rewards, correct)) if c and passes(r)]
    return max(ok, key=lambda i: (rewards[i], -i)) if ok else None  # ties: the first


def select_first_correct(correct) -> int | None:
    """The STaR / RISE filter: the first correct sample, None when none is."""
    return next((i for i, ok in enumerate(correct) if ok), None)


def continuation_cue(method: str, z0: str) -> str:
    """What continuations follow: z0, the marker, "Step" (mrt: names the restart) or "Step 1:" (rise)."""
    return backtrack_cue(z0) + (" 1:" if method == "rise" else "")


def parse_continuation(method: str, z0: str, text: str, finish_reason: str, gold: str, reward: str = "",
                       record: dict | None = None) -> dict:
    """{completion, episodes (or None), correct} of one continuation. Correct: it parses into z0/z1/z2,
    split where the cue was appended, and z2 alone passes sampling.sample_outcome (cut: 0)."""
    completion = continuation_cue(method, z0) + text
    ep = split_continuation(z0, completion)
    ok = ep is not None and sampling.sample_outcome(ep.z2, gold, finish_reason, reward, record) == 1.0
    return {"completion": completion, "episodes": ep, "correct": ok}


# ---- Alg. 1, sample -> reward -> filter on the current model; held-out accuracy ------
def rollout_chunk(sampler, mu: sampling.MetaProver | None, problems: list[dict], z0s: dict, args: Args,
                  seed: int) -> list[dict]:
    """One record per problem: its G samples (text, parsed, correct, r_i), r0 and the kept
    index (None if none), and the kept example."""
    if not problems:
        return []
    G, kw = args.group_size, dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                  seed=seed)
    if args.method == "star":  # G direct attempts, the first correct kept
        records, outs = [], sampling.sample_attempts(sampler, [p["prompt"] for p in problems], G, **kw)
        for p, group in zip(problems, outs):
            correct = [sampling.sample_outcome(s.text, p["answer"], s.finish_reason, args.reward,
                                               p.get("record")) == 1.0 for s in group]
            kept = select_first_correct(correct)
            example = None if kept is None else {
                "id": p["id"], "problem": p["problem"], "answer": p["answer"], "prompt": p["prompt"],
                "completion": group[kept].text, "index": kept, "correct": correct}
            records.append({"id": p["id"], "r0": None, "kept": kept, "example": example,
                            "samples": [{"text": s.text, "correct": c} for s, c in zip(group, correct)]})
        return records

    prompts = [utils.encode(sampler.tokenizer, p["prompt"] + continuation_cue(args.method, z0s[p["id"]]))
               for p in problems]
    outs = sampler.generate(prompts, n=G, logprobs=False, **kw)  # (P, G) samples
    parsed = [[parse_continuation(args.method, z0s[p["id"]], s.text, s.finish_reason, p["answer"],
                                  args.reward, p.get("record")) for s in group]
              for p, group in zip(problems, outs)]
    # J(mu | q, z0) and J(mu | q, z0, z1_i) of the parsed continuations in one call; an unparsed
    # continuation has no backtrack episode: J after it is 0 (infogain.backtrack_gain), mu is not asked
    where = [(i, j) for i, group in enumerate(parsed) for j, c in enumerate(group) if c["episodes"]]
    eps = [parsed[i][j]["episodes"] for i, j in where]
    contexts = ([p["prompt"] + z0s[p["id"]] for p in problems]
                + [problems[i]["prompt"] + ep.z0 + ep.z1 for (i, _), ep in zip(where, eps)])
    golds = [p["answer"] for p in problems] + [problems[i]["answer"] for i, _ in where]
    J = mu.success_rates(contexts, golds, seed=utils.derive_seed(seed, "meta-prover"))  # (P + parsed,)
    r0s, rs = J[: len(problems)], np.zeros((len(problems), G))  # (P,), (P, G)
    for (i, j), x in zip(where, J[len(problems):]):
        rs[i, j] = x
    records = []
    for p, group, samples, r0, r in zip(problems, parsed, outs, r0s, rs):
        correct, rewards, r0 = [c["correct"] for c in group], [float(x) for x in r], float(r0)
        kept = (select_continuation(r0, rewards, correct, args.min_gain) if args.method == "mrt"
                else select_first_correct(correct))
        ep = group[kept]["episodes"] if kept is not None else None
        example = None if kept is None else {
            "id": p["id"], "problem": p["problem"], "answer": p["answer"], "prompt": p["prompt"], "z0": ep.z0,
            "z1": ep.z1, "z2": ep.z2, "restart_step": ep.restart_step,
            "completion": group[kept]["completion"], "r0": r0, "r": rewards[kept],
            "gain": backtrack_gain(r0, rewards[kept]), "index": kept, "rewards": rewards, "correct": correct}
        records.append({"id": p["id"], "r0": r0, "kept": kept, "example": example, "samples": [
            {"text": s.text, "parsed": c["episodes"] is not None, "correct": c["correct"], "r": x,
             "gain": backtrack_gain(r0, x if c["episodes"] else None)}
            for s, c, x in zip(samples, group, rewards)]})
    return records


def collect(sampler, mu: sampling.MetaProver | None, problems: list[dict], z0s: dict, args: Args,
            iteration: int) -> list[dict]:
    """rollout_chunk over every training problem: problems split over the ranks, in chunks of
    --sample-batch (the same number of chunks on every rank), gathered in problem order."""
    from tqdm import tqdm

    rank, world = utils.rank(), utils.world_size()
    mine, B, records = problems[rank::world], args.sample_batch, []
    for c in tqdm(range(-(-len(problems) // (world * B))), disable=not utils.is_main(),  # same count per rank
                  desc=f"{args.method} iteration {iteration}: sample"):
        seed = utils.derive_seed(args.seed, "rollout", iteration, c * world + rank)
        records += rollout_chunk(sampler, mu, mine[c * B:(c + 1) * B], z0s, args, seed)
    return sorted([r for part in utils.all_gather(records) for r in part], key=lambda r: r["id"])


def heldout_accuracy(sampler, problems: list[dict], z0s: dict, args: Args, seed: int) -> float | None:
    """Mean accuracy of --eval-samples samples per held-out problem in the method's format (backtrack:
    the base's z0, the cue, z2 graded; direct: a plain attempt); a cut sample scores 0 (sample_outcome)."""
    if not problems:
        return None
    mine, scores, n = problems[utils.rank()::utils.world_size()], [], args.eval_samples
    kw = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
              seed=utils.derive_seed(seed, utils.rank()))
    if mine and args.method == "star":
        outs = sampling.sample_attempts(sampler, [p["prompt"] for p in mine], n, **kw)  # (P, n) samples
        scores = [sampling.sample_outcome(s.text, p["answer"], s.finish_reason, args.reward, p.get("record"))
                  for p, g in zip(mine, outs) for s in g]
    elif mine:
        cues = [continuation_cue(args.method, z0s[p["id"]]) for p in mine]
        prompts = [utils.encode(sampler.tokenizer, p["prompt"] + c) for p, c in zip(mine, cues)]
        outs = sampler.generate(prompts, n=n, logprobs=False, **kw)  # (P, n) samples
        for p, c, g in zip(mine, cues, outs):
            for s in g:
                ep = split_continuation(z0s[p["id"]], c + s.text)
                scores.append(sampling.sample_outcome(ep.z2, p["answer"], s.finish_reason, args.reward,
                                                      p.get("record")) if ep else 0.0)
    return float(np.mean([x for part in utils.all_gather(scores) for x in part]))


# ---- Main: Alg. 1 --------------------------------------------------------------------
def main(args: Args) -> dict:
    """Run the iterations; returns the summary. A ready engine of the base (sampling.READY) gets
    the base weights first and is left holding the last fine-tuned model."""
    world = utils.init_distributed()[1]
    args = resolve_args(args, world)
    fmt, out = METHODS[args.method], args.out or os.path.join("runs", "star", args.method)

    # ---- inputs first: bad input fails before an engine starts or a file is written ----------
    for flag, path in (("--data", args.data), ("--test-data", args.test_data)):
        if path and not os.path.isfile(path):
            raise utils.UserError(f"{flag}: no such file: {path}")
    default_path, toy_paths = ((args.model, None) if args.model and args.data and args.test_data
                               else toy.default_model())  # the toy's data where none is given
    model_path = args.model or default_path
    base_path = args.base or model_path
    args = dataclasses.replace(args, instruction=utils.stage_instruction(args.instruction, model_path))
    for path in dict.fromkeys(p for p in (model_path, base_path, args.mu_model) if p):
        utils.load_tokenizer(path)  # a missing or unloadable model is a one-line error
    own_args = json.loads(json.dumps(dataclasses.asdict(args)))
    history, accumulated = utils.resume_iterations(out, own_args, RESUME_FREE) if args.resume else ([], [])
    mu_tokens = args.mu_rollout_tokens if args.mu_mode == "rollout" else args.mu_max_tokens
    budget = args.max_tokens + (args.max_tokens + 64 + mu_tokens if fmt == "backtrack" else 0)
    data = dict(tokenizer=utils.load_tokenizer(base_path), problem_field=args.problem_field,
                answer_field=args.answer_field, answer_from=args.answer_from, instruction=args.instruction,
                max_prompt_tokens=(args.max_model_len or sampling.model_positions(base_path)) - budget,
                too_long="lower --max-tokens or raise --max-model-len", keep_record=bool(args.reward))
    grade = utils.make_grader(args.reward)  # a --reward that cannot be imported fails before any model loads
    train = utils.load_problems(args.data or toy_paths["train"], limit=args.problems, **data)
    test = (utils.load_problems(args.test_data or toy_paths["test"], limit=args.eval_problems, **data)
            if args.eval_problems else [])
    utils.seed_everything(args.seed)
    utils.print0(f"star: method {args.method} ({fmt}), preset {args.preset}, model {model_path}, base "
                 f"{base_path}, {len(train)} problems x G={args.group_size}, {args.iterations} iterations, "
                 f"world {world}")

    # ---- Alg. 1, z0: the base's attempt at every train and held-out problem, once --------------
    t0, longest = time.time(), max(p["prompt_tokens"] for p in train + test)
    engine_kw = dict(seed=args.seed, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                     max_model_len=args.max_model_len or sampling.engine_length(base_path, longest + budget))
    sampler = sampling.engine(base_path, sleep_mode=args.sleep_mode, **engine_kw)
    if base_path in sampling.READY:  # it may hold other weights: z0 comes from the base (read on the CPU)
        sampler.sync_weights(sampling.load_on_host(base_path, args.dtype))
    z0s, z0_dropped = {"train": {}, "test": {}}, None
    if fmt == "backtrack":  # a cut or box-less z0 is resampled, then its problem dropped (sampling.sample_z0)
        z0s, lost = sampling.sample_z0_splits(
            sampler, {"train": train, "test": test}, os.path.join(out, "z0.jsonl"), seed=args.seed,
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
        z0_dropped = {s: len(ids) for s, ids in lost.items()}
        train, test = ([p for p in ps if p["id"] in z0s[s]] for s, ps in (("train", train), ("test", test)))
        acc = np.mean([grade(z0s["train"][p["id"]], p["answer"], p.get("record")) for p in train])
        utils.print0(f"sampled z0 of the base for {len(train)} train and {len(test)} held-out problems in "
                     f"{time.time() - t0:.0f}s (train accuracy {acc:.3f}); dropped {z0_dropped['train']} "
                     f"train and {z0_dropped['test']} held-out problems with no usable z0 in "
                     f"{sampling.Z0_TRIES} tries (cut at --max-tokens or no box)")
    if model_path != base_path:
        sampler.sync_weights(sampling.load_on_host(model_path, args.dtype))
    if fmt == "backtrack" and utils.model_format(model_path) != "backtrack":
        utils.print0(f"warning: the starting model {model_path} has no mrt.json with format 'backtrack' (not "
                     f"warmstarted): expect few parsable, correct continuations; run warmstart.py first")
    mu = None if fmt != "backtrack" else sampling.MetaProver(
        sampling.engine(args.mu_model, **dict(engine_kw, sleep_mode="off")) if args.mu_model else sampler,
        suffix=args.mu_suffix, m=args.mu_samples, temperature=args.mu_temperature, reward=args.reward,
        max_tokens=args.mu_max_tokens, mode=args.mu_mode, rollout_tokens=args.mu_rollout_tokens)
    eval_seed = utils.derive_seed(args.seed, "held-out")
    accuracy = [history[0]["accuracy_before"] if history
                else heldout_accuracy(sampler, test, z0s["test"], args, eval_seed)]
    if test:
        utils.print0(f"held-out accuracy of the starting model: {accuracy[0]:.4f} ({len(test)} x "
                     f"{args.eval_samples})")
    if utils.is_main():
        utils.write_json(os.path.join(out, "args.json"), own_args)

    def finetune(k: int, rec: dict) -> None:  # Alg. 1, SFT -> sync: the base on everything kept so far
        card = dict(stage="star", method=args.method, variant=args.method, format=fmt, base=base_path,
                    start=model_path, iteration=k, examples=len(accumulated), args=dataclasses.asdict(args))
        # the engine sleeps through the SFT (--sleep-mode); the next iteration and mu sample the new model
        rec.update(sampling.sft_asleep(
            sampler, base_path, [training.sft_example(e, args.z0_loss) for e in accumulated],
            dataclasses.replace(args, seed=args.seed + k), model_dir=os.path.join(out, "model"),
            log_path=os.path.join(out, f"sft_iter{k}.jsonl"), ckpt_path=os.path.join(out, f".sft_iter{k}"),
            card=card, log_extra={"method": args.method, "iteration": k}))

    # ---- resume: the finished iterations' model in the engine (their data is `accumulated`) -----
    done, model_saved = len(history), bool(history) and bool(accumulated)
    accuracy += [r["accuracy_after"] for r in history]
    if model_saved:
        card_path = os.path.join(out, "model", "mrt.json")
        card = json.load(open(card_path)) if os.path.isfile(card_path) else {}
        if card.get("iteration") == done and card.get("examples") == len(accumulated):
            sampler.sync_weights(sampling.load_on_host(os.path.join(out, "model"), args.dtype))
        else:  # killed after the next SFT wrote model/: iteration `done`'s SFT again (same data, seed)
            finetune(done, {})
    if done:
        utils.print0(f"resumed {out} after iteration {done} ({len(accumulated)} examples kept so far)")

    # ---- Alg. 1, iterations: sample -> filter -> SFT the base on everything kept -> sync --------
    logger = utils.JsonlLogger(os.path.join(out, "iterations.jsonl"), report_to=args.report_to,
                               resume_step=done if args.resume else None, config=dataclasses.asdict(args))
    for k in range(done + 1, args.iterations + 1):
        t0 = time.time()
        records = collect(sampler, mu, train, z0s["train"], args, k)
        kept = [dict(r["example"], iteration=k) for r in records if r["example"] is not None]
        accumulated += kept
        if utils.is_main():
            utils.write_jsonl(os.path.join(out, f"data_iter{k}.jsonl"), kept)
        rec = {"step": k, "iteration": k, "method": args.method,
               **utils.iteration_stats(records, args.method, select_continuation),
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
        rec["seconds_sft"], t0 = round(time.time() - t0, 1), time.time()
        accuracy.append(heldout_accuracy(sampler, test, z0s["test"], args, eval_seed))
        rec.update(accuracy_before=accuracy[-2], accuracy_after=accuracy[-1],
                   seconds_eval=round(time.time() - t0, 1))
        if test:
            utils.print0(f"iteration {k}: held-out accuracy {accuracy[-2]:.4f} -> {accuracy[-1]:.4f}")
        logger.log(rec)
        history.append(rec)

    summary = dict(method=args.method, format=fmt, model=model_path, base=base_path, problems=len(train),
                   heldout_problems=len(test), z0_dropped=z0_dropped, accuracy=accuracy,
                   examples=len(accumulated), model_dir=os.path.join(out, "model") if model_saved else None,
                   iterations=history, args=dataclasses.asdict(args))
    if utils.is_main():
        utils.write_json(os.path.join(out, "summary.json"), summary)
    utils.print0(f"wrote {out}: " + ("z0.jsonl, " if fmt == "backtrack" else "") + "data_iter*.jsonl, " +
                 ("sft_iter*.jsonl, " if model_saved else "") + "iterations.jsonl, summary.json" +
                 (", model/" if model_saved else " (no model: nothing was kept)"))
    return summary


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
