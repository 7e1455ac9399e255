"""r1_analysis.py: episodes, [maj@p]_j and cumulative regret of a reasoning model's traces (MRT paper Sec. 4, App. D, Fig. 2, 11-15).

The paper's study of DeepSeek-R1: does thinking longer make progress? Each trace's thinking
block is split into episodes (a new episode starts at a step that opens with one of the
phrases of Fig. 11: "Wait", "But wait", "Alternatively", ...), consecutive episodes are
grouped, and after every prefix z_{0:j-1} (the first j groups) a meta-prover is told to stop
and answer now (the prompt of Fig. 12). From p sampled answers per prefix:

- [maj@p]_j, the exact expected accuracy of a majority vote over p of them
  (evaluate.majority_curve), for p in {1, 2, 8}; [maj@1]_j is J(mu | z_{0:j-1});
- tokens: the prefix's thinking tokens plus p x the mean answer tokens at that prefix;
- a direct baseline: pass@k for k in {1, 2, 8, 16, 32} from a direct model's samples,
  against k x its mean generated tokens (evaluate.pass_at_k);
- traces grouped by their total number of episodes (bins), per bin the mean [maj@1]_j curve,
  the dashed [maj@p]_j branches and the baseline (Fig. 2, 13, 14), the cumulative regret
  sum_j (J* - [maj@1]_j) (Def. 3.1, evaluate.cumulative_regret), and the histogram of
  episode counts (Fig. 15).

Run (CPU, embedded default, a few minutes): long multi-episode traces from the toy model
(linearized sampling as evaluate.py runs it: round r+1 continues after "Wait, this seems off.
Let's try something else.", a step that opens with "Wait"), the toy model as meta-prover and
as the direct baseline, 32 test problems x 4 stems:
    python r1_analysis.py
A reasoning model on one GPU (R1 distill: sample K = 4 stems, then the analysis):
    python r1_analysis.py --generate --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B \\
        --data omni_math.jsonl --problems 200 --direct-model Qwen/Qwen2.5-Math-7B-Instruct \\
        --max-model-len 16384 --out runs/r1/omni          # AIME: add --group-size 3
Traces you already have (JSONL or Parquet rows of problem, answer and the model's output with
its <think> block; field names are flags), the same model as meta-prover:
    python r1_analysis.py --traces r1_traces.jsonl --trace-field output \\
        --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --max-model-len 16384 --out runs/r1/file
A toy checkpoint (e.g. after MRT training) with the toy's settings, the toy base as baseline:
    python r1_analysis.py --generate --model runs/grpo/mrt/model --preset toy --out runs/r1/toy-mrt
Several GPUs: `torchrun --nproc_per_node 8 r1_analysis.py ...` splits the problems (or the
traces) over the ranks, one engine per rank, each rank seeded apart; rank 0 writes the outputs.
Outputs under --out: summary.json (every number: histogram, bins, curves, regret, baseline),
table.md, accuracy_tokens.png (Fig. 2/13/14 style, one panel per bin), episodes_hist.png
(Fig. 15), traces.jsonl (per trace: episode count, per prefix the answers, [maj@p]_j, tokens,
regret), direct.jsonl (the baseline's graded samples), generated_traces.jsonl when traces were
sampled (problem, answer, trace: reusable with --traces), metrics.jsonl (progress).

Decisions and departures from the paper (which publishes no code for this study):
- Thinking text: the part of the trace after an opening "<think>" (if any) and before
  "</think>" (if any); the answer after "</think>" is not analysed. Steps are split on
  --delimiter ("\\n\\n"; the toy's steps are lines, "\\n"); whitespace-only steps are dropped.
  A step opens an episode when, after leading whitespace, it starts with a phrase (case-
  sensitive; a phrase ending in a letter must end a word: "Waiting" is not "Wait"); a phrase
  inside a paragraph never splits. Every episode has at least --min-steps steps: a boundary
  fewer than min_steps steps after the previous one is skipped, and so is one that leaves
  fewer than min_steps steps after it (so the last episode is long enough too); thinking with
  fewer steps than that is one episode. --max-episodes merges the rest into the last episode.
- j runs over 1..G groups: the first point already holds one group (the empty prefix, an
  answer without thinking, is not a point). The last point holds the whole thinking block.
- Meta-prover prompt (meta_prover_prompt): the problem in the model's chat template (plain
  "Problem: ...\\nSolution:\\n" without one), "<think>\\n" if the trace opened its thinking
  with it and the template has not already written it, the prefix, the step delimiter, then
  --mu-suffix. The default suffix is Fig. 12's text for real models and utils.MU_SUFFIX
  ("\\nTime is up. The answer is \\\\boxed{") for the toy, which was pretrained to answer
  after it and never saw Fig. 12's text; a suffix starting with a newline replaces the
  delimiter (sampling.mu_context). mu's graded text is suffix + completion.
- Token accounting: prefix tokens are the thinking tokens of the prefix (the tokenizer's count
  of its text; the prompt and the forced suffix are not charged); [maj@p]_j is plotted at
  prefix + p x (mean answer tokens of the p_max answers at that prefix). The baseline is at
  k x (mean generated tokens of the direct samples).
- The p_max answers of one prefix come from one request with n = p_max, so the prefix is
  prefilled once (prefix caching is on in sampling.Sampler); the G contexts of a trace share
  their KV blocks up to the prefix of the shorter one.
- Bins: --bins are lower edges in episodes (1 6 11: 1-5, 6-10, 11+); empty: one bin per group
  count when there are at most 6 of them, else 4 equal ranges of group counts. Within a bin
  the curve at j averages the traces that have at least j groups (the count is reported per
  point); with bins aligned to the group size, all traces of a bin have the same group count.
- The baseline per bin is the mean, over the bin's traces, of their problem's pass@k (the
  direct model is asked each distinct problem once with n samples).
- Cumulative regret per bin: evaluate.cumulative_regret of the bin's mean [maj@1]_j curve
  against J* = --j-star if given, else the best value observed in that bin (the maximum of
  [maj@p]_j over p and j: what the meta-prover reached with the same traces), so regret >= 0.
  Per trace, the same with the trace's own best observed value (traces.jsonl).
- Toy stand-in for a model that decides when to stop thinking: the toy samples --rounds
  linearized rounds and its stream ends at the first round whose answer repeats the previous
  round's (--stop-when-repeated), so harder problems get more episodes, as in R1's traces.
- What the toy default shows is the pipeline, not the paper's finding: the toy base never saw
  the backtrack marker, so its later rounds are poor, and its meta-prover (pretrained on clean
  prefixes) often fails to copy the boxed answer of a finished, slipped solution, so
  [maj@1]_j falls after the first episode instead of rising (RESULTS.md, from `python
  study.py`, has the measured numbers for the toy base and the MRT-B (RL) toy model). Run it
  on a real reasoning model for a meaningful curve.
- Input errors (missing file, malformed line, missing field, unparsable answer, empty thinking,
  bad model path, a context too long for the meta-prover) are one line and exit status 2
  before any output is written; --skip-invalid skips the offending traces instead.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace

import numpy as np

import evaluate
import sampling
import toy
import utils

FIG11_PHRASES = ("Wait", "But wait", "Alternatively", "Is there another way to think about this?",
                 "But let me double-check", "But hold on")
"""Phrases that open a new episode in DeepSeek-R1's thinking (paper Fig. 11)."""

FIG12_SUFFIX = ("Time is up.\n\nGiven the time I've spent and the approaches I've tried, I should stop thinking "
                "and formulate a final answer based on what I already have.\n</think>\n\n"
                "**Step-by-Step Explanation and Answer:**\n\n1. **")
"""The meta-prover's forced text after a thinking prefix (paper Fig. 12)."""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# --------------------------------------------------------------------------------------
# Episodes (paper App. D, Fig. 11)
# --------------------------------------------------------------------------------------


def extract_thinking(trace: str) -> tuple[bool, str]:
    """(opened, thinking): whether the trace opens with "<think>" (after whitespace), and the
    text inside the thinking block (up to "</think>", or to the end when it was never closed,
    e.g. a trace cut at its token limit or a template that opened the block in the prompt)."""
    m = re.match(r"\s*<think>[ \t]*\r?\n?", trace)
    body = trace[m.end():] if m else trace
    end = body.find(THINK_CLOSE)
    return m is not None, body if end < 0 else body[:end]


def split_steps(thinking: str, delimiter: str = "\n\n") -> list[str]:
    """The steps of a thinking text: split on the delimiter, whitespace-only steps dropped."""
    if not delimiter:
        raise ValueError("the step delimiter must not be empty")
    return [s for s in thinking.split(delimiter) if s.strip()]


def opens_episode(step: str, phrases=FIG11_PHRASES) -> bool:
    """Whether a step starts with one of the phrases (after leading whitespace, case-sensitive;
    a phrase that ends in a letter or digit must end a word there)."""
    s = step.lstrip()
    for ph in phrases:
        if ph and s.startswith(ph):
            if not ph[-1].isalnum() or len(s) == len(ph) or not (s[len(ph)].isalnum() or s[len(ph)] == "_"):
                return True
    return False


def split_episodes(thinking: str, phrases=FIG11_PHRASES, min_steps: int = 3, max_episodes: int | None = None,
                   delimiter: str = "\n\n") -> list[str]:
    """Episodes of a thinking text, each its steps re-joined with the delimiter.

    A new episode starts at a step that opens with a phrase, unless fewer than min_steps steps
    have passed since the current episode started, or fewer than min_steps steps would remain
    from it to the end (so every episode has at least min_steps steps, unless the whole text
    has fewer). A phrase in the middle of a step never splits. With max_episodes, episodes
    from the max_episodes-th on are merged into one. An empty text has no episodes."""
    if min_steps < 1:
        raise ValueError(f"min_steps must be >= 1, got {min_steps}")
    if max_episodes is not None and max_episodes < 1:
        raise ValueError(f"max_episodes must be >= 1 or None, got {max_episodes}")
    steps = split_steps(thinking, delimiter)
    starts = [0] if steps else []
    for i, step in enumerate(steps):
        if i and i - starts[-1] >= min_steps and len(steps) - i >= min_steps and opens_episode(step, phrases):
            starts.append(i)
    if max_episodes is not None:
        starts = starts[:max_episodes]
    bounds = starts + [len(steps)]
    return [delimiter.join(steps[a:b]) for a, b in zip(bounds, bounds[1:])]


def group_episodes(episodes: list[str], size: int, delimiter: str = "\n\n") -> list[str]:
    """Consecutive groups of `size` episodes (the last may be shorter), each one string with
    its episodes joined by the delimiter (paper: 5 for Omni-MATH, 3 for AIME)."""
    if size < 1:
        raise ValueError(f"group size must be >= 1, got {size}")
    return [delimiter.join(episodes[i:i + size]) for i in range(0, len(episodes), size)]


# --------------------------------------------------------------------------------------
# The meta-prover prompt (paper Fig. 12)
# --------------------------------------------------------------------------------------


def meta_prover_prompt(tokenizer, problem: str, prefix: str, suffix: str = FIG12_SUFFIX,
                       instruction: str = utils.DEFAULT_INSTRUCTION, think_open: str = "",
                       sep: str = "\n\n") -> str:
    """The text the meta-prover continues: the problem in the tokenizer's chat template
    (utils.build_prompt; plain "Problem: ...\\nSolution:\\n" without one), then `think_open`
    ("<think>\\n" for a trace that opened its thinking with it; skipped when the template
    already ends with it), the thinking prefix (trailing whitespace dropped), `sep` (the step
    delimiter; none after an empty prefix), then the suffix. A suffix that starts with a
    newline replaces the separator (sampling.mu_context: trailing newlines dropped first)."""
    head = utils.build_prompt(tokenizer, problem, instruction)
    if think_open and not head.rstrip().endswith(think_open.strip()):
        head += think_open
    if suffix.startswith(("\n", "\r\n")):
        return sampling.mu_context(head + prefix.rstrip(), suffix)
    prefix = prefix.rstrip()
    return head + (prefix + sep if prefix.strip() else "") + suffix


# --------------------------------------------------------------------------------------
# Pure metrics: [maj@p]_j tables, bins, curves, regret, the direct baseline
# --------------------------------------------------------------------------------------


def maj_values(answers, gold, ps, right: set | None = None) -> dict[int, float]:
    """{p: [maj@p]} for one prefix: the exact expected accuracy of a majority vote over p of
    its sampled answers (extracted answers; None never votes), as evaluate.maj_at_k; `right`:
    the answers a custom --reward graded 1 (evaluate.cluster_answers)."""
    counts, correct, n_none = evaluate.cluster_answers(answers, gold, right)
    curve = evaluate.majority_curve(counts, correct, n_none)
    if not counts:
        curve = np.zeros(len(answers))
    for p in ps:
        if not 1 <= p <= len(answers):
            raise ValueError(f"maj@{p} needs 1 <= p <= {len(answers)} answers")
    return {int(p): float(curve[p - 1]) for p in ps}


def auto_bins(group_counts, group_size: int) -> list[int]:
    """Lower edges (in episodes) of the default bins: one bin per distinct group count when
    there are at most 6, else 4 equal ranges of group counts between the least and the most."""
    gs = sorted(set(int(g) for g in group_counts))
    if not gs:
        return [1]
    if len(gs) <= 6:
        lows = gs
    else:
        width = math.ceil((gs[-1] - gs[0] + 1) / 4)
        lows = list(range(gs[0], gs[-1] + 1, width))
    return [(g - 1) * group_size + 1 for g in lows]


def bin_labels(edges: list[int]) -> list[str]:
    """'1-5', '6-10', '11+' for lower edges [1, 6, 11] ('3' for a one-value bin)."""
    labels = []
    for a, b in zip(edges, edges[1:] + [None]):
        labels.append(f"{a}+" if b is None else str(a) if b - 1 == a else f"{a}-{b - 1}")
    return labels


def assign_bin(episodes: int, edges: list[int]) -> int | None:
    """Index of the bin holding an episode count (None below the first edge)."""
    i = int(np.searchsorted(edges, episodes, side="right")) - 1
    return None if i < 0 else i


def bin_curve(traces: list[dict], ps) -> dict:
    """Mean [maj@p]_j and tokens over a bin's traces, for j = 1..the most groups in the bin;
    the point j averages the traces with at least j groups (n[j] of them). Each trace holds
    "points": [{"prefix_tokens", "answer_tokens", "maj": {p: value}}, ...] (one per j)."""
    G = max(len(t["points"]) for t in traces)
    out = {"j": list(range(1, G + 1)), "n": [], "prefix_tokens": [],
           "tokens": {str(p): [] for p in ps}, "maj": {str(p): [] for p in ps}}
    for j in range(G):
        pts = [t["points"][j] for t in traces if len(t["points"]) > j]
        out["n"].append(len(pts))
        out["prefix_tokens"].append(float(np.mean([q["prefix_tokens"] for q in pts])))
        for p in ps:
            out["tokens"][str(p)].append(float(np.mean([q["prefix_tokens"] + p * q["answer_tokens"] for q in pts])))
            out["maj"][str(p)].append(float(np.mean([q["maj"][str(p)] for q in pts])))
    return out


def regret_of(curve: dict, j_star: float | None = None) -> dict:
    """Cumulative regret of a curve's [maj@1]_j (Def. 3.1) against J* = j_star, else the best
    observed [maj@p]_j over every p and j of the curve."""
    best = max(max(v) for v in curve["maj"].values())
    star = best if j_star is None else float(j_star)
    running = evaluate.cumulative_regret(curve["maj"]["1"], star, running=True)
    return {"j_star": star, "j_star_source": "best observed" if j_star is None else "given",
            "running": running, "total": running[-1]}


def direct_curve(correct_counts, gen_tokens, n: int, ks) -> dict:
    """pass@k (mean over entries) against k x mean generated tokens, from per-entry numbers of
    correct samples out of n and per-entry mean generated tokens (one entry per trace)."""
    ks = [int(k) for k in ks]
    return {"k": ks, "tokens": [float(k * np.mean(gen_tokens)) for k in ks],
            "pass": [float(np.mean([evaluate.pass_at_k(n, int(c), k) for c in correct_counts])) for k in ks]}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

TOY_DEFAULTS = dict(problems=32, max_tokens=96, rounds=8, window=1024, delimiter="\n", group_size=1,
                    mu_suffix=utils.MU_SUFFIX, mu_max_tokens=8, direct_max_tokens=96)
"""Settings that differ for the embedded toy default (the toy's context is 2048 tokens, its
steps are lines, and it answers after utils.MU_SUFFIX)."""

REAL_DEFAULTS = dict(problems=0, max_tokens=8192, rounds=1, window=2048, delimiter="\n\n", group_size=5,
                     mu_suffix=FIG12_SUFFIX, mu_max_tokens=4096, direct_max_tokens=None)
"""The paper's settings for a real reasoning model (direct_max_tokens None: --max-tokens)."""


@dataclass
class Args:
    preset: str = "auto"
    """defaults of the settings left unset: toy (the toy's sizes, steps as lines, utils.MU_SUFFIX)
    or paper (Fig. 12, 8192 tokens, ...); auto: toy when --model is empty, else paper"""
    traces: str = ""
    """JSONL or Parquet of (problem, answer, trace) rows from a reasoning model (the trace holds
    its <think> block); needs --model (the meta-prover)"""
    generate: bool = False
    """sample --k stems per problem of --data from --model instead of reading --traces"""
    model: str = ""
    """the reasoning model (path or hub name): samples the stems with --generate and is the
    meta-prover unless --mu-model; empty: the toy base (the embedded default)"""
    mu_model: str = ""
    """meta-prover model (empty: --model)"""
    direct_model: str = ""
    """model sampled directly for the pass@k baseline (empty: the toy base with the toy preset,
    no baseline otherwise; 'none': no baseline)"""
    data: str = ""
    """problems for --generate (empty: the toy test split)"""
    problem_field: str = "problem"
    """field of the problem in --traces / --data"""
    answer_field: str = "answer"
    """field of the gold answer in --traces / --data"""
    trace_field: str = "trace"
    """field of the model's output (with its <think> block) in --traces"""
    id_field: str = "id"
    """field of the trace id in --traces (rows without one get their line number)"""
    problems: int | None = None
    """use the first N problems (--generate) or trace rows (--traces); 0: all (default: 0;
    toy: 32)"""
    skip_invalid: bool = False
    """skip (and count) traces with no thinking text or too long for the meta-prover instead
    of failing"""
    k: int = 4
    """K: stems sampled per problem"""
    temperature: float = 0.7
    """sampling temperature of the stems and of the direct baseline"""
    max_tokens: int | None = None
    """token limit of a stem (of each round when --rounds > 1) (default: 8192; toy: 96)"""
    rounds: int | None = None
    """1: one generation per stem (a reasoning model); R > 1: R linearized rounds as in
    evaluate.py, each continuing after its backtrack cue (default: 1; toy: 8)"""
    window: int | None = None
    """linearized rounds see the latest W transcript tokens (default: 2048; toy: 1024)"""
    stop_when_repeated: bool = True
    """a linearized stream ends at the first round whose answer repeats the previous round's"""
    phrases: list[str] = field(default_factory=lambda: list(FIG11_PHRASES))
    """phrases that open an episode when a step starts with them (paper Fig. 11)"""
    delimiter: str | None = None
    """step delimiter (default: a blank line, '\\n\\n'; toy: '\\n'; in bash pass $'\\n')"""
    min_steps: int = 3
    """least steps per episode"""
    max_episodes: int = 0
    """cap on episodes per trace, the rest merged into the last (0: no cap)"""
    group_size: int | None = None
    """consecutive episodes per group (paper: 5 for Omni-MATH, 3 for AIME) (default: 5; toy: 1)"""
    bins: list[int] = field(default_factory=list)
    """lower edges of the episode-count bins, e.g. 1 6 11 (empty: automatic, see the docstring)"""
    p: int = 8
    """answers sampled from the meta-prover per prefix"""
    maj: list[int] = field(default_factory=lambda: [1, 2, 8])
    """majority sizes p of [maj@p]_j (each <= --p; 1 is always included)"""
    mu_suffix: str | None = None
    """forced text after the prefix (default: the Fig. 12 text; toy: utils.MU_SUFFIX)"""
    mu_temperature: float = 0.7
    """meta-prover sampling temperature"""
    mu_max_tokens: int | None = None
    """meta-prover answer length limit (default: 4096; toy: 8)"""
    direct_n: int = 32
    """samples per problem from the direct model"""
    direct_k: list[int] = field(default_factory=lambda: [1, 2, 8, 16, 32])
    """k of the baseline's pass@k (each <= --direct-n)"""
    direct_max_tokens: int | None = None
    """token limit of a direct sample (default: --max-tokens; toy: 96)"""
    j_star: float | None = None
    """comparator success rate J* of the regret (default: the best [maj@p]_j observed per bin)"""
    instruction: str | None = None
    """instruction in the user turn for models with a chat template (default: the one in the
    --model's mrt.json when this project wrote it, else the standard one)"""
    batch: int = 64
    """traces per meta-prover call (progress granularity)"""
    seed: int = 0
    """sampling seed"""
    out: str = "runs/r1_analysis"
    """output folder"""
    toy_dir: str = toy.DEFAULT_DIR
    """toy build used by the embedded default (built if missing)"""
    max_model_len: int = 0
    """engine context length (0: what this run needs, see engine_needs; never the model's whole context)"""
    dtype: str = "auto"
    """engine dtype (auto: bf16 on GPU, fp32 on CPU)"""
    gpu_memory_utilization: float = 0.0
    """fraction of GPU memory each engine may take (0: 0.85 split over the engines this process
    holds at once: one in a plain run, one per model under torchrun, where every engine stays up)"""
    reward: str = ""
    """custom reward, module:function or path/to/file.py:function: a callable (completion text,
    gold answer, problem record) -> float in [0, 1] that replaces the math-verify grader at every
    grading site, the meta-prover's included (empty: utils.grade)"""
    answer_from: str = ""
    """field of a worked solution whose last \\boxed{} is the gold answer (e.g. solution,
    NuminaMath style; --answer-field is then not read); empty: --answer-field as is"""


def resolve(args: Args) -> tuple[Args, bool]:
    """Fill the settings left as None with the toy's or the paper's defaults (--preset), check
    the rest. Returns (filled args, whether the toy preset applies)."""
    if args.traces and args.generate:
        raise utils.UserError("give either --traces FILE or --generate, not both")
    if args.traces and not args.model:
        raise utils.UserError("--traces needs --model: the meta-prover (usually the model that wrote the traces)")
    if args.model and not (args.traces or args.generate):
        raise utils.UserError("--model: give --traces FILE or --generate (sample stems from the model)")
    if args.preset not in ("auto", "toy", "paper"):
        raise utils.UserError(f"--preset: expected auto, toy or paper, got {args.preset!r}")
    is_toy = args.preset == "toy" or (args.preset == "auto" and not args.model)
    defaults = TOY_DEFAULTS if is_toy else REAL_DEFAULTS
    args = replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.direct_max_tokens is None:
        args = replace(args, direct_max_tokens=args.max_tokens)
    ints = {"--k": args.k, "--p": args.p, "--min-steps": args.min_steps, "--group-size": args.group_size,
            "--max-tokens": args.max_tokens, "--rounds": args.rounds, "--window": args.window,
            "--mu-max-tokens": args.mu_max_tokens, "--direct-n": args.direct_n,
            "--direct-max-tokens": args.direct_max_tokens, "--batch": args.batch}
    bad = [name for name, v in ints.items() if v < 1]
    if bad or args.problems < 0 or args.max_episodes < 0:
        raise utils.UserError(f"{', '.join(bad) or '--problems/--max-episodes'} must be >= 1 (--problems, --max-episodes >= 0)")
    if not args.delimiter:
        raise utils.UserError("--delimiter must not be empty")
    if not [p for p in args.phrases if p]:
        raise utils.UserError("--phrases: give at least one phrase")
    if any(not 1 <= q <= args.p for q in args.maj):
        raise utils.UserError(f"--maj: every size must be in 1..--p ({args.p}), got {args.maj}")
    args = replace(args, maj=sorted(set(args.maj) | {1}))
    if any(not 1 <= q <= args.direct_n for q in args.direct_k) or not args.direct_k:
        raise utils.UserError(f"--direct-k: every k must be in 1..--direct-n ({args.direct_n}), got {args.direct_k}")
    if args.bins and (args.bins[0] < 1 or any(b <= a for a, b in zip(args.bins, args.bins[1:]))):
        raise utils.UserError(f"--bins: lower edges must be increasing integers >= 1, got {args.bins}")
    if args.j_star is not None and not 0.0 <= args.j_star <= 1.0:
        raise utils.UserError(f"--j-star must be in [0, 1], got {args.j_star}")
    return args, is_toy


def check_model(path: str, flag: str) -> None:
    """A local model folder must exist (a bare "org/name" is left to the hub)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise utils.UserError(f"{flag}: not a model folder (no config.json): {path}")
        return
    if not (re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) and not os.path.isdir(path.split("/")[0])):
        raise utils.UserError(f"{flag}: model path does not exist: {path}")


def read_traces(args: Args) -> list[dict]:
    """Trace rows {id, problem, answer, trace, where} from --traces (first --problems rows)."""
    names = {"problem": args.problem_field, "answer": args.answer_from or args.answer_field, "trace": args.trace_field}
    rows = []  # errors name the file's fields
    for line, r in utils.read_records(args.traces, list(dict.fromkeys(names.values())), with_lines=True):
        where = f"{args.traces}:{line}"
        problem, answer, trace = (r[names[k]] for k in ("problem", "answer", "trace"))
        if not isinstance(problem, str) or not isinstance(trace, str):
            raise utils.UserError(f"{where}: fields {args.problem_field!r} and {args.trace_field!r} must be strings")
        rows.append({"id": r.get(args.id_field, line), "problem": problem,
                     "answer": utils.gold_answer(r, args.answer_field, args.answer_from, where),
                     "trace": trace, "where": where})
    rows = rows[: args.problems] if args.problems else rows
    if not rows:
        raise utils.UserError(f"{args.traces}: no traces")
    return rows


class LazyLogger:
    """utils.JsonlLogger that creates its file at the first record, so that bad input found
    while the first stage runs (a trace too long for the meta-prover) leaves no output."""

    def __init__(self, path: str):
        self.path, self.logger = path, None

    def log(self, record: dict) -> None:
        if self.logger is None:
            self.logger = utils.JsonlLogger(self.path)
        self.logger.log(record)


class Engines:
    """One engine at a time, keyed by model path; `ready` samplers (tests) are used as given
    and never closed. Asking for a new path closes the engines this object built, except
    under torchrun: closing a vLLM engine ends vLLM's process-wide state and torchrun's
    process group with it, so there every engine stays up until the end (size them with
    --gpu-memory-utilization so that the run's models fit side by side)."""

    def __init__(self, args: Args, ready: dict | None = None, needs: dict | None = None):
        self.args, self.ready, self.owned, self.needs = args, dict(ready or {}), {}, dict(needs or {})
        held = len(set(self.needs) - set(self.ready)) if utils.is_distributed() else 1  # engines up at once
        self.share = utils.engine_memory_share(args.gpu_memory_utilization, held)

    def get(self, path: str) -> sampling.Sampler:
        if path in self.ready:
            return self.ready[path]
        if path not in self.owned:
            if not utils.is_distributed():
                self.close()
            had_group = sampling.group_exists()
            max_len = self.args.max_model_len or sampling.engine_length(path, self.needs[path])
            s = sampling.make_sampler(path, seed=self.args.seed, dtype=self.args.dtype, max_model_len=max_len,
                                      gpu_memory_utilization=self.share)
            self.owned[path] = (s, had_group)
        return self.owned[path][0]

    def close(self) -> None:
        for path in list(self.owned):
            s, had_group = self.owned.pop(path)
            sampling.close_engine(s, had_group)
        gc.collect()


def engine_needs(args: Args, problems: list[dict] | None, split: list[dict] | None, mu_path: str,
                 direct_path: str) -> dict[str, int]:
    """Tokens one engine sequence may hold in this run, per model path (one engine may serve
    several roles): sampling stems, the longest prompt + --max-tokens (linearized rounds: +
    --window + the cue); the meta-prover, its longest context + --mu-max-tokens, measured on
    given traces (`split`), else bounded by its prompt + --rounds x (--max-tokens + cue + 2);
    the direct baseline, the longest prompt + --direct-max-tokens; each + 16 (re-encoded text
    may take a few more tokens). sampling.engine_length turns it into the engine's max_model_len."""
    needs, items = {}, problems if problems is not None else split

    def add(path: str, n: int) -> None:
        needs[path] = max(needs.get(path, 0), n + 16)

    def longest_prompt(tok) -> int:
        return max(len(utils.encode(tok, utils.build_prompt(tok, r["problem"], args.instruction))) for r in items)

    mu_tok = utils.load_tokenizer(mu_path)
    if problems is not None:
        tok = utils.load_tokenizer(args.model)
        cue = len(utils.encode(tok, utils.BACKTRACK_CUE))
        add(args.model, longest_prompt(tok) + args.max_tokens + (args.window + cue if args.rounds > 1 else 0))
        head = max(len(utils.encode(mu_tok, meta_prover_prompt(mu_tok, r["problem"], "", args.mu_suffix, args.instruction,
                                                               THINK_OPEN + "\n", args.delimiter))) for r in problems)
        add(mu_path, head + args.rounds * (args.max_tokens + cue + 2) + args.mu_max_tokens)
    else:
        add(mu_path, max(len(mu_contexts(mu_tok, {**t, "groups": [args.delimiter.join(t["groups"])]}, args)[-1][0])
                         for t in split) + args.mu_max_tokens)
    if direct_path:
        add(direct_path, longest_prompt(utils.load_tokenizer(direct_path)) + args.direct_max_tokens)
    return needs


def sample_traces(sampler, problems: list[dict], args: Args, logger) -> list[dict]:
    """K stems per problem: one generation each (rounds = 1) or a linearized stream of rounds
    (evaluate.run_linearized), cut after the first round whose answer repeats the previous
    round's (--stop-when-repeated)."""
    tok = sampler.tokenizer
    reps = [(i, s) for i in range(len(problems)) for s in range(args.k)]
    prompt_ids = [utils.encode(tok, utils.build_prompt(tok, r["problem"], args.instruction)) for r in problems]
    traces = []
    if args.rounds == 1:
        outs = sampler.generate(prompt_ids, n=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                                seed=args.seed, logprobs=False, use_tqdm=utils.is_main())
        for i, group in enumerate(outs):
            for s, smp in enumerate(group):
                traces.append({"id": f"{problems[i]['id']}-{s}", "problem": problems[i]["problem"], "answer": problems[i]["answer"],
                               "trace": smp.text, "rounds": 1, "stem_tokens": smp.num_tokens,
                               "finish_reason": smp.finish_reason, "where": f"sampled {problems[i]['id']}-{s}"})
    else:
        eargs = evaluate.Args(samples=args.rounds, window=args.window, max_tokens=args.max_tokens,
                              temperature=args.temperature, seed=args.seed, modes=["linearized"])
        recs = [problems[i] for i, _ in reps]
        rows = evaluate.run_linearized(sampler, [prompt_ids[i] for i, _ in reps], recs, eargs, sampler.max_model_len,
                                       list(range(len(reps))))
        by = {}
        for r in rows:
            by.setdefault(r["problem"], []).append(r)
        for idx, (i, s) in enumerate(reps):
            chain = sorted(by[idx], key=lambda r: r["round"])
            keep = len(chain)
            if args.stop_when_repeated:
                for r in range(1, len(chain)):
                    if chain[r]["answer"] is not None and chain[r]["answer"] == chain[r - 1]["answer"]:
                        keep = r + 1
                        break
            chain = chain[:keep]
            text = utils.BACKTRACK_CUE.join(c["text"] for c in chain)
            traces.append({"id": f"{problems[i]['id']}-{s}", "problem": problems[i]["problem"], "answer": problems[i]["answer"],
                           "trace": text, "rounds": keep, "stem_tokens": sum(c["gen_tokens"] for c in chain),
                           "finish_reason": chain[-1]["finish_reason"], "where": f"sampled {problems[i]['id']}-{s}"})
    logger.log({"stage": "stems", "traces": len(traces),
                "mean_stem_tokens": float(np.mean([t["stem_tokens"] for t in traces])),
                "mean_rounds": float(np.mean([t["rounds"] for t in traces]))})
    return traces


def split_traces(traces: list[dict], args: Args) -> tuple[list[dict], int]:
    """Episodes and groups of every trace; traces with no thinking text fail (or are skipped)."""
    kept, skipped = [], 0
    for t in traces:
        opened, thinking = extract_thinking(t["trace"])
        eps = split_episodes(thinking, args.phrases, args.min_steps, args.max_episodes or None, args.delimiter)
        if not eps:
            if not args.skip_invalid:
                raise utils.UserError(f"{t['where']}: no thinking text (--skip-invalid skips such traces)")
            skipped += 1
            continue
        kept.append({**t, "opened": opened, "episodes": eps,
                     "groups": group_episodes(eps, args.group_size, args.delimiter)})
    if not kept:
        raise utils.UserError("no trace has thinking text")
    return kept, skipped


def mu_contexts(tok, t: dict, args: Args) -> list[tuple[list[int], int]]:
    """(prompt ids, prefix tokens) of the meta-prover for j = 1..G groups of a trace."""
    out = []
    for j in range(1, len(t["groups"]) + 1):
        prefix = args.delimiter.join(t["groups"][:j])
        text = meta_prover_prompt(tok, t["problem"], prefix, args.mu_suffix, args.instruction,
                                  THINK_OPEN + "\n" if t["opened"] else "", args.delimiter)
        out.append((utils.encode(tok, text), len(tok(prefix, add_special_tokens=False)["input_ids"])))
    return out


def score_traces(sampler, traces: list[dict], args: Args, logger) -> tuple[list[dict], int]:
    """p answers per prefix from the meta-prover; per trace its points (tokens, answers,
    [maj@p]_j) and regret. Traces whose longest context does not fit fail (or are skipped)."""
    from tqdm import tqdm

    tok, grade = sampler.tokenizer, utils.make_grader(args.reward)
    limit = sampler.max_model_len - args.mu_max_tokens
    items, skipped = [], 0
    for t in traces:
        ctx = mu_contexts(tok, t, args)
        if len(ctx[-1][0]) > limit:
            if not args.skip_invalid:
                raise utils.UserError(f"{t['where']}: too long for the meta-prover ({len(ctx[-1][0])} tokens > {limit} = "
                                      f"context length - --mu-max-tokens; raise --max-model-len or --skip-invalid)")
            skipped += 1
            continue
        items.append((t, ctx))
    if not items:
        raise utils.UserError("no trace fits the meta-prover's context length")
    scored = []
    for b in tqdm(range(0, len(items), args.batch), desc="meta-prover", disable=not utils.is_main()):
        chunk = items[b: b + args.batch]
        prompts = [ids for _, ctx in chunk for ids, _ in ctx]
        outs = iter(sampler.generate(prompts, n=args.p, temperature=args.mu_temperature, max_tokens=args.mu_max_tokens,
                                     seed=utils.derive_seed(args.seed, "meta-prover", b), logprobs=False))
        for t, ctx in chunk:
            points = []
            for j, (ids, prefix_tokens) in enumerate(ctx, 1):
                group = next(outs)
                answers = [utils.extract_boxed(args.mu_suffix + s.text) or None for s in group]
                right = ({a for a, s in zip(answers, group) if a and grade(args.mu_suffix + s.text, t["answer"]) == 1.0}
                         if args.reward else None)  # the meta-prover's answers under the custom reward
                points.append({"j": j, "prefix_tokens": prefix_tokens, "context_tokens": len(ids),
                               "answer_tokens": float(np.mean([s.num_tokens for s in group])), "answers": answers,
                               "maj": {str(p): v for p, v in maj_values(answers, t["answer"], args.maj, right).items()}})
            curve = {"maj": {str(p): [q["maj"][str(p)] for q in points] for p in args.maj}}
            scored.append({"id": t["id"], "where": t["where"], "problem": t["problem"], "answer": t["answer"],
                           "opened_think": t["opened"], "episodes": len(t["episodes"]), "groups": len(t["groups"]),
                           "episode_tokens": [len(tok(e, add_special_tokens=False)["input_ids"]) for e in t["episodes"]],
                           "points": points, "regret": regret_of(curve, args.j_star)})
        J = [q["maj"]["1"] for s in scored[-len(chunk):] for q in s["points"]]
        logger.log({"stage": "meta-prover", "traces_done": len(scored), "contexts": len(prompts),
                    "batch_maj1_mean": round(float(np.mean(J)), 4)})
    return scored, skipped


def run_direct(sampler, problems: list[dict], args: Args, logger) -> list[dict]:
    """direct_n samples per distinct problem from the direct model (evaluate.run_parallel)."""
    tok = sampler.tokenizer
    prompt_ids = [utils.encode(tok, utils.build_prompt(tok, r["problem"], args.instruction)) for r in problems]
    eargs = evaluate.Args(samples=args.direct_n, max_tokens=args.direct_max_tokens, temperature=args.temperature,
                          seed=utils.derive_seed(args.seed, "direct"), modes=["parallel"], reward=args.reward)
    rows = evaluate.run_parallel(sampler, prompt_ids, problems, eargs, list(range(len(problems))))
    logger.log({"stage": "direct", "problems": len(problems), "pass@1": float(np.mean([r["correct"] for r in rows])),
                "mean_tokens": float(np.mean([r["gen_tokens"] for r in rows]))})
    return [{k: v for k, v in r.items() if k != "text"} for r in rows]


def analyse(scored: list[dict], direct_rows: list[dict] | None, problems: list[str], args: Args) -> dict:
    """Histogram, bins, per-bin curves, regret and baseline from the scored traces."""
    counts = [s["episodes"] for s in scored]
    hist = {str(e): counts.count(e) for e in sorted(set(counts))}
    edges = list(args.bins) or auto_bins([s["groups"] for s in scored], args.group_size)
    labels = bin_labels(edges)
    direct_by = {}
    if direct_rows is not None:
        for r in direct_rows:
            d = direct_by.setdefault(r["problem"], [0, []])
            d[0] += int(r["correct"])
            d[1].append(r["gen_tokens"])
    pidx = {p: i for i, p in enumerate(problems)}
    bins, unbinned = {}, 0
    members: dict[int, list[dict]] = {}
    for s in scored:
        b = assign_bin(s["episodes"], edges)
        if b is None:
            unbinned += 1
        else:
            members.setdefault(b, []).append(s)
    for b, label in enumerate(labels):
        ts = members.get(b, [])
        if not ts:
            continue
        curve = bin_curve(ts, args.maj)
        entry = {"lower_edge": edges[b], "traces": len(ts), "problems": len({t["problem"] for t in ts}),
                 "groups": sorted({t["groups"] for t in ts}), "curve": curve, "regret": regret_of(curve, args.j_star)}
        if direct_by:
            ds = [direct_by[pidx[t["problem"]]] for t in ts]
            entry["direct"] = direct_curve([d[0] for d in ds], [np.mean(d[1]) for d in ds], args.direct_n, args.direct_k)
        bins[label] = entry
    overall = {"traces": len(scored), "mean_episodes": float(np.mean(counts)),
               "mean_thinking_tokens": float(np.mean([s["points"][-1]["prefix_tokens"] for s in scored])),
               "maj1_last": float(np.mean([s["points"][-1]["maj"]["1"] for s in scored])),
               "maj1_first": float(np.mean([s["points"][0]["maj"]["1"] for s in scored])),
               "trace_regret_mean": float(np.mean([s["regret"]["total"] for s in scored]))}
    if direct_by:
        ds = [direct_by[pidx[s["problem"]]] for s in scored]
        overall["direct"] = direct_curve([d[0] for d in ds], [np.mean(d[1]) for d in ds], args.direct_n, args.direct_k)
    return {"histogram": hist, "bin_edges": edges, "unbinned": unbinned, "bins": bins, "overall": overall}


def markdown_table(report: dict, args: Args) -> str:
    """Episode histogram, then per bin: [maj@p]_j and tokens per j, the running regret, and
    the direct baseline."""
    a = report["analysis"]
    ps = args.maj
    lines = ["# Episode analysis: [maj@p]_j of the meta-prover after j episode groups", "",
             f"{a['overall']['traces']} traces, {args.group_size} episode(s) per group, {args.p} meta-prover "
             f"answers per prefix. Tokens: thinking tokens of the prefix + p x mean answer tokens. Regret: "
             f"running sum over j of J* - [maj@1]_j (J*: {'given' if args.j_star is not None else 'best [maj@p]_j observed in the bin'}).",
             "", "## Episodes per trace", "", "| episodes | traces |", "|---|---|"]
    lines += [f"| {e} | {c} |" for e, c in a["histogram"].items()]
    for label, b in a["bins"].items():
        c, r = b["curve"], b["regret"]
        lines += ["", f"## {label} episodes: {b['traces']} traces, {b['problems']} problems, J* = {r['j_star']:.3f}", "",
                  "| j | traces | " + " | ".join(f"tokens (p={p}) | [maj@{p}]_j" for p in ps) + " | cumulative regret |",
                  "|---" * (2 + 2 * len(ps) + 1) + "|"]
        for i, j in enumerate(c["j"]):
            cells = " | ".join(f"{c['tokens'][str(p)][i]:.0f} | {100 * c['maj'][str(p)][i]:.1f}" for p in ps)
            lines.append(f"| {j} | {c['n'][i]} | {cells} | {r['running'][i]:.3f} |")
        if "direct" in b:
            d = b["direct"]
            lines += ["", "Direct baseline: " + ", ".join(f"pass@{k} {100 * v:.1f} at {t:.0f} tok"
                                                          for k, t, v in zip(d["k"], d["tokens"], d["pass"]))]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, path: str, args: Args) -> None:
    """One panel per bin: [maj@1]_j (solid), from each of its points a dashed [maj@p]_j branch
    through p = 2, 8, ..., and the direct pass@k baseline (Fig. 2, 13, 14 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = report["analysis"]["bins"]
    cols = min(3, len(bins))
    rows = math.ceil(len(bins) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, (label, b) in zip(axes.flat, bins.items()):
        c = b["curve"]
        ax.plot(c["tokens"]["1"], c["maj"]["1"], "-o", color="tab:blue", ms=4, label="[maj@1]_j (continue thinking)")
        for i in range(len(c["j"])):
            xs = [c["tokens"][str(p)][i] for p in args.maj]
            ys = [c["maj"][str(p)][i] for p in args.maj]
            ax.plot(xs, ys, "--", color="tab:orange", lw=1, marker=".", label="[maj@p]_j, p = " +
                    ", ".join(map(str, args.maj)) if i == 0 else None)
        if "direct" in b:
            d = b["direct"]
            ax.plot(d["tokens"], d["pass"], "-s", color="tab:gray", ms=3, label="direct pass@k")
        ax.set_xscale("log")
        ax.set_title(f"{label} episodes ({b['traces']} traces)")
        ax.set_xlabel("tokens (prefix + answers)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(bins):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_hist(report: dict, path: str) -> None:
    """Fig. 15: number of traces per episode count; bin edges dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = report["analysis"]
    xs = [int(e) for e in a["histogram"]]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar(xs, list(a["histogram"].values()), width=0.8, color="tab:blue")
    for e in a["bin_edges"][1:]:
        ax.axvline(e - 0.5, color="k", ls="--", lw=1)
    ax.set_xlabel("episodes per trace")
    ax.set_ylabel("traces")
    ax.set_title(f"{a['overall']['traces']} traces, mean {a['overall']['mean_episodes']:.1f} episodes")
    fig.tight_layout()
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(args: Args, samplers: dict | None = None) -> dict:
    """Run the analysis; `samplers` may map a model path to a ready Sampler (tests). Under
    torchrun each rank runs the sampling and the meta-prover on its share of the problems (or
    traces) with its own engine and seed; rank 0 merges the results and writes every output."""
    rank, world, _ = utils.init_distributed()
    args, is_toy = resolve(args)
    # every input is read and checked before an engine starts or a file is written
    if is_toy and not (args.model and args.direct_model):
        base = toy.ensure_built(args.toy_dir)["base"]
        args = replace(args, model=args.model or base, direct_model=args.direct_model or base)
    for flag, path in (("--model", args.model), ("--mu-model", args.mu_model),
                       ("--direct-model", args.direct_model if args.direct_model.lower() != "none" else "")):
        if path and path not in (samplers or {}):
            check_model(path, flag)
    args = replace(args, instruction=utils.stage_instruction(args.instruction, args.model))
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    traces = read_traces(args) if args.traces else None
    all_split = split_traces(traces, args)[0] if traces is not None else None  # fails on a trace without thinking text
    problems = None
    if traces is None:
        problems = utils.load_problems(args.data or toy.paths(args.toy_dir)["test"], args.problem_field,
                                       args.answer_field, args.problems, answer_from=args.answer_from,
                                       keep_record=bool(args.reward))
    mu_path = args.mu_model or args.model
    direct_path = "" if args.direct_model.lower() == "none" else args.direct_model
    share = dict(traces=traces[rank::world] if traces is not None else None,
                 problems=problems[rank::world] if problems is not None else None)
    mine = replace(args, seed=utils.derive_seed(args.seed, "rank", rank)) if world > 1 else args

    logger = LazyLogger(os.path.join(args.out, "metrics.jsonl"))
    engines = Engines(args, samplers, engine_needs(args, problems, all_split, mu_path, direct_path))
    try:
        traces = share["traces"]
        if traces is None:
            sampler = engines.get(args.model)
            utils.print0(f"r1_analysis: sampling {args.k} stems x {len(problems)} problems "
                         f"({'one generation' if args.rounds == 1 else f'up to {args.rounds} linearized rounds'} each)")
            traces = sample_traces(sampler, share["problems"], mine, logger)
        split, no_thinking = split_traces(traces, args)
        mu = engines.get(mu_path)
        utils.print0(f"r1_analysis: {len(split)} traces, {sum(len(t['groups']) for t in split)} prefixes, "
                     f"{args.p} meta-prover answers each" + (" (rank 0's share)" if world > 1 else ""))
        scored, too_long = score_traces(mu, split, mine, logger)
        distinct = list(dict.fromkeys(s["problem"] for s in scored))
        direct_rows = None
        if direct_path:
            gold = {s["problem"]: s["answer"] for s in scored}
            dsampler = engines.get(direct_path)
            utils.print0(f"r1_analysis: direct baseline, {args.direct_n} samples x {len(distinct)} problems")
            direct_rows = run_direct(dsampler, [{"problem": p, "answer": gold[p]} for p in distinct], mine, logger)
        if world > 1:  # merge the ranks' shares (rank order) while the engines, and so the group, live
            if not utils.is_distributed():
                raise RuntimeError("torchrun's process group ended before the ranks' results were merged")
            parts = utils.all_gather({"traces": traces, "scored": scored, "direct": direct_rows, "distinct": distinct,
                                      "no_thinking": no_thinking, "too_long": too_long})
            traces, scored = [t for p in parts for t in p["traces"]], [s for p in parts for s in p["scored"]]
            no_thinking, too_long = sum(p["no_thinking"] for p in parts), sum(p["too_long"] for p in parts)
            distinct = list(dict.fromkeys(s["problem"] for s in scored))
            index = {q: i for i, q in enumerate(distinct)}  # a direct row's "problem" indexes its rank's distinct list
            direct_rows = None if direct_rows is None else [{**r, "problem": index[p["distinct"][r["problem"]]]}
                                                            for p in parts for r in p["direct"]]
    finally:
        engines.close()
    if share["problems"] is not None and utils.is_main():
        utils.write_jsonl(os.path.join(args.out, "generated_traces.jsonl"),
                          [{k: t[k] for k in ("id", "problem", "answer", "trace", "rounds", "finish_reason")}
                           for t in traces])

    analysis = analyse(scored, direct_rows, distinct, args)
    data_hash = hashlib.sha1(json.dumps([[t["problem"], t["answer"], t["trace"]] for t in traces]).encode()).hexdigest()[:16]
    report = {"settings": {**asdict(args), "toy_preset": is_toy, "mu_model": mu_path, "direct_model": direct_path,
                           "traces_hash": data_hash},
              "skipped": {"no_thinking": no_thinking, "too_long": too_long}, "analysis": analysis}
    if utils.is_main():
        utils.write_jsonl(os.path.join(args.out, "traces.jsonl"), scored)
        if direct_rows is not None:
            utils.write_jsonl(os.path.join(args.out, "direct.jsonl"), direct_rows)
        utils.write_json(os.path.join(args.out, "summary.json"), report)
        with utils.atomic_path(os.path.join(args.out, "table.md")) as tmp, open(tmp, "w") as f:
            f.write(markdown_table(report, args))
        plot_curves(report, os.path.join(args.out, "accuracy_tokens.png"), args)
        plot_hist(report, os.path.join(args.out, "episodes_hist.png"))
    utils.barrier()
    o = analysis["overall"]
    logger.log({"stage": "done", **{k: v for k, v in o.items() if k != "direct"}})
    utils.print0(f"r1_analysis: {o['traces']} traces, mean {o['mean_episodes']:.2f} episodes, "
                 f"[maj@1] after the first group {o['maj1_first']:.3f}, after all {o['maj1_last']:.3f}, "
                 f"mean trace regret {o['trace_regret_mean']:.3f}"
                 + (f", direct pass@1 {o['direct']['pass'][0]:.3f}" if "direct" in o else ""))
    utils.print0(f"wrote {args.out}/summary.json, table.md, accuracy_tokens.png, episodes_hist.png, traces.jsonl")
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
