"""r1_analysis.py: episodes, [maj@p]_j and cumulative regret of a reasoning model's traces (MRT paper
Sec. 4, App. D, Fig. 2, 11-15).

The paper's study of DeepSeek-R1: does thinking longer make progress? Each trace's thinking block is split
into episodes (a new one starts at a step that opens with a phrase of Fig. 11: "Wait", "Alternatively",
...), consecutive episodes are grouped, and after every prefix z_{0:j-1} (the first j groups) a
meta-prover is told to stop and answer now (Fig. 12). From p answers per prefix: [maj@p]_j, the exact
expected accuracy of a majority vote over p of them (p in {1, 2, 8}; [maj@1]_j is J(mu | z_{0:j-1})), at
the prefix's thinking tokens + p x the mean answer tokens; a direct baseline, pass@k (k in {1, 2, 8, 16,
32}) of a direct model at k x its mean generated tokens; per bin of traces (by episode count) the mean
[maj@1]_j curve, the dashed [maj@p]_j branches and the baseline (Fig. 2, 13, 14), the cumulative regret
sum_j (J* - [maj@1]_j) (Def. 3.1); the histogram of episode counts (Fig. 15).

Run (CPU, embedded default, a few minutes): the toy model writes long multi-episode traces (linearized
rounds as evaluate.py samples them: round r+1 continues after "Wait, this seems off. Let's try something
else.", a step that opens with "Wait") and is the meta-prover and the baseline; 32 test problems x 4 stems:
    python r1_analysis.py
A reasoning model on one GPU (R1 distill: sample K = 4 stems, then the analysis; AIME: add --group-size 3):
    python r1_analysis.py --generate --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --data omni_math.jsonl \\
        --problems 200 --direct-model Qwen/Qwen2.5-Math-7B-Instruct --max-model-len 16384 --out runs/r1/omni
Traces you already have (JSONL or Parquet rows of problem, answer and the model's output with its <think>
block; field names are flags), the same model as meta-prover:
    python r1_analysis.py --traces r1_traces.jsonl --trace-field output \\
        --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --max-model-len 16384 --out runs/r1/file
A toy checkpoint (e.g. after MRT training) with the toy's settings, the toy base as baseline:
    python r1_analysis.py --generate --model runs/grpo/mrt/model --preset toy --out runs/r1/toy-mrt
Several GPUs: `torchrun --nproc_per_node 8 r1_analysis.py ...` (main). Outputs under --out: summary.json
(every number), table.md, accuracy_tokens.png (one panel per bin), episodes_hist.png, traces.jsonl (per
trace: episode count, per prefix the answers, [maj@p]_j, tokens; regret), direct.jsonl (the baseline's
graded samples), generated_traces.jsonl when traces were sampled (reusable with --traces), metrics.jsonl.

Decisions and departures from the paper (which publishes no code for this study):
- Thinking text, steps, episodes: extract_thinking, split_steps, opens_episode, split_episodes.
- j runs over 1..G groups: the empty prefix (an answer without thinking) is not a point.
- --mu-suffix is Fig. 12's text for real models and utils.MU_SUFFIX for the toy, which was pretrained to
  answer after it and never saw Fig. 12's text; mu's graded text is suffix + completion.
- Tokens: a prefix costs its thinking tokens (the prompt and the forced suffix are not charged);
  [maj@p]_j sits at prefix + p x (mean answer tokens of the p_max answers), the baseline at k x (mean
  generated tokens). The p_max answers of a prefix are one request with n = p_max (prefilled once; with
  prefix caching a trace's G contexts share their common KV blocks).
- Bins: lower edges in episodes (--bins 1 6 11: 1-5, 6-10, 11+; or auto_bins); the curve at j averages
  the bin's traces with at least j groups (bin_curve); the baseline, its traces' problems' pass@k.
- Regret (regret_of): against J* = --j-star, else the best [maj@p]_j observed over p and j (what the
  meta-prover reached with the same traces), so regret >= 0: per bin, and per trace (traces.jsonl).
- Toy stand-in for a model that decides when to stop thinking: --stop-when-repeated, so harder problems
  get more episodes, as in R1's traces.
- The toy default shows the pipeline, not the paper's finding: the toy base never saw the backtrack
  marker, so its later rounds are poor, and its meta-prover (pretrained on clean prefixes) often fails to
  copy the boxed answer of a finished, slipped solution, so [maj@1]_j falls after the first episode
  (RESULTS.md has the toy base's and MRT-B (RL)'s numbers). Run it on a real reasoning model.
- Input errors (missing file, malformed line or field, unparsable answer, empty thinking, bad model path,
  a context too long for the meta-prover) are one line and exit status 2 before any output is written;
  --skip-invalid skips the offending traces instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from tqdm import tqdm

import evaluate
import sampling
import toy
import utils

FIG11_PHRASES = ("Wait", "But wait", "Alternatively", "Is there another way to think about this?",
                 "But let me double-check", "But hold on")
"""Phrases that open a new episode in DeepSeek-R1's thinking (paper Fig. 11)."""

FIG12_SUFFIX = ("Time is up.\n\nGiven the time I've spent and the approaches I've tried, I should stop "
                "thinking and formulate a final answer based on what I already have.\n</think>\n\n"
                "**Step-by-Step Explanation and Answer:**\n\n1. **")
"""The meta-prover's forced text after a thinking prefix (paper Fig. 12)."""

# ---- Episodes (paper App. D, Fig. 11) ------------------------------------------------


def extract_thinking(trace: str) -> tuple[bool, str]:
    """(opened, thinking): whether the trace opens with "<think>" (after whitespace), and the text up to
    "</think>" (the answer after it is not analysed) or the end (a cut trace, a template that opened it)."""
    m = re.match(r"\s*<think>[ \t]*\r?\n?", trace)
    return m is not None, (trace[m.end():] if m else trace).split("</think>", 1)[0]


def split_steps(thinking: str, delimiter: str = "\n\n") -> list[str]:
    """The steps of a thinking text: split on the delimiter, whitespace-only steps dropped."""
    if not delimiter:
        raise ValueError("the step delimiter must not be empty")
    return [s for s in thinking.split(delimiter) if s.strip()]


def opens_episode(step: str, phrases=FIG11_PHRASES) -> bool:
    """Whether a step starts with one of the phrases (after leading whitespace, case-sensitive; a phrase
    that ends in a letter or digit must end a word there: "Waiting" is not "Wait")."""
    s = step.lstrip()
    for ph in phrases:
        nxt = s[len(ph):len(ph) + 1]
        if ph and s.startswith(ph) and (not ph[-1].isalnum() or not nxt or not (nxt.isalnum() or nxt == "_")):
            return True
    return False


def split_episodes(thinking: str, phrases=FIG11_PHRASES, min_steps: int = 3, max_episodes: int | None = None,
                   delimiter: str = "\n\n") -> list[str]:
    """Episodes of a thinking text (its steps re-joined). A step that opens with a phrase starts one (a
    phrase inside a step never does), unless fewer than min_steps steps have passed since the current one
    started or would remain to the end (so every episode has at least min_steps steps, unless the whole
    text has fewer). With max_episodes, episodes from the max_episodes-th on are merged into one."""
    if min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")
    if max_episodes is not None and max_episodes < 1:
        raise ValueError(f"max_episodes must be >= 1 or None, got {max_episodes}")
    steps = split_steps(thinking, delimiter)
    starts = [0] if steps else []
    for i, step in enumerate(steps):
        if i and i - starts[-1] >= min_steps and len(steps) - i >= min_steps and opens_episode(step, phrases):
            starts.append(i)
    bounds = (starts if max_episodes is None else starts[:max_episodes]) + [len(steps)]
    return [delimiter.join(steps[a:b]) for a, b in zip(bounds, bounds[1:])]


def group_episodes(episodes: list[str], size: int, delimiter: str = "\n\n") -> list[str]:
    """Consecutive groups of `size` episodes (the last may be shorter), each joined by the delimiter."""
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    return [delimiter.join(episodes[i:i + size]) for i in range(0, len(episodes), size)]


def meta_prover_prompt(tokenizer, problem: str, prefix: str, suffix: str = FIG12_SUFFIX,
                       instruction: str = utils.DEFAULT_INSTRUCTION, think_open: str = "",
                       sep: str = "\n\n") -> str:
    """The text the meta-prover continues (Fig. 12): the problem in the chat template (utils.build_prompt),
    `think_open` ("<think>\\n" for a trace that opened its thinking with it, unless the template already
    ends with it), the prefix (right-stripped), `sep` (none after an empty prefix), the suffix. A suffix
    that starts with a newline replaces `sep` (sampling.mu_context)."""
    head = utils.build_prompt(tokenizer, problem, instruction)
    if think_open and not head.rstrip().endswith(think_open.strip()):
        head += think_open
    if suffix.startswith(("\n", "\r\n")):
        return sampling.mu_context(head + prefix.rstrip(), suffix)
    prefix = prefix.rstrip()
    return head + (prefix + sep if prefix.strip() else "") + suffix


# ---- Pure metrics: [maj@p]_j tables, bins, curves, regret, the direct baseline -------


def maj_values(answers, gold, ps, right: set | None = None) -> dict[int, float]:
    """{p: [maj@p]} for one prefix's answers (None never votes), as evaluate.maj_at_k; `right`: the answers
    a custom --reward graded 1 (evaluate.cluster_answers)."""
    counts, correct, n_none = evaluate.cluster_answers(answers, gold, right)
    curve = evaluate.majority_curve(counts, correct, n_none) if counts else np.zeros(len(answers))
    for p in ps:
        if not 1 <= p <= len(answers):
            raise ValueError(f"maj@{p} needs 1 <= p <= {len(answers)} answers")
    return {int(p): float(curve[p - 1]) for p in ps}


def auto_bins(group_counts, group_size: int) -> list[int]:
    """Lower edges (in episodes) of the default bins: one bin per distinct group count when there are at
    most 6, else 4 equal ranges of group counts ([1] without any)."""
    gs = sorted(set(int(g) for g in group_counts))
    lows = gs if len(gs) <= 6 else list(range(gs[0], gs[-1] + 1, math.ceil((gs[-1] - gs[0] + 1) / 4)))
    return [(g - 1) * group_size + 1 for g in lows] or [1]


def bin_labels(edges: list[int]) -> list[str]:
    """'1-5', '6-10', '11+' for lower edges [1, 6, 11] ('3' for a one-value bin)."""
    return [f"{a}+" if b is None else str(a) if b - 1 == a else f"{a}-{b - 1}"
            for a, b in zip(edges, edges[1:] + [None])]


def assign_bin(episodes: int, edges: list[int]) -> int | None:
    """Index of the bin holding an episode count (None below the first edge)."""
    i = int(np.searchsorted(edges, episodes, side="right")) - 1
    return None if i < 0 else i


def bin_curve(traces: list[dict], ps) -> dict:
    """Mean [maj@p]_j and tokens over a bin's traces (each with "points": [{"prefix_tokens",
    "answer_tokens", "maj": {p: value}}] per j); point j averages the n[j] traces with at least j groups."""
    G = max(len(t["points"]) for t in traces)
    pts = [[t["points"][j] for t in traces if len(t["points"]) > j] for j in range(G)]  # points j of the bin

    def mean(value) -> list[float]:  # per j, the mean of value(point)
        return [float(np.mean([value(q) for q in at_j])) for at_j in pts]

    return {"j": list(range(1, G + 1)), "n": [len(at_j) for at_j in pts],
            "prefix_tokens": mean(lambda q: q["prefix_tokens"]),
            "tokens": {str(p): mean(lambda q: q["prefix_tokens"] + p * q["answer_tokens"]) for p in ps},
            "maj": {str(p): mean(lambda q: q["maj"][str(p)]) for p in ps}}


def regret_of(curve: dict, j_star: float | None = None) -> dict:
    """Cumulative regret of a curve's [maj@1]_j (Def. 3.1) against J* = j_star, else its best [maj@p]_j."""
    star = max(max(v) for v in curve["maj"].values()) if j_star is None else float(j_star)
    running = evaluate.cumulative_regret(curve["maj"]["1"], star, running=True)
    return {"j_star": star, "j_star_source": "best observed" if j_star is None else "given",
            "running": running, "total": running[-1]}


def direct_curve(correct_counts, gen_tokens, n: int, ks) -> dict:
    """pass@k (the mean over entries of correct counts out of n) at k x the mean of gen_tokens."""
    ks = [int(k) for k in ks]
    return {"k": ks, "tokens": [float(k * np.mean(gen_tokens)) for k in ks],
            "pass": [float(np.mean([evaluate.pass_at_k(n, int(c), k) for c in correct_counts])) for k in ks]}


# ---- Command line, engine sizes ------------------------------------------------------

TOY_DEFAULTS = dict(problems=32, max_tokens=96, rounds=8, window=1024, delimiter="\n", group_size=1,
                    mu_suffix=utils.MU_SUFFIX, mu_max_tokens=8, direct_max_tokens=96)
"""The toy preset: the toy's context is 2048 tokens, its steps are lines, it answers after utils.MU_SUFFIX."""
REAL_DEFAULTS = dict(problems=0, max_tokens=8192, rounds=1, window=2048, delimiter="\n\n", group_size=5,
                     mu_suffix=FIG12_SUFFIX, mu_max_tokens=4096, direct_max_tokens=None)
"""The paper preset, for a real reasoning model (direct_max_tokens None: --max-tokens)."""


@dataclass
class Args(utils.DataArgs):
    """This stage's own flags; the bases add those every stage spells alike (--help lists all)."""
    preset: str = "auto"
    """defaults of the settings left unset: toy or paper; auto: toy when --model is empty, else paper"""
    traces: str = ""
    """JSONL or Parquet of (problem, answer, trace) rows, the trace with its <think> block; needs --model"""
    generate: bool = False
    """sample --k stems per problem of --data from --model instead of reading --traces"""
    model: str = ""
    """the reasoning model: writes the stems (--generate), is the meta-prover unless --mu-model; empty: toy"""
    mu_model: str = ""
    """meta-prover model (empty: --model)"""
    direct_model: str = ""
    """model of the pass@k baseline (empty: the toy base with the toy preset, else none; 'none': none)"""
    data: str = ""
    """problems for --generate (empty: the toy test split)"""
    trace_field: str = "trace"
    """field of the model's output (with its <think> block) in --traces"""
    id_field: str = "id"
    """field of the trace id in --traces (rows without one get their line number)"""
    problems: int | None = None
    """first N problems (--generate) or trace rows (--traces); 0: all (toy preset 32; paper preset 0)"""
    skip_invalid: bool = False
    """skip (and count) traces with no thinking text or too long for the meta-prover instead of failing"""
    k: int = 4
    """K: stems sampled per problem"""
    temperature: float = 0.7
    """sampling temperature of the stems and of the direct baseline"""
    max_tokens: int | None = None
    """token limit of a stem (of each round when --rounds > 1) (toy preset 96; paper preset 8192)"""
    rounds: int | None = None
    """1: one generation per stem; R > 1: up to R linearized rounds (toy preset 8; paper preset 1)"""
    window: int | None = None
    """linearized rounds see the latest W transcript tokens (toy preset 1024; paper preset 2048)"""
    stop_when_repeated: bool = True
    """a linearized stream ends at the first round whose answer repeats the previous round's"""
    phrases: list[str] = field(default_factory=lambda: list(FIG11_PHRASES))
    """phrases that open an episode when a step starts with them (paper Fig. 11)"""
    delimiter: str | None = None
    """step delimiter; blank steps dropped (toy preset '\\n'; paper preset '\\n\\n'; in bash pass $'\\n')"""
    min_steps: int = 3
    """least steps per episode"""
    max_episodes: int = 0
    """cap on episodes per trace, the rest merged into the last (0: no cap)"""
    group_size: int | None = None
    """consecutive episodes per group (toy preset 1; paper preset 5, the paper's Omni-MATH value; AIME: 3)"""
    bins: list[int] = field(default_factory=list)
    """lower edges of the episode-count bins, e.g. 1 6 11 (empty: auto_bins; aligned to --group-size, a bin's
    traces have one group count)"""
    p: int = 8
    """answers sampled from the meta-prover per prefix"""
    maj: list[int] = field(default_factory=lambda: [1, 2, 8])
    """majority sizes p of [maj@p]_j (each <= --p; 1 is always included)"""
    mu_suffix: str | None = None
    """forced text after the prefix (toy preset utils.MU_SUFFIX; paper preset the Fig. 12 text)"""
    mu_temperature: float = 0.7
    """meta-prover sampling temperature"""
    mu_max_tokens: int | None = None
    """meta-prover answer length limit (toy preset 8; paper preset 4096)"""
    direct_n: int = 32
    """samples per problem from the direct model"""
    direct_k: list[int] = field(default_factory=lambda: [1, 2, 8, 16, 32])
    """k of the baseline's pass@k (each <= --direct-n)"""
    direct_max_tokens: int | None = None
    """token limit of a direct sample (toy preset 96; paper preset: --max-tokens)"""
    j_star: float | None = None
    """comparator success rate J* of the regret (default: the best [maj@p]_j observed per bin)"""
    batch: int = 64
    """traces per meta-prover call (progress granularity)"""
    seed: int = 0
    """sampling seed"""
    out: str = "runs/r1_analysis"
    """output folder"""
    toy_dir: str = toy.DEFAULT_DIR
    """toy build used by the embedded default (built if missing)"""
    max_model_len: int = 0
    """engine context length (0: what this run needs, engine_needs; never the model's whole context)"""
    gpu_memory_utilization: float = 0.0
    """GPU memory fraction per engine (0: 0.85 over the engines up at once: 1; under torchrun, 1 per model)"""


def resolve(args: Args) -> tuple[Args, bool]:
    """Fill the settings left as None from --preset, check the rest. Returns (args, toy preset?)."""
    if args.traces and args.generate:
        raise utils.UserError("give either --traces FILE or --generate, not both")
    if args.traces and not args.model:
        raise utils.UserError("--traces needs --model: the meta-prover (usually the model that wrote the "
                              "traces)")
    if args.model and not (args.traces or args.generate):
        raise utils.UserError("--model: give --traces FILE or --generate (sample stems from the model)")
    if args.preset not in ("auto", "toy", "paper"):
        raise utils.UserError(f"--preset: expected auto, toy or paper, got {args.preset!r}")
    is_toy = args.preset == "toy" or (args.preset == "auto" and not args.model)
    preset = TOY_DEFAULTS if is_toy else REAL_DEFAULTS
    a = replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    a = replace(a, direct_max_tokens=a.max_tokens) if a.direct_max_tokens is None else a
    ints = ("k", "p", "min_steps", "group_size", "max_tokens", "rounds", "window", "mu_max_tokens",
            "direct_n", "direct_max_tokens", "batch")
    bad = ["--" + name.replace("_", "-") for name in ints if getattr(a, name) < 1]
    if bad or a.problems < 0 or a.max_episodes < 0:
        raise utils.UserError(f"{', '.join(bad) or '--problems/--max-episodes'} must be >= 1 "
                              "(--problems, --max-episodes >= 0)")
    if not a.delimiter:
        raise utils.UserError("--delimiter must not be empty")
    if not [p for p in a.phrases if p]:
        raise utils.UserError("--phrases: give at least one phrase")
    if any(not 1 <= q <= a.p for q in a.maj):
        raise utils.UserError(f"--maj: every size must be in 1..--p ({a.p}), got {a.maj}")
    if any(not 1 <= q <= a.direct_n for q in a.direct_k) or not a.direct_k:
        raise utils.UserError(f"--direct-k: every k must be in 1..--direct-n ({a.direct_n}), "
                              f"got {a.direct_k}")
    if a.bins and (a.bins[0] < 1 or any(b <= e for e, b in zip(a.bins, a.bins[1:]))):
        raise utils.UserError(f"--bins: lower edges must be increasing integers >= 1, got {a.bins}")
    if a.j_star is not None and not 0.0 <= a.j_star <= 1.0:
        raise utils.UserError(f"--j-star must be in [0, 1], got {a.j_star}")
    return replace(a, maj=sorted(set(a.maj) | {1})), is_toy


def engine_needs(args: Args, problems: list[dict] | None, split: list[dict] | None, mu_path: str,
                 direct_path: str) -> dict[str, int]:
    """Tokens an engine sequence may hold, per model path (+ ENGINE_SLACK): stems, the longest prompt +
    --max-tokens (linearized: + --window + cue); the meta-prover, its longest context on given traces
    (`split`), else its prompt + --rounds x (--max-tokens + cue + 2), + --mu-max-tokens; the baseline, the
    longest prompt + --direct-max-tokens."""
    a, mu_tok, needs = args, utils.load_tokenizer(mu_path), {}

    def longest(tok, text=None) -> int:  # tokens of the longest prompt (or text(r)) of the problems / traces
        text = text or (lambda r: utils.build_prompt(tok, r["problem"], a.instruction))
        return max(len(utils.encode(tok, text(r))) for r in (problems if problems is not None else split))

    if problems is not None:
        tok = utils.load_tokenizer(a.model)
        cue = len(utils.encode(tok, utils.BACKTRACK_CUE))
        needs[a.model] = longest(tok) + a.max_tokens + (a.window + cue if a.rounds > 1 else 0)
        head = longest(mu_tok, lambda r: meta_prover_prompt(mu_tok, r["problem"], "", a.mu_suffix,
                                                             a.instruction, "<think>\n", a.delimiter))
        mu = head + a.rounds * (a.max_tokens + cue + 2)
    else:  # the whole thinking block as one group: the longest context
        whole = [{**t, "groups": [a.delimiter.join(t["groups"])]} for t in split]
        mu = max(len(mu_contexts(mu_tok, t, a)[-1][0]) for t in whole)
    needs[mu_path] = max(needs.get(mu_path, 0), mu + a.mu_max_tokens)
    if direct_path:
        n = longest(utils.load_tokenizer(direct_path)) + a.direct_max_tokens
        needs[direct_path] = max(needs.get(direct_path, 0), n)
    return {path: n + sampling.ENGINE_SLACK for path, n in needs.items()}


# ---- Stems, episodes, the meta-prover's answers, the direct baseline -----------------


def sample_traces(sampler, problems: list[dict], args: Args, logger) -> list[dict]:
    """K stems per problem: one generation each (--rounds 1) or linearized rounds (sampling.run_linearized)
    cut after the first round whose answer repeats the previous one's (--stop-when-repeated)."""
    a, tok = args, sampler.tokenizer
    prompt_ids = [utils.encode(tok, utils.build_prompt(tok, r["problem"], a.instruction)) for r in problems]
    reps = [(i, s) for i in range(len(problems)) for s in range(a.k)]
    of = [i for i, _ in reps]  # the problem of each stem
    if a.rounds == 1:
        outs = sampler.generate(prompt_ids, n=a.k, temperature=a.temperature, max_tokens=a.max_tokens,
                                seed=a.seed, logprobs=False, use_tqdm=utils.is_main())
        chains = [[{"text": x.text, "gen_tokens": x.num_tokens, "finish_reason": x.finish_reason}]
                  for group in outs for x in group]
    else:  # one row per round, round after round: stem k's rounds are rows[k::K x problems]
        rows = sampling.run_linearized(sampler, [prompt_ids[i] for i in of], [problems[i] for i in of],
                                       list(range(len(reps))), rounds=a.rounds, window=a.window,
                                       max_len=sampler.max_model_len, temperature=a.temperature, top_p=1.0,
                                       max_tokens=a.max_tokens, seed=a.seed)
        chains = [rows[k::len(reps)] for k in range(len(reps))]
    traces = []
    for (i, s), chain in zip(reps, chains):
        keep = next((r + 1 for r in range(1, len(chain)) if a.stop_when_repeated and chain[r]["answer"]
                     is not None and chain[r]["answer"] == chain[r - 1]["answer"]), len(chain))
        rid, chain = f"{problems[i]['id']}-{s}", chain[:keep]
        traces.append({"id": rid, "problem": problems[i]["problem"], "answer": problems[i]["answer"],
                       "trace": utils.BACKTRACK_CUE.join(c["text"] for c in chain), "rounds": keep,
                       "stem_tokens": sum(c["gen_tokens"] for c in chain),
                       "finish_reason": chain[-1]["finish_reason"], "where": f"sampled {rid}"})
    logger.log({"stage": "stems", "traces": len(traces),
                "mean_stem_tokens": float(np.mean([t["stem_tokens"] for t in traces])),
                "mean_rounds": float(np.mean([t["rounds"] for t in traces]))})
    return traces


def split_traces(traces: list[dict], args: Args) -> tuple[list[dict], int]:
    """Episodes and groups of every trace; traces with no thinking text fail (or are skipped)."""
    kept, skipped, a = [], 0, args
    for t in traces:
        opened, thinking = extract_thinking(t["trace"])
        eps = split_episodes(thinking, a.phrases, a.min_steps, a.max_episodes or None, a.delimiter)
        if eps:
            kept.append({**t, "opened": opened, "episodes": eps,
                         "groups": group_episodes(eps, a.group_size, a.delimiter)})
        elif a.skip_invalid:
            skipped += 1
        else:
            raise utils.UserError(f"{t['where']}: no thinking text (--skip-invalid skips such traces)")
    if not kept:
        raise utils.UserError("no trace has thinking text")
    return kept, skipped


def mu_contexts(tok, t: dict, args: Args) -> list[tuple[list[int], int]]:
    """(prompt ids, prefix tokens) of the meta-prover for j = 1..G groups of a trace."""
    out = []
    for j in range(1, len(t["groups"]) + 1):
        prefix = args.delimiter.join(t["groups"][:j])
        text = meta_prover_prompt(tok, t["problem"], prefix, args.mu_suffix, args.instruction,
                                  "<think>\n" if t["opened"] else "", args.delimiter)
        out.append((utils.encode(tok, text), len(tok(prefix, add_special_tokens=False)["input_ids"])))
    return out


def score_traces(sampler, traces: list[dict], args: Args, logger) -> tuple[list[dict], int]:
    """p answers per prefix from the meta-prover; per trace its points (tokens, answers, [maj@p]_j) and
    regret. Traces whose longest context does not fit fail (or are skipped)."""
    tok, grade, a = sampler.tokenizer, utils.make_grader(args.reward), args
    limit, items, skipped, scored = sampler.max_model_len - a.mu_max_tokens, [], 0, []
    for t in traces:
        ctx = mu_contexts(tok, t, a)
        if len(ctx[-1][0]) <= limit:
            items.append((t, ctx))
        elif a.skip_invalid:
            skipped += 1
        else:
            raise utils.UserError(f"{t['where']}: too long for the meta-prover ({len(ctx[-1][0])} tokens > "
                                  f"{limit} = context length - --mu-max-tokens; raise --max-model-len or "
                                  "--skip-invalid)")
    if not items:
        raise utils.UserError("no trace fits the meta-prover's context length")
    for b in tqdm(range(0, len(items), a.batch), desc="meta-prover", disable=not utils.is_main()):
        chunk = items[b: b + a.batch]
        prompts = [ids for _, ctx in chunk for ids, _ in ctx]
        seed = utils.derive_seed(a.seed, "meta-prover", b)
        outs = iter(sampler.generate(prompts, n=a.p, temperature=a.mu_temperature, max_tokens=a.mu_max_tokens,
                                     seed=seed, logprobs=False))
        for t, ctx in chunk:
            points = []
            for j, (ids, prefix_tokens) in enumerate(ctx, 1):
                group = next(outs)
                answers = [utils.extract_boxed(a.mu_suffix + s.text) or None for s in group]
                right = ({x for x, s in zip(answers, group)  # the answers the custom reward grades 1
                          if x and grade(a.mu_suffix + s.text, t["answer"]) == 1.0} if a.reward else None)
                maj = maj_values(answers, t["answer"], a.maj, right)
                points.append({"j": j, "prefix_tokens": prefix_tokens, "context_tokens": len(ids),
                               "answer_tokens": float(np.mean([s.num_tokens for s in group])),
                               "answers": answers, "maj": {str(p): v for p, v in maj.items()}})
            curve = {"maj": {str(p): [q["maj"][str(p)] for q in points] for p in a.maj}}
            scored.append({"id": t["id"], "where": t["where"], "problem": t["problem"], "answer": t["answer"],
                           "opened_think": t["opened"], "episodes": len(t["episodes"]),
                           "groups": len(t["groups"]), "episode_tokens": [
                               len(tok(e, add_special_tokens=False)["input_ids"]) for e in t["episodes"]],
                           "points": points, "regret": regret_of(curve, a.j_star)})
        J = [q["maj"]["1"] for s in scored[-len(chunk):] for q in s["points"]]
        logger.log({"stage": "meta-prover", "traces_done": len(scored), "contexts": len(prompts),
                    "batch_maj1_mean": round(float(np.mean(J)), 4)})
    return scored, skipped


def run_direct(sampler, problems: list[dict], args: Args, logger) -> list[dict]:
    """--direct-n samples per distinct problem, graded as evaluate.py grades them (sampling.run_parallel)."""
    tok, a = sampler.tokenizer, args
    prompt_ids = [utils.encode(tok, utils.build_prompt(tok, r["problem"], a.instruction)) for r in problems]
    rows = sampling.run_parallel(sampler, prompt_ids, problems, list(range(len(problems))), top_p=1.0,
                                 samples=a.direct_n, temperature=a.temperature, reward=a.reward,
                                 max_tokens=a.direct_max_tokens, seed=utils.derive_seed(a.seed, "direct"))
    logger.log({"stage": "direct", "problems": len(problems),
                "pass@1": float(np.mean([r["correct"] for r in rows])),
                "mean_tokens": float(np.mean([r["gen_tokens"] for r in rows]))})
    return [{k: v for k, v in r.items() if k != "text"} for r in rows]


# ---- Analysis, outputs, main ---------------------------------------------------------


def analyse(scored: list[dict], direct_rows: list[dict] | None, problems: list[str], args: Args) -> dict:
    """Histogram, bins, per-bin curves, regret and baseline from the scored traces."""
    counts, members, bins, direct_by = [s["episodes"] for s in scored], {}, {}, {}
    edges = list(args.bins) or auto_bins([s["groups"] for s in scored], args.group_size)
    for r in direct_rows or []:
        d = direct_by.setdefault(problems[r["problem"]], [0, []])  # problem: [correct samples, their tokens]
        d[0] += int(r["correct"])
        d[1].append(r["gen_tokens"])

    def baseline(ts) -> dict:  # {"direct": the mean over the traces ts of their problem's pass@k}, if any
        ds = [direct_by[t["problem"]] for t in ts] if direct_by else []
        return {"direct": direct_curve([d[0] for d in ds], [np.mean(d[1]) for d in ds], args.direct_n,
                                       args.direct_k)} if ds else {}

    for s in scored:
        members.setdefault(assign_bin(s["episodes"], edges), []).append(s)
    for b, label in enumerate(bin_labels(edges)):
        if ts := members.get(b):
            curve, in_bin = bin_curve(ts, args.maj), {t["problem"] for t in ts}
            bins[label] = {"lower_edge": edges[b], "traces": len(ts), "problems": len(in_bin),
                           "groups": sorted({t["groups"] for t in ts}), "curve": curve,
                           "regret": regret_of(curve, args.j_star), **baseline(ts)}
    overall = {"traces": len(scored), "mean_episodes": float(np.mean(counts)),
               "mean_thinking_tokens": float(np.mean([s["points"][-1]["prefix_tokens"] for s in scored])),
               "maj1_last": float(np.mean([s["points"][-1]["maj"]["1"] for s in scored])),
               "maj1_first": float(np.mean([s["points"][0]["maj"]["1"] for s in scored])),
               "trace_regret_mean": float(np.mean([s["regret"]["total"] for s in scored])),
               **baseline(scored)}
    return {"histogram": {str(e): counts.count(e) for e in sorted(set(counts))}, "bin_edges": edges,
            "unbinned": len(members.get(None, [])), "bins": bins, "overall": overall}


def markdown_table(report: dict, args: Args) -> str:
    """Episode histogram, then per bin: [maj@p]_j and tokens per j, the running regret, the baseline."""
    a, ps = report["analysis"], args.maj
    head = ["j", "traces", *[x for p in ps for x in (f"tokens (p={p})", f"[maj@{p}]_j")], "cumulative regret"]
    star = "given" if args.j_star is not None else "best [maj@p]_j observed in the bin"
    lines = ["# Episode analysis: [maj@p]_j of the meta-prover after j episode groups", "",
             f"{a['overall']['traces']} traces, {args.group_size} episode(s) per group, {args.p} meta-prover "
             "answers per prefix. Tokens: thinking tokens of the prefix + p x mean answer tokens. Regret: "
             f"running sum over j of J* - [maj@1]_j (J*: {star}).", "", "## Episodes per trace", ""]
    lines += utils.markdown_table(["episodes", "traces"], a["histogram"].items())
    for label, b in a["bins"].items():
        c, r = b["curve"], b["regret"]
        lines += ["", f"## {label} episodes: {b['traces']} traces, {b['problems']} problems, "
                      f"J* = {r['j_star']:.3f}", ""]
        rows = [[j, c["n"][i], *[x for p in ps for x in (f"{c['tokens'][str(p)][i]:.0f}",
                                                         f"{100 * c['maj'][str(p)][i]:.1f}")],
                 f"{r['running'][i]:.3f}"] for i, j in enumerate(c["j"])]
        lines += utils.markdown_table(head, rows)
        if "direct" in b:
            d = b["direct"]
            lines += ["", "Direct baseline: " + ", ".join(f"pass@{k} {100 * v:.1f} at {t:.0f} tok"
                                                          for k, t, v in zip(d["k"], d["tokens"], d["pass"]))]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path: str, args: Args) -> None:
    """One panel per bin: [maj@1]_j (solid), from each of its points a dashed [maj@p]_j branch through
    p = 2, 8, ..., and the direct pass@k baseline (Fig. 2, 13, 14 style)."""
    bins = report["analysis"]["bins"]
    fig, axes = utils.panels(len(bins), 3, (5.2, 4.2))
    for ax, (label, b) in zip(axes, bins.items()):
        c = b["curve"]
        ax.plot(c["tokens"]["1"], c["maj"]["1"], "-o", color="tab:blue", ms=4,
                label="[maj@1]_j (continue thinking)")
        for i in range(len(c["j"])):
            ax.plot([c["tokens"][str(p)][i] for p in args.maj], [c["maj"][str(p)][i] for p in args.maj], "--",
                    color="tab:orange", lw=1, marker=".",
                    label="[maj@p]_j, p = " + ", ".join(map(str, args.maj)) if i == 0 else None)
        if "direct" in b:
            ax.plot(b["direct"]["tokens"], b["direct"]["pass"], "-s", color="tab:gray", ms=3,
                    label="direct pass@k")
        ax.set(xscale="log", title=f"{label} episodes ({b['traces']} traces)",
               xlabel="tokens (prefix + answers)", ylabel="accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    utils.save_png(fig, path)


def plot_hist(report: dict, path: str) -> None:
    """Fig. 15: number of traces per episode count; bin edges dashed."""
    a, o = report["analysis"], report["analysis"]["overall"]
    utils.bar_chart({int(e): c for e, c in a["histogram"].items()}, path, xlabel="episodes per trace",
                    ylabel="traces", dashed=[e - 0.5 for e in a["bin_edges"][1:]],
                    title=f"{o['traces']} traces, mean {o['mean_episodes']:.1f} episodes")


def main(args: Args) -> dict:
    """Run the analysis. Under torchrun each rank samples and scores its share of the problems (or traces)
    on its own engine, seeded apart; rank 0 merges the results and writes every output."""
    rank, world, _ = utils.init_distributed()
    args, is_toy = resolve(args)
    # every input is read and checked before an engine starts or a file is written
    if is_toy and not (args.model and args.direct_model):
        base = toy.ensure_built(args.toy_dir)["base"]
        args = replace(args, model=args.model or base, direct_model=args.direct_model or base)
    mu_path = args.mu_model or args.model
    direct_path = "" if args.direct_model.lower() == "none" else args.direct_model
    for flag, path in ("--model", args.model), ("--mu-model", args.mu_model), ("--direct-model", direct_path):
        if path and path not in sampling.READY:
            utils.check_model_flag(path, flag)
    args = replace(args, instruction=utils.stage_instruction(args.instruction, args.model))
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    given = utils.read_traces(args.traces, args.problem_field, args.answer_field, args.trace_field,
                              args.id_field, args.answer_from, args.problems) if args.traces else None
    all_split = split_traces(given, args)[0] if given is not None else None  # fails without thinking text
    problems = None if given is not None else utils.load_problems(
        args.data or toy.paths(args.toy_dir)["test"], args.problem_field, args.answer_field, args.problems,
        answer_from=args.answer_from, keep_record=bool(args.reward))
    mine = replace(args, seed=utils.derive_seed(args.seed, "rank", rank)) if world > 1 else args
    out = functools.partial(os.path.join, args.out)
    logger = utils.LazyJsonlLogger(out("metrics.jsonl"))
    needs = engine_needs(args, problems, all_split, mu_path, direct_path)
    engines = sampling.EnginePool(needs, seed=args.seed, dtype=args.dtype, max_model_len=args.max_model_len,
                                  gpu_memory_utilization=args.gpu_memory_utilization)  # one at a time
    try:
        if given is None:
            sampler = engines.get(args.model)
            rounds = "one generation" if args.rounds == 1 else f"up to {args.rounds} linearized rounds"
            utils.print0(f"r1_analysis: sampling {args.k} stems x {len(problems)} problems ({rounds} each)")
            traces = sample_traces(sampler, problems[rank::world], mine, logger)
        else:
            traces = given[rank::world]
        split, no_thinking = split_traces(traces, args)
        mu = engines.get(mu_path)
        utils.print0(f"r1_analysis: {len(split)} traces, {sum(len(t['groups']) for t in split)} prefixes, "
                     f"{args.p} meta-prover answers each" + (" (rank 0's share)" if world > 1 else ""))
        scored, too_long = score_traces(mu, split, mine, logger)
        distinct, direct_rows = list(dict.fromkeys(s["problem"] for s in scored)), None
        if direct_path:
            gold, dsampler = {s["problem"]: s["answer"] for s in scored}, engines.get(direct_path)
            utils.print0(f"r1_analysis: direct baseline, {args.direct_n} samples x {len(distinct)} problems")
            direct_rows = run_direct(dsampler, [{"problem": p, "answer": gold[p]} for p in distinct], mine,
                                     logger)
        if world > 1:  # merge the ranks' shares (rank order) while the engines, and so the group, live
            named = [{**r, "problem": distinct[r["problem"]]} for r in direct_rows or []]  # by problem text
            m = utils.gather_shares({"traces": traces, "scored": scored, "direct": named,
                                     "no_thinking": no_thinking, "too_long": too_long})
            traces, scored, no_thinking, too_long = m["traces"], m["scored"], m["no_thinking"], m["too_long"]
            distinct = list(dict.fromkeys(s["problem"] for s in scored))
            index = {q: i for i, q in enumerate(distinct)}
            direct_rows = None if direct_rows is None else [{**r, "problem": index[r["problem"]]}
                                                            for r in m["direct"]]
    finally:
        engines.close()
    if problems is not None and utils.is_main():
        keys = ("id", "problem", "answer", "trace", "rounds", "finish_reason")
        utils.write_jsonl(out("generated_traces.jsonl"), [{k: t[k] for k in keys} for t in traces])
    analysis = analyse(scored, direct_rows, distinct, args)
    data_hash = hashlib.sha1(json.dumps([[t["problem"], t["answer"], t["trace"]] for t in traces]).encode())
    report = {"settings": {**asdict(args), "toy_preset": is_toy, "mu_model": mu_path,
                           "direct_model": direct_path, "traces_hash": data_hash.hexdigest()[:16]},
              "skipped": {"no_thinking": no_thinking, "too_long": too_long}, "analysis": analysis}
    if utils.is_main():
        utils.write_jsonl(out("traces.jsonl"), scored)
        if direct_rows is not None:
            utils.write_jsonl(out("direct.jsonl"), direct_rows)
        utils.write_json(out("summary.json"), report)
        with utils.atomic_path(out("table.md")) as tmp, open(tmp, "w") as f:
            f.write(markdown_table(report, args))
        plot_curves(report, out("accuracy_tokens.png"), args)
        plot_hist(report, out("episodes_hist.png"))
    utils.barrier()
    o = analysis["overall"]
    logger.log({"stage": "done", **{k: v for k, v in o.items() if k != "direct"}})
    utils.print0(f"r1_analysis: {o['traces']} traces, mean {o['mean_episodes']:.2f} episodes, "
                 f"[maj@1] after the first group {o['maj1_first']:.3f}, after all {o['maj1_last']:.3f}, "
                 f"mean trace regret {o['trace_regret_mean']:.3f}"
                 + (f", direct pass@1 {o['direct']['pass'][0]:.3f}" if "direct" in o else ""))
    utils.print0(f"wrote {args.out}/summary.json, table.md, accuracy_tokens.png, episodes_hist.png, "
                 "traces.jsonl")
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
