"""infogain.py: episodes, the meta-prover mu, and information gain (MRT paper Sec. 5, Def. 5.1, Fig. 8).

An MRT-B trace is z0 (an attempt ending in a boxed answer), z1 (the backtrack episode: the
marker "Wait, this seems off. Let's try something else." through the restart step it names)
and z2 (the revised attempt). The meta-prover mu is the model told to stop and answer now: a
forced suffix (default utils.MU_SUFFIX, "\\nTime is up. The answer is \\boxed{") appended to
the context. J(mu | c) is mu's success rate from context c, estimated by m sampled answers
graded 0/1. The information gain of episode z_j is J(mu | c, z_j) - J(mu | c) (Def. 5.1).
With --mu-mode rollout, mu instead continues the context in the trace's own format for up to
--mu-rollout-tokens and the last boxed answer of the last episode (after the last backtrack
marker, if any) is graded (J: a Monte-Carlo value of the context); the paper allows any mu,
and this is our choice for small models that cannot answer without writing the steps
(sampling.MetaProver).
grpo.py (the dense reward bonus), star.py and warmstart.py import this module.

Run (CPU, embedded default: samples backtrack traces from the toy base on 64 test problems,
then computes J and the per-episode gains, in a couple of minutes):
    python infogain.py
Traces from a file (rows with problem, answer and a backtrack completion), mu = the model:
    python infogain.py --model runs/star/mrt/model --traces runs/star/mrt/traces.jsonl
Two models side by side (each with its own traces), one shared meta-prover:
    python infogain.py --model mrt=runs/grpo/mrt/model outcome=runs/grpo/outcome/model \\
        --traces mrt.jsonl outcome.jsonl --mu-model runs/toy/base
A real model (one GPU) on its MRT-B traces, mu steered by an instruction in the suffix:
    python infogain.py --model runs/warmstart/model --traces runs/warmstart/traces.jsonl --mu-samples 16 \\
        --mu-max-tokens 32 --mu-suffix $'\\n\\nTime is up. I must stop and give my final answer now: \\\\boxed{'
The same traces under the rollout meta-prover (B = 128 tokens per sample):
    python infogain.py --traces runs/infogain/traces_base.jsonl --mu-mode rollout --out runs/infogain-rollout
Outputs under --out: gains.jsonl (per trace: id, restart step, the four J values, the three
per-episode gains, whether z0 and z2 are correct (z2 cut at --max-tokens counts wrong); on toy
problems also z0's first wrong step, the restart's class against it and whether it can fix z0,
toy.restart_truth), summary.json (means per model, the problems dropped for want of a usable
z0 when traces were sampled, `z0_dropped`, and on toy problems the discrimination of the gain:
per restart class and the AUC of fixable over unfixable restarts, `discrimination`),
infogain_hist.png (histogram of the backtrack episode's gain, split by whether the revised
attempt is correct; one panel per model in a grid), and traces_<model>.jsonl when traces were
sampled (with each sample's finish_reason, which --traces reads back).

Decisions (the paper publishes no code for this):
- Episode split: at the FIRST marker of the text (a linearized stream with several markers
  keeps the later ones inside z2). Whitespace before the marker belongs to z1, so z0 ends at
  its last non-space character; the marker may be followed by any whitespace (CRLF too)
  before "Step k:", and spaces are allowed around k. k must be >= 1. z1 runs through the end
  of the restart line, and a line break must follow it: the revised attempt z2 starts there.
  The restart line holds one step and no box, and z2 holds a step line or a box. A text with
  no marker, with no "Step k:" right after its first marker, that ends on its restart line,
  whose restart line holds a box or a second step, or whose z2 holds neither a step line nor
  a box is not a backtrack trace (None): otherwise z1 could hold the answer and z2 nothing, so
  the box would earn z1 information gain while the outcome, graded on z2, is 0.
- A continuation sampled after backtrack_cue(z0) (grpo.py, star.py, this CLI) is split with
  `split_continuation(z0, completion)` where the cue was appended, at len(z0), so a marker
  inside a line of z0 does not move the split.
- Rules every stage shares (grpo.py, star.py, this CLI): a continuation with no backtrack
  episode (it does not parse) has J after it = 0, so its gain is -J(mu | x, z0)
  (backtrack_gain); a sample cut at the token limit scores outcome 0 (sampling.sample_outcome); z0 is
  an attempt that ended by itself with a box, resampled up to sampling.Z0_TRIES times, else its
  problem is dropped and counted (sampling.sample_z0).
- mu's context: `sampling.mu_context(context, suffix)`. When the suffix starts with a newline, the
  context's trailing newlines are dropped first, so "...Solution:\\n" + "\\nTime is up" reads
  "...Solution:\\nTime is up" (one line break, as after a step line), never a blank line.
- Steering by instruction instead of a forced answer prefix is done by putting the
  instruction in the suffix (--mu-suffix): whatever the suffix says, mu's graded text is
  suffix + completion, so a box in the suffix counts and a box in the context never does.
  An empty suffix means mu completes the solution (a rollout value estimate: warmstart's
  beam search); give it enough --mu-max-tokens.
- mu is sampled at temperature 1 by default; its m answers to one context come from one
  request with n=m, so the context is prefilled once (prefix caching; bench/infogain_prefill.py
  measures the saving). The four contexts of one trace are prefixes of each other and share
  KV blocks too.
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

import sampling
import toy
import utils

# --------------------------------------------------------------------------------------
# Episodes of an MRT-B trace (trace format: brief / paper Fig. 4, 10)
# --------------------------------------------------------------------------------------


@dataclass
class Episodes:
    """One MRT-B trace split into episodes: z0 + z1 + z2 is the original text."""

    z0: str
    """the attempt (ends with its boxed answer)"""
    z1: str
    """the backtrack episode: "\\n" + marker + "\\nStep k:" + the rest of that restarted line (one step, no box)"""
    z2: str
    """the revised attempt: from the line break after the restart line, the remaining steps and the boxed answer
    (at least a step line or a box)"""
    restart_step: int
    """k, the step the revised attempt restarts from"""


_RESTART = re.compile(r"\s*Step[ \t]*(\d+)[ \t]*:([^\n]*)(?=\n)")
_STEP = re.compile(r"\bStep[ \t]*\d+[ \t]*:")  # a step label anywhere (a second one on the restart line)
_STEP_LINE = re.compile(r"(?m)^[ \t]*Step[ \t]*\d+[ \t]*:")  # a line that starts a step
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")  # a box's opening, as utils.extract_boxed finds it


def split_backtrack(text: str, marker: str = utils.BACKTRACK_MARKER) -> Episodes | None:
    """Split a backtrack trace at the FIRST marker. None when there is no marker, no
    "Step k:" (k >= 1) right after it (whitespace, CRLF included, may come between), no line
    break after the restart line, a restart line that holds a box or a second step, or a z2
    (from that line break on) with neither a step line nor a box: the restart line holds one
    step, and what follows it must be a revised attempt, so z1 never holds the answer."""
    i = text.find(marker)
    if i < 0:
        return None
    m = _RESTART.match(text, i + len(marker))
    if m is None or int(m.group(1)) < 1 or _BOX.search(m.group(2)) or _STEP.search(m.group(2)):
        return None
    z2 = text[m.end():]
    if not (_STEP_LINE.search(z2) or _BOX.search(z2)):
        return None
    start = len(text[:i].rstrip())  # whitespace before the marker opens z1
    return Episodes(text[:start], text[start:m.end()], z2, int(m.group(1)))


def split_continuation(z0: str, completion: str, marker: str = utils.BACKTRACK_MARKER) -> Episodes | None:
    """Episodes of a completion sampled after backtrack_cue(z0) (completion = the cue and the
    sample), split where the cue was appended, at len(z0): z0 is the sampled attempt whatever
    it holds (a marker inside one of its lines too), and the rest must parse by
    split_backtrack's rules. None when the completion does not start with z0 or the rest does
    not parse. grpo.py, star.py and warmstart.py use it."""
    if not completion.startswith(z0):
        return None
    ep = split_backtrack(completion[len(z0):], marker)
    return None if ep is None or ep.z0 else Episodes(z0, ep.z1, ep.z2, ep.restart_step)


def join_backtrack(ep: Episodes) -> str:
    """Inverse of split_backtrack: z0 + z1 + z2."""
    return ep.z0 + ep.z1 + ep.z2


def restart_prefix(z0: str, k: int) -> str | None:
    """z0's text before its (first) "Step k:" line: the prefix that the restart at step k
    shares with the attempt (steps 1..k-1 stand). None if z0 has no Step k line."""
    m = re.search(rf"(?m)^[ \t]*Step[ \t]*{int(k)}[ \t]*:", z0)
    return None if m is None else z0[:m.start()]


def backtrack_cue(z0: str, marker: str = utils.BACKTRACK_MARKER) -> str:
    """The continuation context after the prompt in RL and STaR: z0, the marker and
    "Step", so the policy writes " k: ..." (the restart) and the revised attempt."""
    return z0 + "\n" + marker + "\nStep"  # utils.BACKTRACK_CUE with the default marker


def episode_contexts(prompt: str, ep: Episodes) -> list[str]:
    """The contexts mu is asked from: [x, x+z0, x+z0+z1, x+z0+z1+z2] (each a prefix of the next)."""
    return [prompt, prompt + ep.z0, prompt + ep.z0 + ep.z1, prompt + ep.z0 + ep.z1 + ep.z2]


# --------------------------------------------------------------------------------------
# Information gain (Def. 5.1)
# --------------------------------------------------------------------------------------


def information_gain(j_after, j_before):
    """I(z_j; c) = J(mu | c, z_j) - J(mu | c) (Def. 5.1). Floats give a float, arrays an array."""
    d = np.asarray(j_after, dtype=np.float64) - np.asarray(j_before, dtype=np.float64)
    return float(d) if d.ndim == 0 else d


def backtrack_gain(j_before, j_after):
    """The information gain of the backtrack episode of a continuation sampled after the cue
    (grpo.py's bonus, star.py's selection and logged gains): J(mu | x, z0, z1) - J(mu | x, z0).
    A continuation with no backtrack episode (it does not parse: j_after None) counts J after
    it as 0, so its gain is -J(mu | x, z0): never above the gain of a parsed continuation
    from the same z0, so breaking the format never pays. mu need not be asked about it."""
    return information_gain(0.0 if j_after is None else j_after, j_before)


def episode_gains(j_values) -> list:
    """Per-episode gains from J at successive prefixes [J(c), J(c,z0), J(c,z0,z1), ...]:
    [J(c,z0) - J(c), J(c,z0,z1) - J(c,z0), ...] (one fewer than the values)."""
    return [information_gain(after, before) for before, after in zip(j_values, j_values[1:])]


# --------------------------------------------------------------------------------------
# The meta-prover mu and J(mu | c)
# --------------------------------------------------------------------------------------


def gain_standard_error(j_before, j_after, m: int, ref_m: int | None = None):
    """Standard error of an information gain I = J(after) - J(before) whose two J are each the
    mean of m independent 0/1 answers (sampling.MetaProver): sqrt((pb (1 - pb) + pa (1 - pa)) / m), at
    success rates pb, pa (arrays give an array). When pb, pa are themselves means of ref_m
    answers, each Bernoulli variance is the unbiased ref_m / (ref_m - 1) p (1 - p)."""
    pb, pa = np.asarray(j_before, dtype=np.float64), np.asarray(j_after, dtype=np.float64)
    var = pb * (1 - pb) + pa * (1 - pa)
    if ref_m is not None:
        var = var * ref_m / (ref_m - 1)
    se = np.sqrt(var / m)
    return float(se) if se.ndim == 0 else se


def trace_values(mu: sampling.MetaProver, prompts: list[str], episodes: list[Episodes], golds: list[str],
                 seed: int | None = None) -> np.ndarray:
    """(N, 4) J(mu | x), J(mu | x, z0), J(mu | x, z0, z1), J(mu | x, z0, z1, z2) per trace,
    from one batched call (the four contexts of a trace share their prefix)."""
    contexts = [c for p, ep in zip(prompts, episodes) for c in episode_contexts(p, ep)]
    golds4 = [g for g in golds for _ in range(4)]
    return mu.success_rates(contexts, golds4, seed).reshape(len(episodes), 4)


# --------------------------------------------------------------------------------------
# Command line: traces (read or sampled) -> J values -> gains, histogram, summary
# --------------------------------------------------------------------------------------


@dataclass
class Args:
    model: list[str] = field(default_factory=list)
    """models as name=path (or a bare path), e.g. --model a=P b=Q (plotted side by side);
    empty: the toy base under --toy-dir (built if missing)"""
    traces: list[str] = field(default_factory=list)
    """JSONL/Parquet of backtrack traces, one per --model or one for all; empty: sample
    traces from each model on --data"""
    out: str = "runs/infogain"
    """output folder"""
    mu_model: str = ""
    """meta-prover model (empty: each --model is its own meta-prover)"""
    mu_suffix: str = utils.MU_SUFFIX
    """text appended to the context to steer mu to answer now (a forced answer prefix or an
    instruction; in bash pass newlines with $'...')"""
    mu_samples: int = 8
    """m: mu's sampled answers per context"""
    mu_temperature: float = 1.0
    """mu's sampling temperature"""
    mu_max_tokens: int = 16
    """mu's answer length limit (raise it for an instruction suffix or an empty one)"""
    mu_mode: str = "forced"
    """forced: mu answers right after the context and --mu-suffix; rollout: mu continues the
    context in the trace's format for up to --mu-rollout-tokens, its last boxed answer graded"""
    mu_rollout_tokens: int = 128
    """B: tokens mu writes per sample in --mu-mode rollout"""
    problem_field: str = "problem"
    """field of the problem text in --traces / --data"""
    answer_field: str = "answer"
    """field of the gold answer in --traces / --data"""
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
    instruction: str | None = None
    """instruction in the user turn for models with a chat template (default: the one in each
    model's mrt.json when this project wrote it, else the standard one)"""
    toy_dir: str = toy.DEFAULT_DIR
    """toy build used when --model is empty"""
    seed: int = 0
    """sampling seed"""
    batch: int = 64
    """traces per meta-prover call (progress granularity)"""
    max_model_len: int = 0
    """engine context length (0: what this run needs, see engine_need; never the model's whole context)"""
    dtype: str = "auto"
    """engine dtype (auto: bf16 on GPU, fp32 on CPU)"""
    reward: str = ""
    """custom reward, module:function or path/to/file.py:function: a callable (completion text,
    gold answer, problem record) -> float in [0, 1] that replaces the math-verify grader at every
    grading site, the meta-prover's included (empty: utils.grade)"""
    answer_from: str = ""
    """field of a worked solution whose last \\boxed{} is the gold answer (e.g. solution,
    NuminaMath style; --answer-field is then not read); empty: --answer-field as is"""


def longest_mu_context(tokenizer, row: dict, instruction: str, suffix: str) -> int:
    """Tokens of a trace's longest meta-prover context: prompt + z0 + z1 + z2 + suffix."""
    prompt = utils.build_prompt(tokenizer, row["problem"], instruction)
    return len(utils.encode(tokenizer, sampling.mu_context(episode_contexts(prompt, row["episodes"])[-1], suffix)))


def engine_need(path: str, args: Args, problems: list[dict] | None, rows: list[dict]) -> int:
    """Tokens one engine sequence on `path` may hold in this run: the longest meta-prover
    context of the given traces `rows` (prompt + z0 + z1 + z2 + mu's suffix), and when traces
    are sampled from `problems`, the longest prompt + z0 + cue + continuation (each at most
    --max-tokens) + suffix; plus mu's tokens (--mu-max-tokens, or --mu-rollout-tokens) and 16
    (text re-encoded may take a few more tokens than were sampled). sampling.engine_length turns
    it into the engine's max_model_len."""
    tok = utils.load_tokenizer(path)
    suffix = len(utils.encode(tok, args.mu_suffix))
    need = max((longest_mu_context(tok, r, args.instruction, args.mu_suffix) for r in rows), default=0)
    if problems:
        longest = max(len(utils.encode(tok, utils.build_prompt(tok, p["problem"], args.instruction))) for p in problems)
        need = max(need, longest + 2 * args.max_tokens + len(utils.encode(tok, backtrack_cue(""))) + suffix)
    return need + (args.mu_rollout_tokens if args.mu_mode == "rollout" else args.mu_max_tokens) + 16


def resolve_models(args: Args) -> dict[str, str]:
    """{name: path} from --model (name=path or a bare path named by its folder)."""
    if not args.model:
        return {"base": toy.ensure_built(args.toy_dir)["base"]}
    runs = {}
    for spec in args.model:
        name, _, path = spec.partition("=") if "=" in spec else (os.path.basename(os.path.normpath(spec)), "", spec)
        if not name or not path:
            raise utils.UserError(f"--model: expected name=path or a path, got {spec!r}")
        if name in runs:
            raise utils.UserError(f"--model: name {name!r} given twice (use name=path)")
        if not os.path.isdir(path) and not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path):
            raise utils.UserError(f"--model {name}: model path does not exist: {path}")
        runs[name] = path
    return runs


def read_traces(path: str, args: Args) -> tuple[list[dict], int]:
    """Trace rows {id, problem, answer, completion, episodes, where, finish_reason} and the
    skipped count. A row's optional "finish_reason" ("stop" or "length", as traces_<model>.jsonl
    writes it; default "stop") says whether its sample was cut at the token limit."""
    rename = {args.problem_field: "problem", args.answer_from or args.answer_field: "answer",
              args.completion_field: "completion"}
    rows, skipped = [], 0
    for line, r in utils.read_records(path, ["problem", "answer", "completion"], rename, with_lines=True):
        where = f"{path}:{line}"
        if not isinstance(r["completion"], str) or not isinstance(r["problem"], str):
            raise utils.UserError(f"{where}: fields {args.problem_field!r} and {args.completion_field!r} must be strings")
        answer = utils.gold_answer(r, "answer", "answer" if args.answer_from else "", where)  # --answer-from: its box
        reason = r.get("finish_reason", "stop")
        if reason not in ("stop", "length"):
            raise utils.UserError(f"{where}: field 'finish_reason' must be 'stop' or 'length', got {reason!r}")
        ep = split_backtrack(r["completion"])
        if ep is None:
            if not args.skip_invalid:
                raise utils.UserError(f"{where}: not a backtrack trace (no marker followed by 'Step k:'; "
                                      f"--skip-invalid skips such rows)")
            skipped += 1
            continue
        rows.append({"id": r.get(args.id_field, line), "problem": r["problem"], "answer": answer,
                     "completion": r["completion"], "episodes": ep, "where": where, "finish_reason": reason,
                     **({"record": r} if args.reward else {})})
    if not rows:
        raise utils.UserError(f"{path}: no backtrack traces")
    return rows, skipped


def sample_traces(sampler: sampling.Sampler, records: list[dict], args: Args) -> tuple[list[dict], int, int]:
    """Backtrack traces from a model, the skipped count and the dropped-z0 count: one attempt
    z0 per problem (sampling.sample_z0: a cut or box-less attempt is resampled, then its problem dropped
    and counted), then `continuations` samples from prompt + z0 + "\\n" + marker + "\\nStep"
    (the RL/STaR context), split by split_continuation. Continuations that do not parse are
    skipped (a model may have none left: main reports it with 0 traces); one cut at
    --max-tokens is kept, and its revised attempt graded 0 (sampling.sample_outcome)."""
    tok = sampler.tokenizer
    problems = [{"id": i, "prompt": utils.build_prompt(tok, r["problem"], args.instruction)}
                for i, r in enumerate(records)]
    z0s, dropped = sampling.sample_z0(sampler, problems, temperature=args.temperature, max_tokens=args.max_tokens,
                             seed_parts=(args.seed, "z0"))
    keep = [(p["id"], p["prompt"], z0s[p["id"]]) for p in problems if p["id"] in z0s]
    conts = sampler.generate([utils.encode(tok, x + backtrack_cue(z0)) for _, x, z0 in keep], n=args.continuations,
                             temperature=args.temperature, max_tokens=args.max_tokens, seed=utils.derive_seed(args.seed, "continuations"),
                             logprobs=False)
    rows, skipped = [], len(dropped)
    for (i, _, z0), group in zip(keep, conts):
        for j, s in enumerate(group):
            completion = backtrack_cue(z0) + s.text
            ep = split_continuation(z0, completion)
            if ep is None:
                skipped += 1
                continue
            rows.append({"id": f"{i}-{j}", "problem": records[i]["problem"], "answer": records[i]["answer"],
                         "completion": completion, "episodes": ep, "where": f"sampled {i}-{j}",
                         "finish_reason": s.finish_reason,
                         **({"record": records[i]["record"]} if "record" in records[i] else {})})
    return rows, skipped, len(dropped)


def check_lengths(mu: sampling.MetaProver, rows: list[dict], args: Args) -> tuple[list[dict], int]:
    """Traces whose longest mu context (prompt + z0 + z1 + z2 + suffix) plus mu's answer fits
    the engine's context length: an error naming file:line, or skipped with --skip-invalid."""
    if mu.sampler.backend != "vllm":
        return rows, 0
    limit = mu.sampler.max_model_len - mu.max_tokens
    tok, kept = mu.sampler.tokenizer, []
    for r in rows:
        n = longest_mu_context(tok, r, args.instruction, mu.suffix)
        if n <= limit:
            kept.append(r)
        elif not args.skip_invalid:
            raise utils.UserError(f"{r['where']}: trace too long for the meta-prover ({n} tokens > {limit} = context "
                                  f"length - mu's tokens (--mu-max-tokens or --mu-rollout-tokens); --skip-invalid skips it)")
    return kept, len(rows) - len(kept)


def score_traces(mu: sampling.MetaProver, rows: list[dict], args: Args, logger: utils.JsonlLogger | None = None,
                 name: str = "") -> list[dict]:
    """J at the four prefixes of every trace, the per-episode gains and the outcomes;
    each batch's mean J values go to <out>/progress.jsonl as it finishes."""
    from tqdm import tqdm

    tok = mu.sampler.tokenizer
    out = []
    for b in tqdm(range(0, len(rows), args.batch), desc="meta-prover", disable=not utils.is_main()):
        chunk = rows[b: b + args.batch]
        prompts = [utils.build_prompt(tok, r["problem"], args.instruction) for r in chunk]
        J = trace_values(mu, prompts, [r["episodes"] for r in chunk], [r["answer"] for r in chunk],
                         seed=utils.derive_seed(args.seed, "meta-prover", b))  # (B, 4)
        for r, j in zip(chunk, J):
            ep = r["episodes"]
            gains = episode_gains(list(j))
            truth = toy.restart_truth(r["problem"], ep.z0, ep.restart_step) or {}  # toy problems only
            out.append({"id": r["id"], "where": r["where"], "restart_step": ep.restart_step,
                        "valid_restart": restart_prefix(ep.z0, ep.restart_step) is not None,
                        "J": [float(v) for v in j], "gains": gains, "backtrack_gain": gains[1],
                        "z0_correct": utils.make_grader(args.reward)(ep.z0, r["answer"], r.get("record")),
                        "z2_correct": sampling.sample_outcome(ep.z2, r["answer"], r.get("finish_reason", "stop"), args.reward,
                                                     r.get("record")),
                        "first_wrong": truth.get("first_wrong"), "restart_class": truth.get("class"),
                        "can_fix": truth.get("can_fix")})
        if logger:
            logger.log({"model": name, "traces_done": len(out), "batch_J_mean": J.mean(0).round(4).tolist()})
    return out


def auc(pos, neg) -> float | None:
    """Probability that a random score of `pos` exceeds a random one of `neg`, ties counting
    one half (the Mann-Whitney AUC); None when either side is empty."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if not pos.size or not neg.size:
        return None
    diff = pos[:, None] - neg[None, :]  # (P, N)
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def discrimination(scored: list[dict]) -> dict | None:
    """Does the backtrack episode's gain tell good restarts from bad ones? On scored traces
    with ground truth (toy problems; None when there are none): per restart class (toy.
    RESTART_CLASSES: the restart step against z0's first wrong step) the count, mean gain,
    share of positive gains and z2 accuracy; and the AUC of the gain ranking restarts that
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
    return {
        "traces": len(scored), "skipped": skipped,
        "J_mean": {name: mean(J[:, i]) for i, name in enumerate(["x", "x_z0", "x_z0_z1", "x_z0_z1_z2"])},
        "gain_mean": {name: mean(J[:, i + 1] - J[:, i]) for i, name in enumerate(["z0", "z1", "z2"])},
        "backtrack_gain_stderr": round(float(g.std(ddof=1) / np.sqrt(len(g))), 4) if len(g) > 1 else None,
        "backtrack_gain_mean_z2_correct": mean(g[ok]), "backtrack_gain_mean_z2_wrong": mean(g[~ok]),
        "backtrack_gain_positive_frac": mean(g > 0),
        "z0_accuracy": mean(np.array([s["z0_correct"] for s in scored])), "z2_accuracy": mean(ok),
        "valid_restart_frac": mean(np.array([s["valid_restart"] for s in scored])),
        "discrimination": discrimination(scored),
    }


def plot_hist(results: dict, path: str, m: int) -> None:
    """Fig. 8 style: the backtrack episode's gain J(x,z0,z1) - J(x,z0), one panel per model
    in a grid of up to 3 columns with shared axes and one legend, revised attempts that end
    correct vs wrong stacked, the mean as a dashed line. Gains are multiples of 1/m."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = (np.arange(-m, m + 2) - 0.5) / m  # one bin per attainable gain value
    ncols = min(3, int(np.ceil(np.sqrt(len(results)))))
    nrows = -(-len(results) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (name, scored) in zip(axes.flat, results.items()):
        g = np.array([s["backtrack_gain"] for s in scored])
        ok = np.array([s["z2_correct"] for s in scored]) > 0
        ax.hist([g[ok], g[~ok]], bins=edges, stacked=True, label=["revised attempt correct", "revised attempt wrong"],
                color=["tab:green", "tab:gray"])
        ax.axvline(g.mean(), color="k", ls="--", lw=1, label="mean gain")
        ax.set_title(f"{name}: {len(g)} traces, mean {g.mean():+.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(results):
            ax.set_visible(False)
        elif i + ncols >= len(results):  # the lowest panel of its column: x labels
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("gain of z1:  J(μ|x,z0,z1) − J(μ|x,z0)", fontsize=8)
    for row in axes:
        row[0].set_ylabel("traces")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / (3.2 * nrows + 0.4), 1, 1))
    with utils.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(args: Args, samplers: dict | None = None) -> dict:
    """Score every model's traces; `samplers` may map a model path to a ready Sampler (tests)."""
    if args.mu_samples < 1 or args.mu_max_tokens < 1 or args.batch < 1 or args.continuations < 1 or args.problems < 0 \
            or args.mu_rollout_tokens < 1:
        raise utils.UserError("--mu-samples, --mu-max-tokens, --mu-rollout-tokens, --batch and --continuations must be "
                              ">= 1, --problems >= 0")
    if args.mu_mode not in sampling.MU_MODES:
        raise utils.UserError(f"--mu-mode must be one of {sampling.MU_MODES}, got {args.mu_mode!r}")
    runs = resolve_models(args)
    if args.traces and len(args.traces) not in (1, len(runs)):
        raise utils.UserError(f"--traces: give one file or one per model ({len(runs)}), got {len(args.traces)}")
    samplers = dict(samplers or {})

    # read every input first: bad input fails before any engine starts or file is written
    traces = {}
    if args.traces:
        for name, path in zip(runs, args.traces * len(runs) if len(args.traces) == 1 else args.traces):
            traces[name] = read_traces(path, args)
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    problems = None
    if not args.traces:
        if not args.data:
            toy.ensure_built(args.toy_dir)
        problems = utils.load_problems(args.data or toy.paths(args.toy_dir)["test"], args.problem_field,
                                       args.answer_field, args.problems, answer_from=args.answer_from,
                                       keep_record=bool(args.reward))
    if args.mu_model and not os.path.isdir(args.mu_model) and not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", args.mu_model):
        raise utils.UserError(f"--mu-model: model path does not exist: {args.mu_model}")
    given = [r for rows, _ in traces.values() for r in rows]
    instructions = {name: utils.stage_instruction(args.instruction, path) for name, path in runs.items()}

    def new_sampler(path, names):  # an engine sized from the lengths of these runs (--max-model-len overrides)
        if path in samplers:
            return samplers[path]
        need = max(engine_need(path, replace(args, instruction=instructions[n]), problems, given) for n in names)
        max_len = args.max_model_len or sampling.engine_length(path, need)
        return sampling.make_sampler(path, seed=args.seed, dtype=args.dtype, max_model_len=max_len)

    shared_mu = new_sampler(args.mu_model, runs) if args.mu_model else None

    results, summary, z0_dropped = {}, {}, {}
    logger = utils.JsonlLogger(os.path.join(args.out, "progress.jsonl"))
    for name, path in runs.items():
        args = replace(args, instruction=instructions[name])  # this model's prompt
        sampler = None
        if name not in traces:
            sampler = new_sampler(path, [name])
            utils.print0(f"{name}: sampling backtrack traces on {len(problems)} problems")
            rows, skipped, z0_dropped[name] = sample_traces(sampler, problems, args)
            traces[name] = rows, skipped
            utils.print0(f"{name}: {z0_dropped[name]} problems dropped: no usable attempt z0 in {sampling.Z0_TRIES} tries "
                         f"(cut at --max-tokens or no box)")
            keys = ("id", "problem", "answer", "completion", "finish_reason")
            utils.write_jsonl(os.path.join(args.out, f"traces_{name}.jsonl"), [{k: r[k] for k in keys} for r in rows])
        rows, skipped = traces[name]
        if not rows:  # sampled, and every attempt or continuation was cut or unparsable
            utils.print0(f"{name}: no backtrack trace among its samples ({skipped} skipped); reported with 0 traces")
            summary[name] = summarize([], skipped)
            if name in z0_dropped:
                summary[name]["z0_dropped"] = z0_dropped[name]
            del sampler
            gc.collect()
            continue
        mu_sampler = shared_mu or sampler or new_sampler(path, [name])
        mu = sampling.MetaProver(mu_sampler, args.mu_suffix, args.mu_samples, args.mu_temperature, args.mu_max_tokens,
                        mode=args.mu_mode, rollout_tokens=args.mu_rollout_tokens, reward=args.reward)
        rows, too_long = check_lengths(mu, rows, args)
        skipped += too_long
        if not rows:
            raise utils.UserError(f"{name}: no trace fits the meta-prover's context length")
        utils.print0(f"{name}: {len(rows)} traces ({skipped} skipped), J from {args.mu_samples} mu answers per context")
        results[name] = score_traces(mu, rows, args, logger, name)
        summary[name] = summarize(results[name], skipped)
        if name in z0_dropped:
            summary[name]["z0_dropped"] = z0_dropped[name]
        utils.print0(f"{name}: " + json.dumps({k: summary[name][k] for k in ("J_mean", "gain_mean", "z2_accuracy")}))
        del mu, mu_sampler, sampler  # one engine per model at a time (the shared mu stays)
        gc.collect()

    if not results:
        raise utils.UserError("no model produced a backtrack trace (every attempt or continuation was cut or unparsable)")
    utils.write_jsonl(os.path.join(args.out, "gains.jsonl"),
                      [{"model": name, **s} for name, scored in results.items() for s in scored])
    settings = {**vars(args), "model": runs, "instruction": instructions}
    report = {"settings": settings, "models": summary}
    utils.write_json(os.path.join(args.out, "summary.json"), report)
    plot_hist(results, os.path.join(args.out, "infogain_hist.png"), args.mu_samples)
    utils.print0(f"wrote {args.out}/gains.jsonl, summary.json, infogain_hist.png")
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
