"""infogain.py: episodes, the meta-prover's J and information gain (MRT paper Sec. 5, Def. 5.1, Fig. 8).

An MRT-B trace is z0 (an attempt ending in a boxed answer), z1 (the backtrack episode: the
marker "Wait, this seems off. Let's try something else." through the restart step it names)
and z2 (the revised attempt). The meta-prover mu is the model told to stop and answer now: a
forced suffix (default utils.MU_SUFFIX, "\\nTime is up. The answer is \\boxed{") appended to
the context. J(mu | c) is mu's success rate from context c, estimated by m sampled answers
graded 0/1. The information gain of episode z_j is J(mu | c, z_j) - J(mu | c) (Def. 5.1).
With --mu-mode rollout, mu instead continues the context in the trace's own format for up to
--mu-rollout-tokens and the last boxed answer of the last episode is graded (J: a Monte-Carlo
value of the context; the paper allows any mu, our choice for small models that cannot answer
without writing the steps). mu itself lives in sampling.MetaProver, shared by every stage; this
file holds the episodes, the gain and the rules below, whose pure functions grpo.py (the dense
reward bonus), star.py and warmstart.py import.

Run (CPU, embedded default: samples backtrack traces from the toy base on 64 test problems,
then computes J and the per-episode gains, in a couple of minutes):
    python infogain.py
Traces from a file (rows with problem, answer and a backtrack completion), mu = the model:
    python infogain.py --model runs/star/mrt/model --traces runs/star/mrt/traces.jsonl
Two models side by side (each with its own traces), one shared meta-prover:
    python infogain.py --model mrt=runs/grpo/mrt/model outcome=runs/grpo/outcome/model \\
        --traces mrt.jsonl outcome.jsonl --mu-model runs/toy/base
A real model (one GPU) on its MRT-B traces, mu steered by an instruction in the suffix:
    python infogain.py --model runs/warmstart/model --traces runs/warmstart/traces.jsonl \\
        --mu-samples 16 --mu-max-tokens 32 \\
        --mu-suffix $'\\n\\nTime is up. I must stop and give my final answer now: \\\\boxed{'
The same traces under the rollout meta-prover (B = 128 tokens per sample):
    python infogain.py --traces runs/infogain/traces_base.jsonl --mu-mode rollout --out runs/infogain-rollout
Outputs under --out: gains.jsonl (per trace: id, restart step, the four J values, the three
per-episode gains, whether z0 and z2 are correct (z2 cut at --max-tokens counts wrong); on toy
problems also z0's first wrong step, the restart's class against it and whether it can fix z0,
toy.restart_truth), summary.json (means per model; `z0_dropped`, the problems dropped for want
of a usable z0 when traces were sampled; on toy problems `discrimination`, per restart class and
the AUC of fixable over unfixable restarts), infogain_hist.png (the backtrack episode's gain by
whether z2 is correct, one panel per model) and, when traces were sampled, traces_<model>.jsonl
(with each sample's finish_reason, which --traces reads back).

Decisions (the paper publishes no code for this):
- Episode split (split_backtrack): at the FIRST marker of the text (a linearized stream with
  several markers keeps the later ones inside z2). Whitespace before the marker opens z1 (z0
  ends at its last non-space character); then any whitespace (CRLF too) and "Step k:", k >= 1
  (spaces allowed around k). z1 runs through the end of that restart line, which holds one step
  and no box; a line break must follow, where z2 starts, and z2 holds a step line or a box. Any
  other text is not a backtrack trace (None): otherwise z1 could hold the answer and z2
  nothing, so the box would earn z1 information gain while the outcome, graded on z2, is 0.
- A continuation sampled after backtrack_cue(z0) (grpo.py, star.py, this CLI) is split with
  `split_continuation(z0, completion)` where the cue was appended, at len(z0), so a marker
  inside a line of z0 does not move the split.
- Rules every stage shares (grpo.py, star.py, this CLI): a continuation with no backtrack
  episode (it does not parse) has J after it = 0, so its gain is -J(mu | x, z0)
  (backtrack_gain); a sample cut at the token limit scores outcome 0 (sampling.sample_outcome);
  z0 is an attempt that ended by itself with a box, resampled up to sampling.Z0_TRIES times,
  else its problem is dropped and counted (sampling.sample_z0).
- mu's own rules are sampling.MetaProver's: its context is sampling.mu_context (no blank line
  before a suffix that starts with a newline); its graded text is suffix + completion (an
  instruction in --mu-suffix steers it, a box in the suffix counts, one in the context never
  does, an empty suffix makes it complete the solution: warmstart's value estimate); its m answers
  to a context come from one request with n=m, prefilled once (prefix caching; the four contexts
  of a trace share KV blocks too; bench/infogain_prefill.py measures the saving).
- CLI input: a row that is not a backtrack trace is an error naming file:line, unless
  --skip-invalid (then skipped and counted). Malformed JSON is always an error.
"""

from __future__ import annotations

import gc
import json
import os
import re
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

import sampling
import toy
import utils

# ---- Episodes of an MRT-B trace (trace format: brief / paper Fig. 4, 10) -------------


@dataclass
class Episodes:
    """One MRT-B trace split into episodes: z0 + z1 + z2 is the original text."""

    z0: str
    """the attempt (ends with its boxed answer)"""
    z1: str
    """the backtrack episode: "\\n" + marker + "\\nStep k:" + the rest of that line (one step, no box)"""
    z2: str
    """the revised attempt: from the line break after the restart line on (a step line or a box at least)"""
    restart_step: int
    """k, the step the revised attempt restarts from"""


_RESTART = re.compile(r"\s*Step[ \t]*(\d+)[ \t]*:([^\n]*)(?=\n)")
_STEP = re.compile(r"\bStep[ \t]*\d+[ \t]*:")  # a step label anywhere (a second one on the restart line)
_STEP_LINE = re.compile(r"(?m)^[ \t]*Step[ \t]*\d+[ \t]*:")  # a line that starts a step
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")  # a box's opening, as utils.extract_boxed finds it


def split_backtrack(text: str, marker: str = utils.BACKTRACK_MARKER) -> Episodes | None:
    """Split a backtrack trace at the FIRST marker; None when it is not one (the module's rules:
    "Step k:" right after the marker, a line break after the restart line, which holds no box
    and no second step, and a z2 with a step line or a box), so z1 never holds the answer."""
    i = text.find(marker)
    m = None if i < 0 else _RESTART.match(text, i + len(marker))
    if m is None or int(m.group(1)) < 1 or _BOX.search(m.group(2)) or _STEP.search(m.group(2)):
        return None
    z2 = text[m.end():]
    if not (_STEP_LINE.search(z2) or _BOX.search(z2)):
        return None
    start = len(text[:i].rstrip())  # whitespace before the marker opens z1
    return Episodes(text[:start], text[start:m.end()], z2, int(m.group(1)))


def split_continuation(z0: str, completion: str, marker: str = utils.BACKTRACK_MARKER) -> Episodes | None:
    """Episodes of a completion (the cue and the sample) sampled after backtrack_cue(z0), split at
    len(z0): z0 whatever it holds (a marker too), the rest by split_backtrack; None if it fails."""
    if not completion.startswith(z0):
        return None
    ep = split_backtrack(completion[len(z0):], marker)
    return None if ep is None or ep.z0 else Episodes(z0, ep.z1, ep.z2, ep.restart_step)


def join_backtrack(ep: Episodes) -> str:
    """Inverse of split_backtrack: z0 + z1 + z2."""
    return ep.z0 + ep.z1 + ep.z2


def restart_prefix(z0: str, k: int) -> str | None:
    """z0's text before its first "Step k:" line, kept by a restart at k (steps 1..k-1 stand), or None."""
    m = re.search(rf"(?m)^[ \t]*Step[ \t]*{int(k)}[ \t]*:", z0)
    return None if m is None else z0[:m.start()]


def backtrack_cue(z0: str, marker: str = utils.BACKTRACK_MARKER) -> str:
    """The context after the prompt in RL and STaR: the policy writes " k: ..." and the revised attempt."""
    return z0 + "\n" + marker + "\nStep"  # utils.BACKTRACK_CUE with the default marker


def episode_contexts(prompt: str, ep: Episodes) -> list[str]:
    """The contexts mu is asked from: [x, x+z0, x+z0+z1, x+z0+z1+z2] (each a prefix of the next)."""
    return [prompt, prompt + ep.z0, prompt + ep.z0 + ep.z1, prompt + ep.z0 + ep.z1 + ep.z2]


# ---- Information gain (Def. 5.1) and J at the episode prefixes (mu: sampling.MetaProver) ----


def information_gain(j_after, j_before):
    """I(z_j; c) = J(mu | c, z_j) - J(mu | c) (Def. 5.1). Floats give a float, arrays an array."""
    d = np.asarray(j_after, dtype=np.float64) - np.asarray(j_before, dtype=np.float64)
    return float(d) if d.ndim == 0 else d


def backtrack_gain(j_before, j_after):
    """J(mu | x, z0, z1) - J(mu | x, z0) of a continuation sampled after the cue (grpo.py's bonus,
    star.py's selection). One that does not parse (j_after None) counts J after it as 0: never
    above a parsed continuation's gain from the same z0 (breaking the format never pays); mu is not asked."""
    return information_gain(0.0 if j_after is None else j_after, j_before)


def episode_gains(j_values) -> list:
    """Per-episode gains from J at successive prefixes [J(c), J(c,z0), J(c,z0,z1), ...]:
    [J(c,z0) - J(c), J(c,z0,z1) - J(c,z0), ...] (one fewer than the values)."""
    return [information_gain(after, before) for before, after in zip(j_values, j_values[1:])]


def gain_standard_error(j_before, j_after, m: int, ref_m: int | None = None):
    """Standard error of a gain J(after) - J(before) whose two J each average m independent 0/1
    answers: sqrt((pb (1 - pb) + pa (1 - pa)) / m) at success rates pb, pa (arrays give an array).
    When pb, pa are means of ref_m answers, each variance is the unbiased ref_m / (ref_m - 1) p (1 - p)."""
    pb, pa = np.asarray(j_before, dtype=np.float64), np.asarray(j_after, dtype=np.float64)
    var = pb * (1 - pb) + pa * (1 - pa)
    se = np.sqrt((var if ref_m is None else var * ref_m / (ref_m - 1)) / m)
    return float(se) if se.ndim == 0 else se


def trace_values(mu: sampling.MetaProver, prompts: list[str], episodes: list[Episodes], golds: list[str],
                 seed: int | None = None) -> np.ndarray:
    """(N, 4) J(mu | x), J(mu | x, z0), J(mu | x, z0, z1), J(mu | x, z0, z1, z2) per trace,
    from one batched call (the four contexts of a trace share their prefix)."""
    contexts = [c for p, ep in zip(prompts, episodes) for c in episode_contexts(p, ep)]
    return mu.success_rates(contexts, [g for g in golds for _ in range(4)], seed).reshape(len(episodes), 4)


# ---- Command line: traces (read or sampled) -> J values -> gains, histogram, summary ----


@dataclass
class Args(utils.DataArgs, sampling.MuArgs):
    """This stage's own flags; the bases add those every stage spells alike (--help lists all)."""
    model: list[str] = field(default_factory=list)
    """models as name=path or a bare path, e.g. --model a=P b=Q (plotted side by side); empty: the toy base"""
    traces: list[str] = field(default_factory=list)
    """JSONL/Parquet of backtrack traces, one per --model or one for all; empty: sample them on --data"""
    out: str = "runs/infogain"
    """output folder"""
    completion_field: str = "completion"
    """field of the backtrack completion (z0 + z1 + z2) in --traces"""
    id_field: str = "id"
    """field of the trace id in --traces (rows without one get their line number)"""
    skip_invalid: bool = False
    """skip (and count) trace rows that are not backtrack traces instead of failing"""
    data: str = ""
    """problems to sample traces from (empty: the toy test split)"""
    problems: int = 64
    """problems used when sampling traces (the first N; 0: all)"""
    continuations: int = 4
    """backtrack continuations sampled per attempt z0 when sampling traces"""
    temperature: float = 1.0
    """sampling temperature of sampled traces"""
    max_tokens: int = 160
    """token limit of z0 and of the continuation when sampling traces"""
    toy_dir: str = toy.DEFAULT_DIR
    """toy build used when --model is empty"""
    seed: int = 0
    """sampling seed"""
    batch: int = 64
    """traces per meta-prover call (progress granularity)"""
    max_model_len: int = 0
    """engine context length (0: what this run needs, engine_need; never the model's whole context)"""


def longest_mu_context(tokenizer, row: dict, instruction: str, suffix: str) -> int:
    """Tokens of a trace's longest meta-prover context: prompt + z0 + z1 + z2 + suffix."""
    last = episode_contexts(utils.build_prompt(tokenizer, row["problem"], instruction), row["episodes"])[-1]
    return len(utils.encode(tokenizer, sampling.mu_context(last, suffix)))


def engine_need(path: str, args: Args, problems: list[dict] | None, rows: list[dict]) -> int:
    """Tokens one engine sequence on `path` may hold in this run (sampling.engine_length makes it
    max_model_len): the longest trace of `rows` + mu's tokens (sampling.mu_need) + ENGINE_SLACK, and
    for traces sampled from `problems`, sampling.trace_need of the longest prompt with mu's tokens."""
    tok = utils.load_tokenizer(path)
    mu = sampling.mu_need(tok, args.mu_mode, args.mu_suffix, args.mu_max_tokens, args.mu_rollout_tokens)
    need = max((longest_mu_context(tok, r, args.instruction, "") for r in rows), default=-1)
    need = need + mu + sampling.ENGINE_SLACK if rows else 0
    if problems:
        prompt = max(len(utils.encode(tok, utils.build_prompt(tok, p["problem"], args.instruction)))
                     for p in problems)
        need = max(need, sampling.trace_need(tok, prompt, args.max_tokens, True, mu))
    return need


def read_traces(path: str, args: Args) -> tuple[list[dict], int]:
    """Trace rows {id, problem, answer, completion, episodes, where, finish_reason} of a file
    (utils.completion_rows checks each row) and the skipped count."""
    rows, skipped = [], 0
    for line, where, r, answer, reason in utils.completion_rows(path, args.problem_field, args.answer_field,
                                                                 args.completion_field, args.answer_from):
        ep = split_backtrack(r["completion"])
        if ep is None and not args.skip_invalid:
            raise utils.UserError(f"{where}: not a backtrack trace (no marker followed by 'Step k:'; "
                                  f"--skip-invalid skips such rows)")
        skipped += ep is None
        if ep is not None:
            rows.append({"id": r.get(args.id_field, line), "problem": r["problem"], "answer": answer,
                         "completion": r["completion"], "episodes": ep, "where": where,
                         "finish_reason": reason, **({"record": r} if args.reward else {})})
    if not rows:
        raise utils.UserError(f"{path}: no backtrack traces")
    return rows, skipped


def sample_traces(sampler: sampling.Sampler, records: list[dict], args: Args, name: str) -> tuple:
    """Backtrack traces of model `name` (written to traces_<name>.jsonl), the skipped and the dropped-z0
    counts: one attempt z0 per problem (sampling.sample_z0), then --continuations samples from prompt +
    backtrack_cue(z0) (the RL/STaR context), split by split_continuation. One that does not parse is
    skipped (none left: main reports 0 traces); one cut at --max-tokens is kept (outcome 0)."""
    utils.print0(f"{name}: sampling backtrack traces on {len(records)} problems")
    tok, kw = sampler.tokenizer, {"temperature": args.temperature, "max_tokens": args.max_tokens}
    prompts = [utils.build_prompt(tok, r["problem"], args.instruction) for r in records]
    z0s, dropped = sampling.sample_z0(sampler, [{"id": i, "prompt": x} for i, x in enumerate(prompts)], **kw,
                                      seed_parts=(args.seed, "z0"))
    keep = [(i, x, z0s[i]) for i, x in enumerate(prompts) if i in z0s]
    conts = sampler.generate([utils.encode(tok, x + backtrack_cue(z0)) for _, x, z0 in keep],
                             n=args.continuations, **kw, seed=utils.derive_seed(args.seed, "continuations"),
                             logprobs=False)
    rows, skipped = [], len(dropped)
    for (i, _, z0), group in zip(keep, conts):
        r = {k: records[i][k] for k in ("problem", "answer", "record") if k in records[i]}
        for j, s in enumerate(group):
            completion = backtrack_cue(z0) + s.text
            ep = split_continuation(z0, completion)
            skipped += ep is None
            if ep is not None:
                rows.append({"id": f"{i}-{j}", **r, "completion": completion, "episodes": ep,
                             "where": f"sampled {i}-{j}", "finish_reason": s.finish_reason})
    utils.print0(f"{name}: {len(dropped)} problems dropped: no usable attempt z0 in {sampling.Z0_TRIES} "
                 f"tries (cut at --max-tokens or no box)")
    keys = ("id", "problem", "answer", "completion", "finish_reason")
    utils.write_jsonl(os.path.join(args.out, f"traces_{name}.jsonl"), [{k: r[k] for k in keys} for r in rows])
    return rows, skipped, len(dropped)


def check_lengths(mu: sampling.MetaProver, rows: list[dict], args: Args, name: str, skipped: int) -> tuple:
    """The traces of model `name` whose longest mu context plus mu's tokens fit the engine, and
    `skipped` plus the count of the others (each an error naming file:line, unless --skip-invalid)."""
    if mu.sampler.backend != "vllm":
        return rows, skipped
    limit, kept = mu.sampler.max_model_len - mu.max_tokens, []
    for r in rows:
        n = longest_mu_context(mu.sampler.tokenizer, r, args.instruction, mu.suffix)
        if n > limit and not args.skip_invalid:
            raise utils.UserError(f"{r['where']}: trace too long for the meta-prover ({n} tokens > {limit} = "
                                  f"context length - mu's tokens (--mu-max-tokens or --mu-rollout-tokens); "
                                  f"--skip-invalid skips it)")
        kept += [r] if n <= limit else []
    if not kept:
        raise utils.UserError(f"{name}: no trace fits the meta-prover's context length")
    return kept, skipped + len(rows) - len(kept)


def score_traces(engine, rows: list[dict], skipped: int, args: Args, logger: utils.JsonlLogger,
                 name: str) -> tuple[list[dict], int]:
    """Model `name`'s traces that fit mu's engine (check_lengths) scored: J at the four prefixes of
    every trace, the per-episode gains and the outcomes (each batch's mean J values go to
    <out>/progress.jsonl as it finishes); and the skipped count."""
    mu = sampling.MetaProver(engine, args.mu_suffix, args.mu_samples, args.mu_temperature, args.mu_max_tokens,
                             mode=args.mu_mode, rollout_tokens=args.mu_rollout_tokens, reward=args.reward)
    rows, skipped = check_lengths(mu, rows, args, name, skipped)
    utils.print0(f"{name}: {len(rows)} traces ({skipped} skipped), J from {args.mu_samples} mu answers "
                 f"per context")
    tok, grade, out = mu.sampler.tokenizer, utils.make_grader(args.reward), []
    for b in tqdm(range(0, len(rows), args.batch), desc="meta-prover", disable=not utils.is_main()):
        chunk = rows[b: b + args.batch]
        prompts = [utils.build_prompt(tok, r["problem"], args.instruction) for r in chunk]
        J = trace_values(mu, prompts, [r["episodes"] for r in chunk], [r["answer"] for r in chunk],
                         seed=utils.derive_seed(args.seed, "meta-prover", b))  # (B, 4)
        for r, j in zip(chunk, J):
            ep, gains, record = r["episodes"], episode_gains(list(j)), r.get("record")
            truth = toy.restart_truth(r["problem"], ep.z0, ep.restart_step) or {}  # toy problems only
            out.append({"id": r["id"], "where": r["where"], "restart_step": ep.restart_step,
                        "valid_restart": restart_prefix(ep.z0, ep.restart_step) is not None,
                        "J": [float(v) for v in j], "gains": gains, "backtrack_gain": gains[1],
                        "z0_correct": grade(ep.z0, r["answer"], record),
                        "z2_correct": sampling.sample_outcome(ep.z2, r["answer"], r["finish_reason"],
                                                              args.reward, record),
                        "first_wrong": truth.get("first_wrong"), "restart_class": truth.get("class"),
                        "can_fix": truth.get("can_fix")})
        logger.log({"model": name, "traces_done": len(out), "batch_J_mean": J.mean(0).round(4).tolist()})
    return out, skipped


def auc(pos, neg) -> float | None:
    """Probability that a random score of `pos` exceeds a random one of `neg`, ties counting
    one half (the Mann-Whitney AUC); None when either side is empty."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if not pos.size or not neg.size:
        return None
    diff = pos[:, None] - neg[None, :]  # (P, N)
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def discrimination(scored: list[dict]) -> dict | None:
    """On scored traces with ground truth (toy problems; None when there are none): per restart
    class (toy.RESTART_CLASSES: the restart step against z0's first wrong step) the count, mean
    gain, share of positive gains and z2 accuracy; and the AUC of the gain ranking restarts that
    can fix a wrong z0 above those that cannot (traces after a right z0 left out)."""
    rows = [s for s in scored if s.get("restart_class") is not None]
    if not rows:
        return None
    groups = {}
    for c in toy.RESTART_CLASSES:
        g = np.array([s["backtrack_gain"] for s in rows if s["restart_class"] == c])  # (n_c,)
        ok = np.array([s["z2_correct"] for s in rows if s["restart_class"] == c])
        groups[c] = {"n": int(g.size), "gain_mean": round(float(g.mean()), 4) if g.size else None,
                     "positive_share": round(float((g > 0).mean()), 4) if g.size else None,
                     "z2_accuracy": round(float(ok.mean()), 4) if ok.size else None}
    fix = [s["backtrack_gain"] for s in rows if s["can_fix"] is True]
    no_fix = [s["backtrack_gain"] for s in rows if s["can_fix"] is False]
    a = auc(fix, no_fix)
    return {"traces": len(rows), "groups": groups, "fixable": len(fix), "unfixable": len(no_fix),
            "auc": None if a is None else round(a, 4)}


def summarize(scored: list[dict], skipped: int) -> dict:
    """Means over the scored traces (None where there are none)."""
    J = np.array([s["J"] for s in scored]).reshape(-1, 4)  # (N, 4)
    g = np.array([s["backtrack_gain"] for s in scored])  # (N,)
    ok = np.array([s["z2_correct"] for s in scored]) > 0
    mean = lambda a: round(float(a.mean()), 4) if a.size else None  # noqa: E731
    return {"traces": len(scored), "skipped": skipped,
            "J_mean": {name: mean(J[:, i]) for i, name in enumerate(["x", "x_z0", "x_z0_z1", "x_z0_z1_z2"])},
            "gain_mean": {name: mean(J[:, i + 1] - J[:, i]) for i, name in enumerate(["z0", "z1", "z2"])},
            "backtrack_gain_stderr": round(float(g.std(ddof=1) / np.sqrt(len(g))), 4) if len(g) > 1 else None,
            "backtrack_gain_mean_z2_correct": mean(g[ok]), "backtrack_gain_mean_z2_wrong": mean(g[~ok]),
            "backtrack_gain_positive_frac": mean(g > 0),
            "z0_accuracy": mean(np.array([s["z0_correct"] for s in scored])), "z2_accuracy": mean(ok),
            "valid_restart_frac": mean(np.array([s["valid_restart"] for s in scored])),
            "discrimination": discrimination(scored)}


def main(args: Args) -> dict:
    """Score every model's traces (read, or sampled from it); engines come from sampling.engine."""
    sampling.check_mu_args(args)
    if min(args.batch, args.continuations) < 1 or args.problems < 0:
        raise utils.UserError("--batch and --continuations must be >= 1, --problems >= 0")
    runs = utils.named_models(args.model) if args.model else {"base": toy.ensure_built(args.toy_dir)["base"]}
    if args.traces and len(args.traces) not in (1, len(runs)):
        raise utils.UserError(f"--traces: give one file or one per model ({len(runs)}), "
                              f"got {len(args.traces)}")

    # read every input first: bad input fails before any engine starts or file is written
    files = args.traces * len(runs) if len(args.traces) == 1 else args.traces
    traces = {name: read_traces(path, args) for name, path in zip(runs, files)}
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    if not args.traces and not args.data:
        toy.ensure_built(args.toy_dir)
    problems = None if args.traces else utils.load_problems(
        args.data or toy.paths(args.toy_dir)["test"], args.problem_field, args.answer_field, args.problems,
        answer_from=args.answer_from, keep_record=bool(args.reward))
    if args.mu_model and not utils.model_path_ok(args.mu_model):
        raise utils.UserError(f"--mu-model: model path does not exist: {args.mu_model}")
    given = [r for rows, _ in traces.values() for r in rows]
    instructions = {name: utils.stage_instruction(args.instruction, path) for name, path in runs.items()}

    def new_engine(path, names):  # sized from these runs (--max-model-len overrides); READY's as it is
        need = max(engine_need(path, replace(args, instruction=instructions[n]), problems, given)
                   for n in names)
        return sampling.engine(path, seed=args.seed, dtype=args.dtype,
                               max_model_len=args.max_model_len or sampling.engine_length(path, need))

    shared_mu = new_engine(args.mu_model, runs) if args.mu_model else None
    results, summary, logger = {}, {}, utils.JsonlLogger(os.path.join(args.out, "progress.jsonl"))
    for name, path in runs.items():
        args = replace(args, instruction=instructions[name])  # this model's prompt
        sampler = None if name in traces else new_engine(path, [name])
        rows, skipped, *dropped = traces.get(name) or sample_traces(sampler, problems, args, name)
        if rows:
            results[name], skipped = score_traces(shared_mu or sampler or new_engine(path, [name]),
                                                  rows, skipped, args, logger, name)
        else:  # sampled, and every attempt or continuation was cut or unparsable
            utils.print0(f"{name}: no backtrack trace among its samples ({skipped} skipped); "
                         f"reported with 0 traces")
        summary[name] = {**summarize(results.get(name, []), skipped), **{"z0_dropped": d for d in dropped}}
        if rows:
            utils.print0(f"{name}: " + json.dumps({k: summary[name][k] for k in ("J_mean", "gain_mean",
                                                                                    "z2_accuracy")}))
        del sampler  # one engine per model at a time (the shared mu and READY's engines stay)
        gc.collect()

    if not results:
        raise utils.UserError("no model produced a backtrack trace (every attempt or continuation was cut "
                              "or unparsable)")
    utils.write_jsonl(os.path.join(args.out, "gains.jsonl"),
                      [{"model": name, **s} for name, scored in results.items() for s in scored])
    report = {"settings": {**vars(args), "model": runs, "instruction": instructions}, "models": summary}
    utils.write_json(os.path.join(args.out, "summary.json"), report)
    # Fig. 8 style: the backtrack episode's gain J(x,z0,z1) - J(x,z0) per model, revised attempts
    # that end correct vs wrong stacked; gains are multiples of 1/m, one bin per attainable value
    m, png = args.mu_samples, os.path.join(args.out, "infogain_hist.png")
    utils.split_hist_grid(results, "backtrack_gain", "z2_correct", png, (np.arange(-m, m + 2) - 0.5) / m,
                          ("revised attempt correct", "revised attempt wrong", "mean gain"),
                          "gain of z1:  J(μ|x,z0,z1) − J(μ|x,z0)", "traces")
    utils.print0(f"wrote {args.out}/gains.jsonl, summary.json, infogain_hist.png")
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
