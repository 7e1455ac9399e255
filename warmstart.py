"""warmstart.py: backtrack traces by beam search, then warmstart SFT (MRT paper Sec. 6.2, Fig. 5, 6).

For each training problem x (gold answer y):
  search   beam search over solution steps with no process reward model. A node is a solution
           prefix ending at a step boundary (--step-delimiter); its value V(node) is the success
           rate of M rollouts to the end from it (sampling.MetaProver with suffix "": mu
           completes the solution; the M rollouts are one request sharing the node's prefill).
           Each kept node is expanded with b sampled next steps (generation stops at the
           delimiter); the children are scored (a complete child by its 0/1 grade) and the best
           B by value are kept, through depth D or until every kept node is complete. A few
           plain attempts of the model (--attempts) are sampled next to the tree.
  traces   the paper's "Backtrack" scheme: an incorrect attempt z0 (a wrong complete leaf or a
           wrong plain attempt), the restart node u on z0's path (see Decisions) from which the
           tree holds a correct leaf L whose next step differs from z0's, and the trace
               z0 + "\\n" + MARKER + "\\n" + (L's text after u)      ("Step k: ...", k = depth(u) + 1)
           (steps 1..k-1 of z0 stand, step k is redone, z2 is L's correct completion from u),
           parsed back into z0, z1 (marker through the restart line), z2 by infogain.split_backtrack.
  sft      fine-tune on (prompt, trace) pairs, loss on the completion tokens only (EOS included),
           FSDP2 under torchrun; loss and tokens seen per step go to <out>/log.jsonl (Fig. 6).

The comparison schemes of Fig. 6 (--scheme): `rise` stitches the incorrect attempt to an
unrelated correct solution from the start (restart at Step 1, as RISE's self-correction);
`rejection` keeps correct direct solutions only (rejection-sampling SFT).
The three loss curves are not like for like: by default `backtrack` and `rise` put z0 in the
prompt and take the loss on z1 + z2 only (--z0-loss: on the whole trace), while `rejection`
takes it on a whole solution. Backtrack's z2 continues a solution whose steps 1..k-1 stand in
z0, so each of its tokens has more context before it than in a whole solution. Each log line
names what its loss is taken on (`loss_on`, shown in the --plot legend; sft_loss_target).

Run (the toy task and base model are the default; a few minutes on 2 CPU cores):
    python warmstart.py                                   # Backtrack scheme -> runs/warmstart/
    python warmstart.py --scheme rise --search-from runs/warmstart/search.jsonl       # same tree
    python warmstart.py --scheme rejection --search-from runs/warmstart/search.jsonl
    python warmstart.py --plot runs/warmstart/log.jsonl runs/warmstart-rise/log.jsonl \\
        runs/warmstart-rejection/log.jsonl              # Fig. 6: loss vs tokens, three schemes
    torchrun --nproc_per_node 2 warmstart.py             # 2 ranks: problems and batches split
    torchrun --nproc_per_node 8 warmstart.py --model meta-llama/Llama-3.1-8B-Instruct \\
        --data numina.jsonl --preset paper --gradient-checkpointing     # Table 1, 8 GPUs
    python warmstart.py --resume                         # reuse <out>/search.jsonl, resume SFT

Outputs in <out> (default runs/warmstart, runs/warmstart-<scheme> for the other schemes):
search.jsonl (every tree: nodes with text, depth, value, completeness, grade; the plain
attempts), traces.jsonl (problem, answer, prompt, z0, restart_step, z1, z2, completion, the
values of z0's prefix nodes, the restart value, z0's source), log.jsonl (per SFT step: loss,
tokens, lr, grad norm), checkpoint/ (sharded), summary.json (search and trace counts), model/
with mrt.json ("format": "backtrack" for backtrack/rise, "direct" for rejection).

Decisions (the paper publishes no code for this stage):
- The restart node is the highest-value node on z0's path with a correct leaf branching off
  z0 right after it; ties go to the deepest, so the restart redoes as few steps as the values
  allow. On the toy task the values grow along a correct prefix, so this is usually the step
  where z0 slipped.
- Restarts need step labels: the trace names "Step k:", so a restart is used only when z0
  and L carry "Step k:" at the branching point (the toy always does; for real models ask for
  labeled steps in --instruction). Unlabeled candidates are skipped.
- Up to --traces-per-problem traces per problem, z0 drawn (seeded) from distinct wrong
  leaves and wrong attempts; `rise` uses the same z0s, `rejection` the same number of
  distinct correct solutions, so the three schemes see the same problems.
- LR schedule: linear warmup (--warmup-ratio), then cosine to 0. Table 1 gives lr, epochs,
  batch, length, dtype and warmup; the schedule shape, weight decay and beam sizes of the
  paper preset are assumptions.
- SFT loss: token mean over the completion tokens of the whole optimizer batch (all ranks and
  accumulation steps). Each epoch is a fresh seeded permutation, wrapped around to a multiple
  of the batch size, so every rank runs the same number of micro-batches.
- --direct-mix p (not in the paper; 0 by default): each trace brings, with probability p, one
  correct direct solution of the same problem from the same search into the SFT set (kind
  "direct" in traces.jsonl). Traces alone teach "always backtrack"; the mix keeps some plain
  solving. Only the model's own searched solutions are used, never the gold steps.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

# One OpenMP thread unless told otherwise: the vLLM engine and the trainer share this process,
# and OpenMP spin-waits slow both on a shared CPU (as in grpo.py). Must precede `import torch`.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import sampling  # noqa: E402
import toy  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from infogain import restart_prefix, split_continuation  # noqa: E402

SCHEMES = {"backtrack": "backtrack", "rise": "backtrack", "rejection": "direct"}  # scheme -> model format

PRESETS = {
    # toy: runs with no arguments on 2 CPU cores in a few minutes; lr 1e-4 as star.py's toy
    # preset (at 1e-3, SFT on the rejection scheme's correct solutions collapsed the toy base)
    "toy": dict(problems=96, beam_width=2, expansions=4, rollouts=4, max_depth=8, step_delimiter="\\n",
                max_step_tokens=24, max_tokens=160, attempts=4, traces_per_problem=2, direct_mix=0.0,
                search_batch=48, lr=1e-4, epochs=3, batch_size=16, micro_batch_size=8, max_length=512,
                warmup_ratio=0.1, weight_decay=0.0, save_every=20),
    # paper: Table 1 (lr 1e-6, 3 epochs, batch 256, max length 4096, bf16, warmup 0.1); search sizes assumed
    "paper": dict(problems=0, beam_width=4, expansions=4, rollouts=8, max_depth=24, step_delimiter="\\n\\n",
                  max_step_tokens=512, max_tokens=4096, attempts=4, traces_per_problem=1, direct_mix=0.0,
                  search_batch=64, lr=1e-6, epochs=3, batch_size=256, micro_batch_size=4, max_length=4096,
                  warmup_ratio=0.1, weight_decay=0.0, save_every=50),
}


@dataclass
class Args(utils.DataArgs, training.TrainerArgs):
    """This stage's own flags; the bases add those every stage spells alike (--help lists all)."""
    scheme: str = "backtrack"
    """backtrack | rise | rejection: how traces are built from the search (Fig. 6)"""
    preset: str = "auto"
    """toy | paper | auto (toy when --model is empty, else paper): defaults of the None fields"""
    model: str = ""
    """model to search with and fine-tune ('' : the toy base, built if missing)"""
    data: str = ""
    """training problems: .jsonl, .parquet or a hub dataset org/name[:split] ('' : the toy train split)"""
    out: str = ""
    """run folder ('' : runs/warmstart for backtrack, runs/warmstart-<scheme> otherwise)"""
    search_from: str = ""
    """reuse the trees of this search.jsonl instead of searching (e.g. for another scheme)"""
    resume: bool = False
    """reuse <out>/search.jsonl if present and continue SFT from <out>/checkpoint/"""
    seed: int = 0
    """seeds sampling, trace choice, data order and initialisation"""
    plot: list[str] = field(default_factory=list)
    """plot only: SFT log.jsonl files of several runs -> Fig. 6 (loss vs tokens) at --plot-out"""
    plot_out: str = "runs/warmstart/fig6_loss.png"
    """where --plot writes the figure"""
    # search
    problems: int | None = None
    """training problems to search, 0: all (toy preset 96; paper preset 0)"""
    beam_width: int | None = None
    """B: nodes kept per depth (toy preset 2; paper preset 4)"""
    expansions: int | None = None
    """b: next steps sampled per kept node (toy preset 4; paper preset 4)"""
    rollouts: int | None = None
    """M: rollouts to the end that estimate a node's value (toy preset 4; paper preset 8)"""
    max_depth: int | None = None
    """D: most steps a solution may have (toy preset 8; paper preset 24)"""
    step_delimiter: str | None = None
    """text that ends a step, escapes such as \\n are read (toy preset \\n; paper preset \\n\\n)"""
    max_step_tokens: int | None = None
    """token limit of one sampled step, longer steps are dropped (toy preset 24; paper preset 512)"""
    max_tokens: int | None = None
    """token limit of a rollout and of a plain attempt (toy preset 160; paper preset 4096)"""
    temperature: float = 1.0
    """sampling temperature of steps, rollouts and attempts"""
    attempts: int | None = None
    """plain attempts per problem: z0 candidates, and the single-sample baseline of the search
    (toy preset 4; paper preset 4)"""
    traces_per_problem: int | None = None
    """most traces built from one problem's tree (toy preset 2; paper preset 1)"""
    direct_mix: float | None = None
    """backtrack/rise: per trace, the chance that a correct direct solution of the same search (the
    rejection scheme's data) joins the SFT set; 0: traces only, as the paper (toy preset 0; paper preset 0)"""
    search_batch: int | None = None
    """problems searched together, the progress granularity (toy preset 48; paper preset 64)"""
    # SFT
    lr: float | None = None
    """peak learning rate of AdamW (toy preset 1e-4; paper preset 1e-6)"""
    epochs: int | None = None
    """passes over the traces (toy preset 3; paper preset 3)"""
    batch_size: int | None = None
    """sequences per optimizer step, over all ranks (toy preset 16; paper preset 256)"""
    micro_batch_size: int | None = None
    """sequences per forward/backward on one rank (toy preset 8; paper preset 4)"""
    max_length: int | None = None
    """prompt + completion tokens, longer completions are cut (toy preset 512; paper preset 4096)"""
    warmup_ratio: float | None = None
    """fraction of optimizer steps in linear warmup (toy preset 0.1; paper preset 0.1)"""
    weight_decay: float | None = None
    """AdamW weight decay (toy preset 0; paper preset 0)"""
    save_every: int | None = None
    """SFT checkpoint every N optimizer steps and at the end (toy preset 20; paper preset 50)"""
    z0_loss: bool = False
    """also train on the (wrong) attempt z0; default: z0 is context, loss on z1 + z2 only"""


RESUME_FREE = training.RESUME_FREE + ("search_from", "plot", "plot_out", "epochs")  # --epochs: train more


def resolve_args(args: Args, world: int = 1) -> Args:
    """Fill the None fields from the preset, check them, derive sizes."""
    utils.check_flags(args, {"scheme": sorted(SCHEMES), "preset": ("toy", "paper", "auto")})
    preset = args.preset if args.preset != "auto" else ("toy" if not args.model else "paper")
    fill = {k: v for k, v in PRESETS[preset].items() if getattr(args, k) is None}
    args = dataclasses.replace(args, preset=preset, **fill)
    if "\\" in args.step_delimiter:
        args.step_delimiter = codecs.decode(args.step_delimiter, "unicode_escape")
    training.check_sft_args(args, world)
    utils.check_flags(args, at_least=dict.fromkeys(("beam_width", "expansions", "rollouts", "max_depth",
                                                    "max_step_tokens", "max_tokens", "attempts",
                                                    "traces_per_problem", "search_batch"), 1))
    if not 0 <= args.direct_mix <= 1:
        raise utils.UserError(f"--direct-mix must be in [0, 1], got {args.direct_mix}")
    if args.problems < 0 or not args.step_delimiter:
        raise utils.UserError("--problems must be >= 0 and --step-delimiter non-empty")
    return args


# ---- Beam search with rollout value estimates (Sec. 6.2: no PRM, values from the 0/1 outcome) ----


@dataclass
class Node:
    """A solution prefix in one problem's search tree."""

    id: int
    parent: int
    """id of the parent node (-1 for the root)"""
    depth: int
    """steps in the prefix (the root, the empty prefix, has 0)"""
    text: str
    """the solution so far (after the prompt); ends with the step delimiter unless complete"""
    value: float | None = None
    """success rate of M rollouts from the node (a complete node: its 0/1 grade)"""
    complete: bool = False
    """the model ended the solution here (EOS or a boxed answer)"""
    correct: bool = False
    """complete and graded correct"""
    kept: bool = False
    """kept in the beam at its depth"""


def beam_search(sampler: sampling.Sampler, prompts: list[str], golds: list[str], args: Args, seed: int,
                records: list | None = None) -> list[list[Node]]:
    """One tree per problem, searched together: per depth, one generate call expands every kept
    node of every problem and one meta-prover call values every new non-terminal child. Graded
    by utils.make_grader(args.reward) (a custom reward gets the problem's entry of `records`)."""
    tok, delim = sampler.tokenizer, args.step_delimiter
    grade, records = utils.make_grader(args.reward), records or [None] * len(prompts)
    mu = sampling.MetaProver(sampler, suffix="", m=args.rollouts, temperature=args.temperature,
                             max_tokens=args.max_tokens, reward=args.reward)
    trees = [[Node(0, -1, 0, "", kept=True)] for _ in prompts]
    for tree, v in zip(trees, mu.success_rates(prompts, golds, seed=seed)):
        tree[0].value = float(v)
    frontier = [[0] for _ in prompts]  # kept, incomplete nodes to expand
    for depth in range(1, args.max_depth + 1):
        todo = [(i, nid) for i, f in enumerate(frontier) for nid in f]
        if not utils.any_rank(bool(todo)):
            break
        # ---- expand: b next steps per kept node, generation stops at the delimiter ----------
        outs = sampler.generate([utils.encode(tok, prompts[i] + trees[i][nid].text) for i, nid in todo],
                                n=args.expansions, temperature=args.temperature,
                                max_tokens=args.max_step_tokens, stop=[delim],
                                seed=utils.derive_seed(seed, "expand", depth), logprobs=False)
        children: list[list[int]] = [[] for _ in prompts]
        for (i, nid), group in zip(todo, outs):
            seen = {n.text for n in trees[i]}
            for s in group:
                ended = bool(s.token_ids) and s.token_ids[-1] == tok.eos_token_id
                complete = ended or utils.extract_boxed(s.text) is not None
                if s.finish_reason == "length" or (not complete and not s.text.strip()):
                    continue  # a step that does not end, or an empty one
                text = trees[i][nid].text + (s.text.rstrip() if complete else s.text + delim)
                if text in seen:
                    continue
                seen.add(text)
                node = Node(len(trees[i]), nid, depth, text, complete=complete)
                if complete:
                    node.correct = grade(text, golds[i], records[i]) == 1.0
                    node.value = float(node.correct)
                trees[i].append(node)
                children[i].append(node.id)
        # ---- value: M rollouts to the end from every new incomplete child --------------------
        pending = [(i, c) for i in range(len(prompts)) for c in children[i] if not trees[i][c].complete]
        values = mu.success_rates([prompts[i] + trees[i][c].text for i, c in pending],
                                  [golds[i] for i, _ in pending],
                                  seed=utils.derive_seed(seed, "value", depth))
        for (i, c), v in zip(pending, values):
            trees[i][c].value = float(v)
        # ---- select: the best B children of each problem by value (stable: earlier on ties) --
        for i in range(len(prompts)):
            best = sorted(children[i], key=lambda c: -trees[i][c].value)[: args.beam_width]
            for c in best:
                trees[i][c].kept = True
            frontier[i] = [c for c in best if not trees[i][c].complete]
    return trees


def graded_attempts(sampler: sampling.Sampler, prompts: list[str], golds: list[str], args: Args, seed: int,
                    records: list | None = None) -> list[list[dict]]:
    """--attempts plain attempts per problem (sampling.sample_attempts), graded (as beam_search's nodes)."""
    grade, records = utils.make_grader(args.reward), records or [None] * len(prompts)
    outs = sampling.sample_attempts(sampler, prompts, args.attempts, temperature=args.temperature,
                                    max_tokens=args.max_tokens, seed=seed)
    return [[{"text": s.text.rstrip(), "correct": grade(s.text, g, r) == 1.0,
              "complete": s.finish_reason == "stop" and utils.extract_boxed(s.text) is not None}
             for s in group] for group, g, r in zip(outs, golds, records)]


# ---- Traces from the tree: Backtrack, RISE, rejection (pure functions of the search record) ----


def first_step(text: str, delim: str) -> str:
    return text.split(delim, 1)[0]


def best_restart(z0: str, nodes: list[Node], delim: str) -> tuple[Node, Node] | None:
    """(u, L): u the highest-value node on z0's path (ties: the deepest) with a correct leaf L
    whose step after u differs from z0's and whose text names "Step k:" (k = depth(u) + 1)
    right where z0 does. None when the tree holds no such pair."""
    leaves = [n for n in nodes if n.complete and n.correct]
    best = None
    for u in nodes:
        if (u.complete or u.value is None or not z0.startswith(u.text)
                or restart_prefix(z0, u.depth + 1) != u.text):
            continue
        z0_step, label = first_step(z0[len(u.text):], delim), f"Step {u.depth + 1}:"
        for leaf in leaves:
            rest = leaf.text[len(u.text):]
            if leaf.text.startswith(u.text) and rest.startswith(label) and first_step(rest, delim) != z0_step:
                if best is None or (u.value, u.depth) > (best[0].value, best[0].depth):
                    best = (u, leaf)
                break
    return best


def build_traces(record: dict, scheme: str, k: int, delim: str, seed: int, reward: str = "") -> list[dict]:
    """Up to k traces of one problem's search record {problem, answer, nodes, attempts}; a
    joined trace's z2 is graded by utils.make_grader(reward) (a custom one gets the record's
    "record", the data file's record, when the search kept it)."""
    nodes = [n if isinstance(n, Node) else Node(**n) for n in record["nodes"]]
    rng = random.Random(seed)
    correct = list(dict.fromkeys([n.text for n in nodes if n.complete and n.correct] +
                                 [a["text"] for a in record["attempts"] if a["correct"]]))
    base = {"problem": record["problem"], "answer": record["answer"], "root_value": nodes[0].value}
    if scheme == "rejection":
        return [{**base, "completion": c, "source": "search"}
                for c in rng.sample(correct, min(k, len(correct)))]
    wrong = list(dict.fromkeys([n.text for n in nodes if n.complete and not n.correct] +
                               [a["text"] for a in record["attempts"] if a["complete"] and not a["correct"]]))
    leaves = {n.text for n in nodes if n.complete}
    rng.shuffle(wrong)
    traces = []
    for z0 in wrong:
        if len(traces) == k:
            break
        if scheme == "rise":  # an unrelated correct solution, restarted from Step 1
            pool = [c for c in correct if c.startswith("Step 1:")]
            if not pool or not z0.startswith("Step 1:"):
                continue
            u_value, rest = nodes[0].value, rng.choice(pool)
        else:
            pair = best_restart(z0, nodes, delim)
            if pair is None:
                continue
            u, leaf = pair
            u_value, rest = u.value, leaf.text[len(u.text):]
        completion = z0 + "\n" + utils.BACKTRACK_MARKER + "\n" + rest
        ep = split_continuation(z0, completion)
        if ep is None or utils.make_grader(reward)(ep.z2, record["answer"], record.get("record")) != 1.0:
            continue  # not a backtrack trace once joined (a real model's last step can hold its box)
        path = [(n.depth, n.value) for n in nodes if not n.complete and n.value is not None
                and z0.startswith(n.text) and restart_prefix(z0, n.depth + 1) == n.text]
        traces.append({**base, "z0": ep.z0, "restart_step": ep.restart_step, "z1": ep.z1, "z2": ep.z2,
                       "completion": completion, "restart_value": u_value,
                       "prefix_values": [v for _, v in sorted(path)],
                       "source": "tree" if z0 in leaves else "attempt"})
    return traces


def direct_mixin(record: dict, n_traces: int, mix: float, delim: str, seed: int) -> list[dict]:
    """Correct direct solutions of one problem to train on next to its n_traces traces: each
    trace brings one with probability `mix`, drawn without repeats from the search's correct
    solutions (those of the rejection scheme); marked kind "direct"."""
    rng = random.Random(f"direct-mix {seed}")  # not the stream build_traces draws from with `seed`
    n = sum(rng.random() < mix for _ in range(n_traces))
    return [{**d, "kind": "direct"} for d in build_traces(record, "rejection", n, delim, seed)] if n else []


# ---- Fig. 6: training loss against tokens for the three schemes ----------------------


def plot_losses(logs: list[str], path: str) -> None:
    """One curve per SFT log (label: its scheme, else its folder, and what its loss is taken
    on when the log says), loss vs completion tokens."""
    runs = {}
    for log in logs:
        recs = utils.read_records(log, ["step", "loss", "tokens"])
        label = recs[0].get("scheme") or os.path.basename(os.path.dirname(os.path.abspath(log)))
        label += f" (loss on {recs[0]['loss_on']})" if recs[0].get("loss_on") else ""
        runs[f"{label} ({log})" if label in runs else label] = recs
    fig, ax = utils.pyplot().subplots(figsize=(6, 4))
    for label, recs in runs.items():
        ax.plot([r["tokens"] for r in recs], [r["loss"] for r in recs], label=label)
    ax.set_xlabel("training tokens (completion tokens seen)")
    ax.set_ylabel("training loss (token mean)")
    ax.set_yscale("log")
    ax.set_title("Warmstart SFT: loss vs tokens by trace scheme (Fig. 6)")
    ax.legend()
    utils.save_png(fig, path)
    utils.print0(f"wrote {path}")


# ---- Main: search -> traces -> SFT ---------------------------------------------------


def sft_loss_target(scheme: str, z0_loss: bool, direct_mix: float = 0.0) -> str:
    """What a scheme's SFT loss is taken on (the `loss_on` field of log.jsonl, the Fig. 6
    legend): rejection a whole solution; backtrack / rise z1 + z2 with z0 in the prompt, or
    the whole trace with --z0-loss; plus the mixed-in direct solutions of --direct-mix."""
    if scheme == "rejection":
        return "whole solution"
    target = "z0+z1+z2" if z0_loss else "z1+z2, z0 in prompt"
    return target + (f", {direct_mix:g} direct mix" if direct_mix > 0 else "")


def search_need(args: Args, prompt_tokens: int) -> int:
    """Tokens one engine sequence may hold in the search: the prompt, a node of up to
    --max-depth steps of --max-step-tokens (and 2 per step for its delimiter), then a rollout
    or an attempt of --max-tokens (16 more: node text is re-encoded, and may take a few more
    tokens than were sampled)."""
    longest_tail = max(args.max_tokens, args.max_step_tokens)
    return prompt_tokens + args.max_depth * (args.max_step_tokens + 2) + longest_tail + 16


ENGINES: list = []
"""The search engines this process built: referenced for its whole life. Freeing one would
end vLLM's process-wide state and, under torchrun, the process group with it (vLLM's shutdown
calls cleanup_dist_env_and_memory), so that SFT would run unsharded on every rank."""


def search_engine(args: Args, model_path: str, problems: list[dict], seed: int) -> sampling.Sampler:
    """The search's vLLM engine (or transformers sampler), sized from the run's lengths, with
    --sleep-mode; kept in ENGINES when built here (a ready one, sampling.READY, is not)."""
    tok = utils.load_tokenizer(model_path)
    longest = max(len(utils.encode(tok, utils.build_prompt(tok, p["problem"], args.instruction)))
                  for p in problems)
    sampler = sampling.engine(model_path, seed=seed, dtype=args.dtype, sleep_mode=args.sleep_mode,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              max_model_len=sampling.engine_length(model_path, search_need(args, longest)))
    if model_path not in sampling.READY:
        ENGINES.append(sampler)
    return sampler


def search(args: Args, model_path: str, problems: list[dict], seed: int,
           sampler: sampling.Sampler) -> list[dict]:
    """Trees and plain attempts for every problem: problems split over ranks, gathered on all."""
    from tqdm import tqdm

    rank, world = utils.rank(), utils.world_size()
    tok = sampler.tokenizer
    mine = problems[rank::world]
    n_batches = math.ceil(len(problems) / (world * args.search_batch))  # the same on every rank
    records = []
    for b in tqdm(range(n_batches), desc="beam search", disable=not utils.is_main()):
        chunk = mine[b * args.search_batch:(b + 1) * args.search_batch]
        prompts = [utils.build_prompt(tok, p["problem"], args.instruction) for p in chunk]
        golds = [p["answer"] for p in chunk]
        s = utils.derive_seed(seed, "search", b * world + rank)
        own = [p.get("record") for p in chunk]
        trees = beam_search(sampler, prompts, golds, args, s, own)
        attempts = graded_attempts(sampler, prompts, golds, args, utils.derive_seed(s, "attempts"), own)
        records += [{**p, "prompt": pr, "nodes": [dataclasses.asdict(n) for n in t], "attempts": a}
                    for p, pr, t, a in zip(chunk, prompts, trees, attempts)]
    merged = [r for part in utils.all_gather(records) for r in part]
    order = {p["problem"]: i for i, p in enumerate(problems)}
    return sorted(merged, key=lambda r: order[r["problem"]])


def search_summary(records: list[dict]) -> dict:
    """What the search found against the plain attempts."""
    found = np.array([any(n["correct"] for n in r["nodes"]) for r in records])
    att = np.array([[a["correct"] for a in r["attempts"]] for r in records], dtype=float)  # (N, attempts)
    missed = att.sum(1) == 0  # (N,) problems no plain attempt solved
    return {"problems": len(records), "nodes_mean": float(np.mean([len(r["nodes"]) for r in records])),
            "search_solved": float(found.mean()), "attempt_pass@1": float(att.mean()),
            f"attempt_pass@{att.shape[1]}": float((att.sum(1) > 0).mean()),
            "search_solved_where_attempts_missed": float(found[missed].mean()) if missed.any() else None,
            "root_value_mean": float(np.mean([r["nodes"][0]["value"] for r in records]))}


def main(args: Args) -> dict:
    """Search, build traces, fine-tune; returns the summary. A ready engine on the model
    (sampling.READY) is left holding its weights, awake. An engine built here stays referenced
    for the process's life (ENGINES) and sleeps through SFT (--sleep-mode)."""
    if args.plot:
        plot_losses(args.plot, args.plot_out)
        return {"plot": args.plot_out}
    rank, world, _ = utils.init_distributed()
    args = resolve_args(args, world)
    out = args.out or ("runs/warmstart" if args.scheme == "backtrack" else f"runs/warmstart-{args.scheme}")
    model_path, data_path = args.model, args.data
    if not model_path or not data_path:
        paths = toy.ensure_built()
        model_path, data_path = model_path or paths["base"], data_path or paths["train"]
    args = dataclasses.replace(args, instruction=utils.stage_instruction(args.instruction, model_path))
    ckpt = os.path.join(out, "checkpoint")
    if args.resume and training.has_checkpoint(ckpt):  # before the search reruns
        training.check_resume_args(ckpt, args, RESUME_FREE)
    problems = utils.load_problems(data_path, args.problem_field, args.answer_field, args.problems,
                                   answer_from=args.answer_from, keep_record=bool(args.reward))
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    if args.search_from and not os.path.isfile(args.search_from):
        raise utils.UserError(f"--search-from: no such file: {args.search_from}")
    utils.seed_everything(args.seed)
    utils.print0(f"warmstart: scheme {args.scheme}, preset {args.preset}, model {model_path}, "
                 f"{len(problems)} problems, B={args.beam_width} b={args.expansions} M={args.rollouts} "
                 f"D={args.max_depth}, world {world}")

    # ---- search: trees with rollout values, plain attempts ---------------------------------
    search_path = os.path.join(out, "search.jsonl")
    t0, engine = time.time(), None
    if args.search_from or (args.resume and os.path.exists(search_path)):
        src = args.search_from or search_path
        records = utils.read_records(src, ["problem", "answer", "nodes", "attempts"])
        utils.print0(f"reusing the search of {src} ({len(records)} problems)")
    else:
        engine = search_engine(args, model_path, problems, args.seed)
        records = search(args, model_path, problems, args.seed, engine)
        if utils.is_main():
            utils.write_jsonl(search_path, records)
    summary = {"search": search_summary(records), "search_seconds": round(time.time() - t0, 1)}
    if engine is not None:
        summary["search_engine"] = {"backend": engine.backend, "sleep_mode": engine.sleep_mode}
    utils.print0("search: " + json.dumps(summary["search"]))

    # ---- traces ----------------------------------------------------------------------------
    traces, mixed = [], []
    for i, r in enumerate(records):
        seed = utils.derive_seed(args.seed, "traces", i)
        own = build_traces(r, args.scheme, args.traces_per_problem, args.step_delimiter, seed, args.reward)
        traces += own
        if args.scheme != "rejection" and args.direct_mix > 0:
            mixed += direct_mixin(r, len(own), args.direct_mix, args.step_delimiter, seed)
    if not traces:
        raise utils.UserError(f"the search built no {args.scheme} trace (no problem had both a wrong and a "
                              f"correct solution); search more problems or widen the beam")
    tok = utils.load_tokenizer(model_path)
    traces += mixed
    for t in traces:
        t["prompt"] = utils.build_prompt(tok, t["problem"], args.instruction)
    if utils.is_main():
        utils.write_jsonl(os.path.join(out, "traces.jsonl"), traces)
    steps = [t["restart_step"] for t in traces if "restart_step" in t]
    values = [t["restart_value"] for t in traces if "restart_value" in t]
    summary["traces"] = {"count": len(traces) - len(mixed), "direct_mixed": len(mixed),
                         "problems": len({t["problem"] for t in traces}),
                         "from_tree": sum(t["source"] == "tree" for t in traces),
                         "restart_step_mean": float(np.mean(steps)) if steps else None,
                         "restart_value_mean": float(np.mean(values)) if steps else None}
    utils.print0("traces: " + json.dumps(summary["traces"]))

    # ---- SFT on (prompt, trace) ------------------------------------------------------------
    card = {"stage": "warmstart", "variant": args.scheme, "format": SCHEMES[args.scheme], "base": model_path,
            "base_build": toy.built_fingerprint(model_path), "args": dataclasses.asdict(args)}
    t0 = time.time()
    for engine in ENGINES:  # the search engine (if any) sleeps through SFT; it stays referenced
        engine.sleep()
    summary["sft_world"] = utils.world_size()  # the trainer's ranks: FSDP2 shards over them
    loss_on = sft_loss_target(args.scheme, args.z0_loss, args.direct_mix)
    model = training.sft(model_path, [training.sft_example(t, args.z0_loss) for t in traces], args,
                         model_dir=os.path.join(out, "model"), log_path=os.path.join(out, "log.jsonl"),
                         ckpt_path=ckpt, card=card, resume=args.resume, report_to=args.report_to,
                         log_extra={"scheme": args.scheme, "loss_on": loss_on})
    del model
    summary["sft_seconds"] = round(time.time() - t0, 1)
    if utils.is_main():
        utils.write_json(os.path.join(out, "summary.json"), summary)
    utils.print0(f"wrote {out}/model (format {SCHEMES[args.scheme]}), traces.jsonl, log.jsonl, summary.json")
    return summary


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
