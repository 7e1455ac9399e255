"""evaluate.py: parallel and linearized evaluation of MRT models, pass@k / maj@k against tokens.

Paper Sec. 7 (evaluation protocol), Fig. 7 and 9, Def. 3.1. For every model (several in one
call, one sampling engine at a time) and every problem:

- parallel mode: N independent traces in the model's own format (`<model>/mrt.json`
  "format": a "backtrack" model writes z0, the marker, the restart and z2 in one generation;
  a "direct" model writes one attempt). For k = 1..N: pass@k (unbiased estimator) and maj@k
  (exact expectation over k-subsets) against k x the mean generated tokens of one trace.
- linearized mode: N rounds of sequential improvement. Round 1 samples from the prompt; round
  r+1 sees the prompt, the latest W tokens of the transcript so far (the sampled token ids,
  never re-tokenized text) and the continuation cue "\\n" + BACKTRACK_MARKER + "\\nStep" (the
  authors' RL context). pass@k / maj@k over the first k rounds' answers against the
  cumulative generated tokens of rounds 1..k.

The graded answer of any generation is the last \\boxed{} of its LAST episode: the text after
the last backtrack marker (z2 for a backtrack trace; z0's box is never credited).
The two samplers are sampling.run_parallel and sampling.run_linearized (r1_analysis.py samples
its linearized traces with the same code), the grade sampling.graded; this file turns their rows
into curves.

Run (CPU, embedded default: toy test split, every toy checkpoint that exists):
    python evaluate.py
    python evaluate.py --models base=runs/toy/base mrt=runs/grpo/mrt/model --samples 8 --window 128
Real models (one GPU; AIME-style JSONL or Parquet, chat template applied automatically):
    python evaluate.py --models base=meta-llama/Llama-3.1-8B-Instruct mrt=runs/grpo/mrt/model \\
        --data aime.jsonl --problem-field problem --answer-field answer --samples 32 \\
        --temperature 0.7 --max-tokens 8192 --window 2048 --out runs/eval/aime
Several GPUs (or CPU processes): the problems are split over the ranks, one engine per rank;
rank 0 merges the rows and writes what one process would (samples are seeded by the
problem's index, so the split does not change them):
    torchrun --nproc_per_node 8 evaluate.py --models base=... mrt=... --data aime.jsonl ...
Under torchrun every model's engine stays up until the end (closing a vLLM engine ends
torchrun's process group): with several models, lower --gpu-memory-utilization so that they
fit side by side, or run one model per call with the same --out.
Outputs under --out: curves.json (every curve, token efficiency, AUC), table.md (accuracy at
matched token budgets), accuracy_tokens.png (Fig. 7 style), samples/<run>.<mode>.jsonl
(per-sample outputs) with a .meta.json each (a rerun with the same settings reuses them, so a
killed multi-model call resumes), metrics.jsonl.

Decisions and departures from the paper (which does not publish its evaluation code):
- Token accounting. The x-axis charges GENERATED tokens only, in both modes (the paper plots
  "total tokens spent"; the prompt is not charged in parallel mode either). The up to W
  transcript tokens linearized mode re-reads each round are recorded (`context_tokens`, per
  sample and as a second curve in curves.json) but not charged on the x-axis.
- The linearized transcript is round 1's ids, then cue + round 2's ids, then cue + round 3's,
  ... (trailing EOS dropped); the window is its last W tokens, capped so that prompt + window
  + cue + max_tokens fits the model's context (a warning says when the cap bites).
- Both formats are sampled the same way (plain prompt; the same cue); the format, read from
  mrt.json, is recorded with each run. A backtrack model's parallel trace holds all three
  episodes, so one trace costs its z0 + z1 + z2 tokens.
- A direct model gets the same cue in linearized mode: it is asked to revise although it was
  never trained to; that is the paper's comparison of how each model uses sequential compute.
- maj@k is the exact expected accuracy of a majority vote over a uniformly random k-subset of
  the N answers (not one random subset), so the curves carry no subsampling noise.
"""

from __future__ import annotations

import fractions
import functools
import gc
import glob
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np

import sampling
import toy
import utils

MODES = ("parallel", "linearized")
CONTINUE_CUE = utils.BACKTRACK_CUE
"""Appended after the window in linearized mode (as the authors' RL continuation context)."""


@dataclass
class Args(utils.DataArgs):
    """This stage's own flags; the bases add those every stage spells alike (--help lists all)."""
    models: list[str] = field(default_factory=list)
    """runs as name=path (or a bare path); empty: runs/toy/base and every toy checkpoint that
    exists under runs/warmstart/model, runs/star/*/model, runs/grpo/*/model"""
    data: str = ""
    """problems: .jsonl, .parquet or a hub dataset org/name[:split] (empty: the toy test split
    under --toy-dir)"""
    problems: int = 0
    """evaluate only the first N problems (0: all)"""
    modes: list[str] = field(default_factory=lambda: list(MODES))
    """evaluation modes: parallel and/or linearized"""
    samples: int = 8
    """N: traces per problem (parallel) and rounds per problem (linearized) (not --n: under
    torchrun, Python's argparse reads --n as an ambiguous torchrun option)"""
    temperature: float = 1.0
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling threshold"""
    max_tokens: int = 512
    """generated tokens per trace (parallel) and per round (linearized)"""
    window: int = 2048
    """W: linearized rounds see the latest W tokens of the transcript (paper: 2048; the toy
    needs far less, e.g. 128, to exercise the truncation)"""
    max_model_len: int = 0
    """engine context length (0: what the longest prompt + max_tokens, plus window + cue in
    linearized mode, need, capped at the model's max_position_embeddings)"""
    seed: int = 0
    """sampling seed"""
    out: str = "runs/eval"
    """output folder"""
    toy_dir: str = toy.DEFAULT_DIR
    """toy build used when --data or --models is left empty"""
    reuse: bool = True
    """reuse per-sample files whose recorded settings match this call (resume)"""
    gpu_memory_utilization: float = 0.0
    """fraction of GPU memory each engine may take (0: 0.85 split over the engines this process
    holds at once: one in a plain run, which frees each before the next; under torchrun, where
    every model's engine stays up, one per model)"""


# ---- Pure metrics: pass@k, maj@k, token efficiency, AUC, cumulative regret -----------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), computed as
    1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a binomial (stable for any n)."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} > n={n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@functools.lru_cache(maxsize=1 << 16)
def _equal(pred: str, gold: str) -> bool:
    """utils.grade of the answer `pred` against `gold` (cached: clustering asks many pairs)."""
    return utils.grade("\\boxed{" + pred + "}", gold) == 1.0


def cluster_answers(answers, gold, right: set | None = None) -> tuple[list[int], list[bool], int]:
    """Group answers that the grader calls equal: (cluster sizes, cluster correct flags, number
    of unparsable answers). `answers` are extracted answers (utils.extract_boxed's); None or ""
    is unparsable. The answers `utils.grade` accepts against gold form the one correct cluster
    (so maj@1 equals pass@1 exactly); with `right` (the answers whose samples a custom --reward
    graded 1), those answers do. Wrong answers are grouped greedily: distinct strings in order
    of (count descending, string), each joins the first cluster whose representative it equals
    under `utils.grade` in either direction ("\\frac{1}{2}" and "0.5" are one answer), else it
    starts one. The result depends only on the multiset of answers, never on sample order."""
    n_none = sum(1 for a in answers if a is None or not str(a).strip())
    counts = Counter(str(a).strip() for a in answers if a is not None and str(a).strip())
    order = sorted(counts, key=lambda a: (-counts[a], a))
    gold = str(gold).strip()
    is_right = (lambda a: _equal(a, gold)) if right is None else (lambda a: a in right)  # noqa: E731
    n_correct = sum(counts[a] for a in order if is_right(a))
    reps, sizes = [], []
    for a in order:
        if is_right(a):
            continue
        for i, r in enumerate(reps):
            if _equal(a, r) or _equal(r, a):
                sizes[i] += counts[a]
                break
        else:
            reps.append(a)
            sizes.append(counts[a])
    sizes = ([n_correct] if n_correct else []) + sizes
    correct = ([True] if n_correct else []) + [False] * (len(sizes) - bool(n_correct))
    return sizes, correct, n_none


def majority_curve(counts, correct, n_none: int = 0) -> np.ndarray:
    """Exact expected accuracy of a majority vote over k answers drawn without replacement,
    for every k = 1..n (n = sum(counts) + n_none). Clusters are the grader-equal answer groups
    (sizes `counts`, flags `correct`); the n_none unparsable answers are drawn but never vote.
    The cluster(s) with most votes win, a tie splits the credit evenly among the tied clusters,
    a draw of only unparsable answers earns 0.
    For each correct cluster g and each vote count v it gets, a DP over the other clusters
    counts the s-subsets of the other answers that put no cluster above v and exactly t
    clusters at v (credit 1 / (1 + t)); it serves every k at once. Everything is counted in
    Python integers (credits scaled by L = lcm(1..n)), and each value is one exact fraction
    (favourable credit) / (L C(n, k)) rounded once to float, so a value is the float nearest
    the true expectation: never outside [0, 1], exactly 1.0 when every k-subset wins and
    exactly c / n at k = 1."""
    counts = [int(c) for c in counts]
    n = sum(counts) + int(n_none)
    L = math.lcm(*range(1, n + 2))
    num = [0] * (n + 1)  # num[k]: L x (sum over k-subsets of the credit to correct clusters)
    for g, (cg, ok) in enumerate(zip(counts, correct)):
        if not ok or cg == 0:
            continue
        others = [(c, True) for j, c in enumerate(counts) if j != g and c > 0]
        others += [(n_none, False)] if n_none else []
        S = n - cg
        for v in range(1, cg + 1):
            T = S // v  # most other clusters that can tie at v
            W = np.zeros((1, T + 1), dtype=object)  # W[s, t]: s-subsets of the pool so far
            W[0, 0] = 1
            M = 0
            for c, votes in others:
                new = np.zeros((M + c + 1, T + 1), dtype=object)  # (M+c+1, T+1)
                for x in range(min(c, v) + 1 if votes else c + 1):
                    if votes and x == v:
                        new[x:x + M + 1, 1:] += math.comb(c, x) * W[:, :-1]
                    else:
                        new[x:x + M + 1] += math.comb(c, x) * W
                W, M = new, M + c
            share = W @ np.array([L // (1 + t) for t in range(T + 1)], dtype=object)  # (S+1,) L x credit
            for s in range(S + 1):
                num[v + s] += math.comb(cg, v) * int(share[s])
    return np.array([float(fractions.Fraction(num[k], L * math.comb(n, k))) for k in range(1, n + 1)])


def maj_at_k(answers, gold, k: int, right: set | None = None) -> float:
    """Expected accuracy of a majority vote over k answers drawn without replacement from
    `answers` (extracted answers; None = unparsable, never wins), grader-equal answers counted
    as one (see cluster_answers, and its `right`), ties splitting the credit evenly. Independent of order."""
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k: need 1 <= k <= n, got k={k}, n={n}")
    counts, correct, n_none = cluster_answers(answers, gold, right)
    if k == n:  # the vote of all answers: deterministic
        if not counts:
            return 0.0
        top = max(counts)
        tied = [ok for c, ok in zip(counts, correct) if c == top]
        return sum(tied) / len(tied)
    return float(majority_curve(counts, correct, n_none)[k - 1])


def _check_curve(tokens, acc):
    x, y = np.asarray(tokens, dtype=float), np.asarray(acc, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or len(x) == 0:
        raise ValueError("a curve needs equal-length, non-empty tokens and accuracy sequences")
    if np.any(np.diff(x) < 0):
        raise ValueError("curve tokens must be non-decreasing")
    return x, y


def interp_curve(tokens, acc, budget: float) -> float | None:
    """Accuracy of the piecewise-linear curve at a token budget; None outside its range."""
    x, y = _check_curve(tokens, acc)
    if budget < x[0] - 1e-9 or budget > x[-1] + 1e-9:
        return None
    return float(np.interp(budget, x, y))


def token_efficiency(curve_a, curve_b) -> dict:
    """Tokens method A needs to reach method B's peak accuracy. Curves are (tokens, accuracy)
    pairs with tokens increasing (e.g. maj@k against tokens for k = 1..N).
    target = max accuracy of B; tokens_b = tokens of B's first point at that peak; tokens_a =
    the first token count where A's piecewise-linear curve reaches target (A's first point if
    it already does there; None if A never does). ratio = tokens_b / tokens_a (1.5 = "1.5x
    token efficiency"); saving = 1 - tokens_a / tokens_b (0.30 = "30% better token
    efficiency": A matches B's best with 30% fewer tokens; negative when A needs more)."""
    xa, ya = _check_curve(*curve_a)
    xb, yb = _check_curve(*curve_b)
    target = float(yb.max())
    tokens_b = float(xb[int(np.argmax(yb))])
    tokens_a = None
    if ya[0] >= target:
        tokens_a = float(xa[0])
    else:
        for i in range(1, len(xa)):
            if ya[i] >= target:  # first crossing between points i-1 and i
                f = (target - ya[i - 1]) / (ya[i] - ya[i - 1])
                tokens_a = float(xa[i - 1] + f * (xa[i] - xa[i - 1]))
                break
    ok = tokens_a is not None and tokens_a > 0 and tokens_b > 0
    return {"target": target, "tokens_b": tokens_b, "tokens_a": tokens_a,
            "ratio": tokens_b / tokens_a if ok else None, "saving": 1 - tokens_a / tokens_b if ok else None}


def curve_auc(tokens, acc, lo: float | None = None, hi: float | None = None) -> float:
    """Area under the piecewise-linear accuracy-tokens curve over [lo, hi] (default: the
    curve's own range), in accuracy x tokens; over a range all runs share (the largest first
    and the smallest last token count), auc / (hi - lo) is their mean accuracy there. A range
    outside the curve raises ValueError (the curve is not extrapolated)."""
    x, y = _check_curve(tokens, acc)
    lo = x[0] if lo is None else float(lo)
    hi = x[-1] if hi is None else float(hi)
    if lo < x[0] - 1e-9 or hi > x[-1] + 1e-9 or hi < lo:
        raise ValueError(f"curve_auc: range [{lo}, {hi}] is not inside the curve's [{x[0]}, {x[-1]}]")
    inner = (x > lo) & (x < hi)
    xs = np.concatenate([[lo], x[inner], [hi]])
    ys = np.interp(xs, x, y)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def cumulative_regret(j_values, j_star: float | None = None, running: bool = False):
    """Cumulative regret over episodes (Def. 3.1): sum_j (J* - J_j), where J_j is the success
    rate of the meta-prover after episode j (J(mu | z_{0:j})) and J* the comparator's success
    rate: given, or by default the best J_j observed (the best the model itself reached, so the
    regret is >= 0). Returns the total, or with running=True the partial sums per episode."""
    j = np.asarray(j_values, dtype=float)
    if j.ndim != 1 or len(j) == 0:
        raise ValueError("cumulative_regret needs a non-empty 1-D sequence of J values")
    star = float(j.max()) if j_star is None else float(j_star)
    partial = np.cumsum(star - j)
    return [float(v) for v in partial] if running else float(partial[-1])


# ---- Traces: the graded answer, prompts ----------------------------------------------


def open_engine(path: str, records: list[dict], args: Args):
    """The run's Sampler (sampling.engine: the ready one when sampling.READY holds the path), its
    prompt ids, and the context length the window must fit in: --max-model-len, else what the
    longest prompt needs (+ window + cue in linearized mode), capped at max_position_embeddings."""
    tok = sampling.READY[path].tokenizer if path in sampling.READY else utils.load_tokenizer(path)
    prompt_ids = [utils.encode(tok, utils.build_prompt(tok, r["problem"], args.instruction)) for r in records]
    cue = len(tok(CONTINUE_CUE, add_special_tokens=False)["input_ids"])
    need = max(map(len, prompt_ids)) + args.max_tokens
    need += args.window + cue if "linearized" in args.modes else 0
    max_len = args.max_model_len or sampling.engine_length(path, need)
    sampler = sampling.engine(path, seed=args.seed, dtype=args.dtype, max_model_len=max_len,
                              gpu_memory_utilization=args.gpu_memory_utilization)
    return sampler, prompt_ids, max_len


# ---- Curves: per-problem metrics averaged over problems, against tokens --------------


def curves(rows: list[dict], mode: str, n: int, custom: bool = False) -> dict:
    """pass@k and maj@k for k = 1..n (mean and standard error over problems) against tokens.
    `custom`: the rows were graded by a custom --reward, so maj@k's correct answers are those
    of the samples graded correct (cluster_answers' `right`).
    parallel: tokens(k) = k x mean generated tokens per trace; linearized: mean cumulative
    generated tokens of rounds 1..k. context_tokens is the same for the tokens read."""
    by_problem: dict[int, list[dict]] = {}
    for r in rows:
        by_problem.setdefault(r["problem"], []).append(r)
    ks = np.arange(1, n + 1)
    pass_k, maj_k, gen, ctx = [], [], [], []
    for group in by_problem.values():
        group.sort(key=lambda r: r.get("round", r.get("sample")))
        answers, gold = [r["answer"] for r in group], group[0]["gold"]
        correct = np.array([r["correct"] for r in group])
        right = {r["answer"] for r in group if r["correct"] and r["answer"]} if custom else None
        if mode == "parallel":
            pass_k.append([pass_at_k(n, int(correct.sum()), k) for k in ks])
            maj_k.append(majority_curve(*cluster_answers(answers, gold, right)))
        else:
            pass_k.append([float(correct[:k].max()) for k in ks])
            maj_k.append([maj_at_k(answers[:k], gold, k, right) for k in ks])
        gen.append([r["gen_tokens"] for r in group])
        ctx.append([r["context_tokens"] for r in group])
    pass_k, maj_k = np.array(pass_k), np.array(maj_k)  # (P, n)
    gen, ctx = np.array(gen, dtype=float), np.array(ctx, dtype=float)  # (P, n)
    if mode == "parallel":
        tokens, context = ks * gen.mean(), ks * ctx.mean()
    else:
        tokens, context = np.cumsum(gen, 1).mean(0), np.cumsum(ctx, 1).mean(0)
    se = lambda a: a.std(0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])  # noqa: E731
    return {"k": ks.tolist(), "tokens": tokens.tolist(), "context_tokens": context.tolist(),
            "pass": pass_k.mean(0).tolist(), "maj": maj_k.mean(0).tolist(),
            "pass_se": se(pass_k).tolist(), "maj_se": se(maj_k).tolist(), "problems": len(pass_k)}


def compare(runs: dict) -> dict:
    """Per mode and metric: token efficiency of every run against every other run, and each
    run's mean accuracy (AUC / width) over the token range all runs share."""
    out = {}
    for mode in MODES:
        have = {name: r["modes"][mode] for name, r in runs.items() if mode in r["modes"]}
        if not have:
            continue
        lo = max(c["tokens"][0] for c in have.values())
        hi = min(c["tokens"][-1] for c in have.values())
        out[mode] = {"shared_range": [lo, hi] if hi > lo else None}
        for metric in ("pass", "maj"):
            eff = {a: {b: token_efficiency((ca["tokens"], ca[metric]), (cb["tokens"], cb[metric]))
                       for b, cb in have.items() if b != a} for a, ca in have.items()}
            mean_acc = {a: curve_auc(c["tokens"], c[metric], lo, hi) / (hi - lo) if hi > lo else None
                        for a, c in have.items()}
            out[mode][metric] = {"efficiency": eff, "mean_acc_shared_range": mean_acc}
    return out


def budgets_for(curves: list[dict]) -> list[float]:
    """Matched token budgets: the smallest one-trace (one-round) token count of any run,
    doubled until it passes the largest token count of any run."""
    b, top = min(c["tokens"][0] for c in curves), max(c["tokens"][-1] for c in curves)
    return [b * 2**i for i in range(int(math.log2(top / b)) + 1)] if b > 0 else [0.0]


def markdown_table(runs: dict, comparison: dict) -> str:
    """Accuracy (pass@k / maj@k, interpolated) at matched token budgets, token saving of each
    run against the first run, mean maj@k accuracy over the shared token range."""
    ref = next(iter(runs))
    lines = ["# Evaluation: accuracy against generated tokens", "",
             "Each cell is pass@k / maj@k (%) of a run, linearly interpolated on its accuracy-tokens curve "
             "at that budget of generated tokens per problem (- outside the run's curve: below one trace or "
             f"beyond N). Token saving: 1 - (tokens the run needs to reach `{ref}`'s peak maj@k) / (tokens "
             f"`{ref}` needs), positive = fewer tokens. Mean acc: area under the maj@k curve over the token "
             "range all runs cover, divided by its width.", ""]
    for mode in MODES:
        have = {name: r["modes"][mode] for name, r in runs.items() if mode in r["modes"]}
        if not have:
            continue
        budgets = budgets_for(list(have.values()))  # never empty
        rows = []
        for name, c in have.items():
            cells = []
            for b in budgets:
                p, m = interp_curve(c["tokens"], c["pass"], b), interp_curve(c["tokens"], c["maj"], b)
                cells.append("-" if p is None else f"{100 * p:.1f} / {100 * m:.1f}")
            eff = comparison[mode]["maj"]["efficiency"].get(name, {}).get(ref)
            saving = ("(reference)" if name == ref else "-" if not eff or eff["saving"] is None
                      else f"{100 * eff['saving']:+.0f}%")
            acc = comparison[mode]["maj"]["mean_acc_shared_range"][name]
            rows.append([name, runs[name]["format"], *cells, saving,
                         "-" if acc is None else f"{100 * acc:.1f}"])
        head = ["run", "format", *(f"{b:.0f} tok" for b in budgets), f"token saving vs {ref} (maj)",
                "mean acc (maj)"]
        lines += [f"## {mode}", "", *utils.markdown_table(head, rows), ""]
    return "\n".join(lines)


def plot(runs: dict, path: str, title: str) -> None:
    """One panel per mode, shared axes: solid pass@k, dashed maj@k, one colour per run."""
    plt = utils.pyplot()
    modes = [m for m in MODES if any(m in r["modes"] for r in runs.values())]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.8), sharex=True, sharey=True,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], modes):
        for i, (name, r) in enumerate(runs.items()):
            if mode not in r["modes"]:
                continue
            c, col = r["modes"][mode], colors[i % len(colors)]
            ax.plot(c["tokens"], c["pass"], "-o", color=col, ms=3, label=f"{name} pass@k")
            ax.plot(c["tokens"], c["maj"], "--s", color=col, ms=3, label=f"{name} maj@k")
        ax.set_title(f"{mode} ({'k traces' if mode == 'parallel' else 'k rounds'})")
        ax.set_xlabel("generated tokens per problem")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title)
    utils.save_png(fig, path, dpi=120, bbox_inches="tight")


# ---- Inputs and main -----------------------------------------------------------------


def resolve_runs(args: Args) -> dict[str, str]:
    """{run name: model path} from --models, or the default toy run folders that exist."""
    if not args.models:
        runs = {"base": toy.paths(args.toy_dir)["base"]}
        for name, pattern in (("warmstart", "runs/warmstart/model"), ("star-*", "runs/star/*/model"),
                              ("grpo-*", "runs/grpo/*/model")):
            for path in sorted(glob.glob(pattern)):
                if os.path.isfile(os.path.join(path, "config.json")):
                    runs[name.replace("*", os.path.basename(os.path.dirname(path)))] = path
        return runs
    runs = {}
    for spec in args.models:
        name, _, path = spec.partition("=") if "=" in spec else (spec, "", spec)
        if not name or not path:
            raise utils.UserError(f"--models: expected name=path, got {spec!r}")
        if name in runs:
            raise utils.UserError(f"--models: run name {name!r} given twice")
        hub_name = utils.HUB_NAME.fullmatch(path) and not os.path.isdir(path.split("/")[0])
        if not os.path.isdir(path) and not hub_name:  # "runs/x" is a local path, "org/model" a hub name
            raise utils.UserError(f"--models {name}: model path does not exist: {path}")
        runs[name] = path
    return runs


def engines_held(runs: dict, ready: dict | None, world: int) -> int:
    """The engines a process holds at once, which share the GPU: one in a plain run (each is
    freed before the next), one per model it builds under torchrun (none is freed: closing a
    vLLM engine ends torchrun's process group)."""
    return len({p for p in runs.values() if p not in (ready or {})}) if world > 1 else 1


def samples_meta(args: Args, path: str, mode: str, fmt: str, data_hash: str) -> dict:
    """The settings a samples/<run>.<mode>.meta.json records: a rerun reuses the samples only
    when they match (--reward only when given; --window in linearized mode)."""
    keep = ("samples", "temperature", "top_p", "max_tokens", "seed", "instruction", "max_model_len", "reward")
    meta = {"model": path, "model_fingerprint": utils.folder_fingerprint(path), "mode": mode,
            "data": data_hash, "format": fmt,
            **{k: v for k, v in asdict(args).items() if k in keep if k != "reward" or v}}
    if mode == "linearized":
        meta["window"] = args.window
    return meta


def main(args: Args) -> dict:
    """Evaluate every run (on the ready engine of sampling.READY where it holds the model). Under
    torchrun each rank samples its share of the problems on its own engine; rank 0 merges the
    rows and writes every output (the same files as one process writes)."""
    rank, world, _ = utils.init_distributed()
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise utils.UserError(f"--modes: expected some of {', '.join(MODES)}, got {args.modes}")
    if args.samples < 1 or args.window < 1 or args.max_tokens < 1 or args.problems < 0:
        raise utils.UserError("--samples, --window and --max-tokens must be >= 1 and --problems >= 0")
    if not args.data or not args.models:
        toy.ensure_built(args.toy_dir)
    runs = resolve_runs(args)
    data_path = args.data or toy.paths(args.toy_dir)["test"]
    records = utils.load_problems(data_path, args.problem_field, args.answer_field, args.problems,
                                  answer_from=args.answer_from, keep_record=bool(args.reward))
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    formats = {name: utils.model_format(path) for name, path in runs.items()}
    problem_list = json.dumps([[r["problem"], r["answer"]] for r in records])
    data_hash = hashlib.sha1(problem_list.encode()).hexdigest()[:16]
    utils.print0(f"evaluate: {len(runs)} runs x {len(records)} problems x N={args.samples} "
                 f"({', '.join(args.modes)}), {world} rank(s)")
    mine = list(range(rank, len(records), world))  # this rank's problems (indices into records)
    logger = utils.JsonlLogger(os.path.join(args.out, "metrics.jsonl"))
    held = engines_held(runs, sampling.READY, world)
    gpu_share = utils.engine_memory_share(args.gpu_memory_utilization, held)
    if held > 1 and not args.gpu_memory_utilization:
        utils.print0(f"gpu_memory_utilization {gpu_share} per engine: {held} engines stay up side by side "
                     f"under torchrun")
    instruction = args.instruction

    results = {}
    for name, path in runs.items():
        args = replace(args, instruction=utils.stage_instruction(instruction, path),
                       gpu_memory_utilization=gpu_share)
        results[name] = {"path": path, "format": formats[name], "instruction": args.instruction, "modes": {}}
        sampler = None
        for mode in args.modes:
            stem = os.path.join(args.out, "samples", re.sub(r"[^\w.-]", "_", name) + "." + mode)
            meta = samples_meta(args, path, mode, formats[name], data_hash)
            reuse = args.reuse and os.path.isfile(stem + ".meta.json")
            if reuse and json.load(open(stem + ".meta.json")) == meta:
                rows = utils.read_records(stem + ".jsonl")
                utils.print0(f"{name} {mode}: reusing {stem}.jsonl")
            else:
                if sampler is None:
                    had_group = sampling.group_exists()
                    sampler, prompt_ids, max_len = open_engine(path, records, args)
                utils.print0(f"{name} {mode}: sampling")
                ids, share = [prompt_ids[i] for i in mine], [records[i] for i in mine]
                kw = dict(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                          seed=args.seed, reward=args.reward)
                if mode == "parallel":
                    rows = sampling.run_parallel(sampler, ids, share, mine, samples=args.samples, **kw)
                else:
                    rows = sampling.run_linearized(sampler, ids, share, mine, rounds=args.samples,
                                                   window=args.window, max_len=max_len, **kw)
                order = ("problem", "sample" if mode == "parallel" else "round")
                if world > 1:  # every rank's rows, in rank order
                    rows = utils.gather_shares({"rows": rows})["rows"]
                rows = sorted(rows, key=lambda r: [r[k] for k in order])
                if utils.is_main():
                    utils.write_jsonl(stem + ".jsonl", [{"run": name, "mode": mode, **r} for r in rows])
                    utils.write_json(stem + ".meta.json", meta)
                utils.barrier()
            c = curves(rows, mode, args.samples, bool(args.reward))
            results[name]["modes"][mode] = c
            n = args.samples
            logger.log({"run": name, "mode": mode, "pass@1": c["pass"][0], f"pass@{n}": c["pass"][-1],
                        f"maj@{n}": c["maj"][-1], "tokens@1": c["tokens"][0], "rss_gib": utils.rss_gib()})
            utils.print0(f"{name} {mode}: pass@1 {c['pass'][0]:.3f}  pass@{n} {c['pass'][-1]:.3f}  "
                         f"maj@{n} {c['maj'][-1]:.3f}  tokens/trace {c['tokens'][0]:.0f}")
        # one engine at a time: free it before the next one. Not a ready engine, nor under torchrun:
        # closing a vLLM engine ends vLLM's process-wide state and torchrun's process group with it
        if sampler is not None and path not in sampling.READY and world == 1:
            sampling.close_engine(sampler, had_group)
        sampler = None
        gc.collect()
        logger.log({"run": name, "rss_gib_after_free": utils.rss_gib()})

    comparison = compare(results)
    settings = {**asdict(args), "data": data_path, "problems": len(records)}
    report = {"settings": settings, "runs": results, "comparison": comparison}
    if utils.is_main():
        utils.write_json(os.path.join(args.out, "curves.json"), report)
        with utils.atomic_path(os.path.join(args.out, "table.md")) as tmp, open(tmp, "w") as f:
            f.write(markdown_table(results, comparison) + "\n")
        title = f"{os.path.basename(data_path)}: {len(records)} problems, N={args.samples}"
        plot(results, os.path.join(args.out, "accuracy_tokens.png"), f"{title}, T={args.temperature}")
    utils.barrier()
    utils.print0(f"wrote {args.out}/curves.json, table.md, accuracy_tokens.png, samples/")
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
