"""toy.py: the embedded default task and base model for every mrt stage.

The task: multi-step arithmetic in the paper's solution format. A problem is a start value
and 3-5 operations; the solution computes one operation per step and boxes the result:

    Problem: Start with 17. Add 5. Multiply by 2. Subtract 8. What is the result?
    Solution:
    Step 1: 17 + 5 = 22
    Step 2: 22 * 2 = 44
    Step 3: 44 - 8 = 36
    The answer is \\boxed{36}

The base model is a tiny Llama (head_dim 64, so vLLM's CPU attention accepts it) with a
byte-level BPE tokenizer trained here, pretrained here on CPU. It must be imperfect in the
way MRT needs: a wrong step is a real, random mistake that a second attempt, or a restart
from the step before it, can fix. To get that on purpose rather than by luck, the
pretraining solutions carry slips: each step's result is wrong with probability
`--slip`, and the chain goes on from the wrong value, as a careless human solution would.
The model therefore learns a per-step error rate; pass@1 falls with the number of steps
and pass@k rises with k.

A second kind of pretraining example teaches the meta-prover (mu) used by infogain.py:
a solution prefix cut after any step, then `utils.MU_SUFFIX` ("Time is up. The answer is
\\boxed{"), then the true answer. Only the answer tokens carry loss, so the model never
learns to emit the suffix on its own, but can answer from a partial solution when forced.
The backtrack marker (`utils.BACKTRACK_MARKER`) never appears in a pretraining solution: the
base model has never seen it after an attempt, as in the paper. A real base model does know
the words, though, so a small share of pretraining documents (`--note-frac`) are stand-alone
notes holding the phrase ("Note: Wait, this seems off. Let's try something else."), with no
problem or solution around them. Without them the phrase's tokens stay untrained and a short
warmstart SFT cannot even spell the marker (README, "The toy task", has the measurements).
A third kind (`--retry-frac`, 30%) is a revision, as worked solutions in a real pretraining
corpus have them: a slipped attempt, a line such as "Wait, let me check that.", then the
attempt redone from a random `Step k:` on the attempt's own value after step k-1. It never
holds the marker and never picks k well (k is uniform), so where to restart is still left to
warmstart and RL; without it the toy could not write a revised attempt after the backtrack
cue at all (it found the k-th operation only by following the line above).
A fourth kind (`--recall-frac`, 20%) is a recall: a slipped attempt, the line "Recall:", then
some of its step labels each with the operand its line starts from ("Step k: v"), the copy a
restart's first line makes; without it the base rarely copied the right operand after the cue.
Pretraining rows pack `--pack` documents each, so that the positions of a backtrack trace's
revised attempt (100-250 tokens in) are trained. The recipe (RECIPE_DEFAULTS, issue 19) draws and
tokenizes every step's documents once before training, spreads each step's documents over its
rows by length (`collate`), runs without an attention mask (pads come last in a row) and trains
the decoder's matrices with Muon, the rest with AdamW, on problems with values 0-49. Each
choice is a flag (--pretok, --balance, --mask, --optimizer, --max-value, ...); README ("The toy
task and base model") gives what each measured, and `python bench/toy_build.py` times the
pipelines side by side.

Run:
    python toy.py                       # builds runs/toy (data, tokenizer, base model), prints accuracy
    python toy.py --preset tiny --out runs/toy-tiny   # ~1 minute model for tests
    python toy.py --preset bench --out runs/toy-bench # ~25M parameters, for bench/

Outputs under --out: data/{train,test}.jsonl (fields problem, answer), base/ (a Hugging Face
checkpoint with its tokenizer), base/build.json (preset, seed, recipe, times; pass@1 and pass@8
unless --eval-samples 0), train_log.jsonl. A stage's first use builds the same model without
that evaluation (`ensure_built`): the stage measures its own starting point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Optional

import sampling
import utils

DEFAULT_DIR = "runs/toy"

# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------

OP_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
MAX_VALUE, MAX_ARG = 49, 9  # the default task's range: values 0-49, + and - arguments 1-9


def make_problem(rng: random.Random, max_value: int = MAX_VALUE, max_arg: int = MAX_ARG) -> dict:
    """One problem: a start value (2 to 0.6 max_value) and 3-5 operations, every
    intermediate value in [0, max_value], arguments of + and - at most max_arg, of * 2 to 5."""
    n_ops = rng.randint(3, 5)
    value = rng.randint(2, max_value * 60 // 99)
    start, ops = value, []
    for _ in range(n_ops):
        choices = [op for op, ok in (("+", value < max_value), ("-", value > 0), ("*", 1 <= value <= max_value // 2))
                   if ok]
        op = rng.choice(choices)
        if op == "*":
            arg = rng.randint(2, min(5, max_value // value))
        elif op == "+":
            arg = rng.randint(1, min(max_arg, max_value - value))
        else:
            arg = rng.randint(1, min(max_arg, value))
        value = apply_op(value, op, arg)
        ops.append((op, arg))
    text = f"Start with {start}. " + " ".join(f"{OP_WORDS[o]} {a}." for o, a in ops)
    text += " What is the result?"
    return {"problem": text, "answer": str(value), "start": start, "ops": ops}


def apply_op(value: int, op: str, arg: int) -> int:
    return value + arg if op == "+" else value - arg if op == "-" else value * arg


def solution_steps(start: int, ops: list, rng: random.Random | None = None, slip: float = 0.0, first: int = 1):
    """Step lines (numbered from `first`) and final value. With rng and slip > 0, each result is
    wrong with probability slip (off by a small amount or by ten), and later steps use the wrong value."""
    value, lines = start, []
    for i, (op, arg) in enumerate(ops, first):
        result = apply_op(value, op, arg)
        if rng is not None and slip > 0 and rng.random() < slip:
            wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
            result = wrong if wrong >= 0 else result + 1
        lines.append(f"Step {i}: {value} {op} {arg} = {result}")
        value = result
    return lines, value


def render_solution(lines: list[str], final) -> str:
    return "\n".join(lines) + f"\nThe answer is \\boxed{{{final}}}"


def make_splits(seed: int, n_train: int, n_test: int, max_value: int = MAX_VALUE,
                max_arg: int = MAX_ARG) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test problem lists (by problem text), deterministic for a seed."""
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_test:
        p = make_problem(rng, max_value, max_arg)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            problems.append(p)
    return problems[n_test:], problems[:n_test]


# --------------------------------------------------------------------------------------
# Ground truth of attempts and restarts (pure: used by infogain.py, grpo.py and study.py)
# --------------------------------------------------------------------------------------

_PROBLEM = re.compile(r"Start with (\d+)\.((?: (?:Add|Subtract|Multiply by) \d+\.)+) What is the result\?")
_OP = re.compile(r" (Add|Subtract|Multiply by) (\d+)\.")
STEP_LINE = re.compile(r"Step (\d+): (-?\d+) ([+*-]) (\d+) = (-?\d+)")
"""A step line as solution_steps writes it; a slipped chain can go below 0 (operand and result)."""
STEP_FIELDS = ("step", "operand", "op", "arg", "result")
"""STEP_LINE's groups, in order."""
RESTART_CLASSES = ("before", "at", "after", "beyond", "z0-correct")
"""Where a restart step k lies against z0's first wrong step f: before (k < f), at (k == f),
after (k > f), beyond (k outside 1..number of operations, z0 wrong), z0-correct (no wrong step)."""


def parse_problem(text: str) -> tuple[int, list[tuple[str, int]]] | None:
    """(start, [(op, arg), ...]) of a toy problem text (as make_problem writes it, anywhere in
    `text`), None when the text holds no toy problem."""
    m = _PROBLEM.search(text)
    if m is None:
        return None
    words = {w: o for o, w in OP_WORDS.items()}
    return int(m.group(1)), [(words[w], int(a)) for w, a in _OP.findall(m.group(2))]


def first_wrong_step(attempt: str, start: int, ops: list) -> int | None:
    """The first wrong step (1-based) of an attempt at the problem (start, ops); None when every
    step is right and the boxed answer is the result. The attempt's lines that start with
    "Step" are its steps, in order: the i-th must read exactly "Step i: v op arg = r" with v the
    true value before step i (so an operand that does not follow from the line above is wrong),
    op and arg the problem's i-th operation and r its true result. A missing step is wrong; when
    all len(ops) steps are right but the box is missing or wrong (or extra step lines follow),
    the answer line is the wrong one: len(ops) + 1."""
    steps = [line.strip() for line in attempt.splitlines() if line.strip().startswith("Step")]
    value = start
    for i, (op, arg) in enumerate(ops, 1):
        m = STEP_LINE.fullmatch(steps[i - 1]) if i <= len(steps) else None
        result = apply_op(value, op, arg)
        if m is None or (int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))) \
                != (i, value, op, arg, result):
            return i
        value = result
    box = utils.extract_boxed(attempt)
    return None if len(steps) == len(ops) and box is not None and box == str(value) else len(ops) + 1


def restart_class(first_wrong: int | None, k: int, n_steps: int) -> str:
    """One of RESTART_CLASSES for a restart at step k of an attempt whose first wrong step is
    `first_wrong` (first_wrong_step) in a problem of n_steps operations."""
    if first_wrong is None:
        return "z0-correct"
    if not 1 <= k <= n_steps:
        return "beyond"
    return "before" if k < first_wrong else "at" if k == first_wrong else "after"


def restart_can_fix(first_wrong: int | None, k: int, n_steps: int) -> bool | None:
    """Whether a revised attempt restarting at step k (steps 1..k-1 of the attempt stand) can
    end right: k within 1..n_steps and k <= first_wrong. None when the attempt is right (no
    restart is needed)."""
    if first_wrong is None:
        return None
    return 1 <= k <= n_steps and k <= first_wrong


def restart_truth(problem: str, z0: str, k: int | None) -> dict | None:
    """{first_wrong, class, can_fix} of a backtrack continuation restarting at step k after the
    attempt z0 (k None: the continuation names no restart step; class "none", can_fix False
    when z0 is wrong); None when `problem` is not a toy problem."""
    parsed = parse_problem(problem)
    if parsed is None:
        return None
    start, ops = parsed
    f = first_wrong_step(z0, start, ops)
    if k is None:
        return {"first_wrong": f, "class": "z0-correct" if f is None else "none", "can_fix": None if f is None else False}
    return {"first_wrong": f, "class": restart_class(f, k, len(ops)), "can_fix": restart_can_fix(f, k, len(ops))}


def restart_precision(items: list[dict]) -> dict:
    """Restart precision over continuations, each {"truth": restart_truth(...) or None,
    "outcome": 0/1 of the revised attempt}: among those after a wrong z0 (class not
    z0-correct; None truths are left out), the share whose restart can fix it (fixable),
    the share at exactly the first wrong step (at_first_wrong), and their outcome (z2 accuracy
    after a wrong z0); n counts them. Shares are None when there are none."""
    wrong = [x for x in items if x["truth"] is not None and x["truth"]["first_wrong"] is not None]
    share = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"n": len(wrong), "fixable": share([bool(x["truth"]["can_fix"]) for x in wrong]),
            "at_first_wrong": share([x["truth"]["class"] == "at" for x in wrong]),
            "z2_acc_z0_wrong": share([float(x["outcome"]) for x in wrong])}


# --------------------------------------------------------------------------------------
# Tokenizer and model
# --------------------------------------------------------------------------------------

PRESETS = {
    # name: model sizes and pretraining budget; optional recipe fields (RECIPE_DEFAULTS when absent):
    # warmup (share of steps), min_lr (final lr / peak), bf16 (autocast), mask (attention mask),
    # pretok (all documents drawn and tokenized once before training), balance (pretok's rows
    # balanced in length: collate), optimizer (adamw or muon: optimizers), muon_lr, prompt_weight
    # (the prompt tokens' weight in the loss: encode_documents), muon_ns (the precision of Muon's
    # Newton-Schulz iteration: resolve_muon_ns)
    "tiny": dict(hidden=128, layers=2, heads=2, inter=384, steps=300, batch=32, lr=3e-3),
    "default": dict(hidden=128, layers=3, heads=2, inter=256, steps=800, batch=32, lr=2e-3),
    "bench": dict(hidden=512, layers=8, heads=8, inter=1376, steps=200, batch=32, lr=1e-3),
}
RECIPE_DEFAULTS = dict(warmup=0.05, min_lr=0.1, bf16=False, mask=False, pretok=True, balance=True, optimizer="muon",
                       muon_lr=0.02, prompt_weight=0.0, muon_ns="auto")
"""Recipe fields a preset may leave out: the default preset's recipe (issue 19's; README, "The toy
task and base model", gives what each field measured)."""


def toy_tokenizer(train: list[dict]):
    """The build's tokenizer: train_tokenizer on the clean solutions of the first 3000 training
    problems (prompt included) and the forced suffix and backtrack marker."""
    corpus = []
    for p in train[:3000]:
        lines, final = solution_steps(p["start"], p["ops"])
        corpus.append(utils.build_prompt(None, p["problem"]) + render_solution(lines, final))
    corpus += [utils.MU_SUFFIX, utils.BACKTRACK_MARKER] * 50
    return train_tokenizer(corpus)


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Byte-level BPE (any text encodes), digits split one per token, <s> prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        pre_tokenizers.Split(Regex(r"Ġ?\d"), behavior="isolated"),  # " 58" -> " 5", "8"
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_model(tokenizer, preset: dict, max_positions: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = preset["hidden"] // preset["heads"]
    if head_dim < 32:
        raise ValueError(f"head_dim {head_dim}: vLLM's CPU attention needs head_dim >= 32")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset["hidden"],
        intermediate_size=preset["inter"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=preset["heads"],
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------------------
# Pretraining examples: (prompt, completion) with loss on the completion only
# --------------------------------------------------------------------------------------


RETRY_LINES = ("Let me solve it again.", "Let me check this again.", "Let's start over.", "Wait, let me check that.",
               "Hmm, let me redo this.", "Wait, let me recompute.", "Let me double-check.", "Hold on, let me look again.")
"""What a retry example writes between two attempts: the kind of line a real base model has
read in worked solutions. Never the backtrack marker."""


def pretraining_example(p: dict, rng: random.Random, slip: float, mu_frac: float, retry_frac: float = 0.0,
                        recall_frac: float = 0.0):
    """(head, completion), loss on the completion only. One of: a meta-prover example (a clean
    prefix cut after k steps, the forced suffix, the true answer); a retry example (a slipped
    full attempt and a RETRY_LINES line in the head; as the completion, the attempt redone from
    a random step k, "Step k: ..." on the attempt's value after step k-1, with fresh slips: the
    layout of a backtrack trace's revised attempt, with no marker and no choice of k); a recall
    example (a slipped full attempt and RECALL_LINE in the head; as the completion, RECALL_STEPS
    of its step labels in random order, each with the operand its line starts from, "Step k: v":
    the lookup that a restart's first line makes, alone); or a (possibly slipped) full solution."""
    u = rng.random()
    if u < mu_frac:
        lines, final = solution_steps(p["start"], p["ops"])
        k = rng.randint(0, len(lines) + 1)
        context = "\n".join(lines[:k]) if k <= len(lines) else render_solution(lines, final)
        return context + utils.MU_SUFFIX, f"{p['answer']}}}"
    if u < mu_frac + retry_frac:
        lines, final = solution_steps(p["start"], p["ops"], rng, slip)
        head = render_solution(lines, final) + "\n" + rng.choice(RETRY_LINES) + "\n"
        k = rng.randint(1, len(lines))  # redo from a uniformly random step, on the attempt's value before it
        value = p["start"] if k == 1 else int(lines[k - 2].rsplit("= ", 1)[1])
        return head, render_solution(*solution_steps(value, p["ops"][k - 1:], rng, slip, first=k))
    if u < mu_frac + retry_frac + recall_frac:
        lines, final = solution_steps(p["start"], p["ops"], rng, slip)
        ks = rng.sample(range(1, len(lines) + 1), min(RECALL_STEPS, len(lines)))
        return (render_solution(lines, final) + "\n" + RECALL_LINE + "\n",
                "\n".join(f"Step {k}: {STEP_LINE.match(lines[k - 1]).group(2)}" for k in ks))
    lines, final = solution_steps(p["start"], p["ops"], rng, slip)
    return "", render_solution(lines, final)


RECALL_LINE, RECALL_STEPS = "Recall:", 3
"""A recall example's line after the attempt, and how many of its steps it looks up."""


NOTE = "Note: " + utils.BACKTRACK_MARKER
"""A stand-alone pretraining document: the marker's words, outside any problem or solution."""


def encode_batch(tokenizer, problems: list[dict], rng, slip: float, mu_frac: float, note_frac: float = 0.0,
                 pack: int = 1, retry_frac: float = 0.0, recall_frac: float = 0.0):
    """(ids, attention mask, loss mask), each (rows, T): one document per problem, `pack`
    consecutive documents concatenated per row (each keeps its own BOS and EOS), padded to the
    longest row (collate). The per-step encoding build() uses; tests/test_toy.py checks the packed
    stream of pretraining_rows against it and bench/toy_build.py times the two."""
    seqs, masks = [], []
    for p in problems:
        if rng.random() < note_frac:  # a note: BOS, then the text (all of it carries loss)
            prompt_ids, comp = [tokenizer.bos_token_id], tokenizer(NOTE, add_special_tokens=False)["input_ids"]
            seqs.append(prompt_ids + comp + [tokenizer.eos_token_id])
            masks.append([0] + [1] * (len(comp) + 1))
            continue
        head, completion = pretraining_example(p, rng, slip, mu_frac, retry_frac, recall_frac)
        prompt_ids = tokenizer(utils.build_prompt(tokenizer, p["problem"]) + head)["input_ids"]
        comp_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt_ids + comp_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(comp_ids))
    return collate(list(zip(seqs, masks)), pack, tokenizer.pad_token_id)


def collate(docs: list[tuple[list[int], list[int]]], pack: int, pad_id: int, balance: bool = False):
    """(ids, attention mask, loss mask), each (rows, T), from encoded documents (encode_documents)
    as encode_batch lays them out: `pack` consecutive documents per row, padded to the longest row.
    With balance, the same number of rows (len(docs) / pack, rounded up), but each document goes
    to the row with the fewest tokens so far, longest documents first (rows keep their documents
    in stream order): rows of about equal length, less padding."""
    import torch

    groups = [list(range(i, min(i + pack, len(docs)))) for i in range(0, len(docs), pack)]
    if balance:
        loads = [0] * len(groups)
        groups = [[] for _ in groups]
        for i in sorted(range(len(docs)), key=lambda i: -len(docs[i][0])):
            r = loads.index(min(loads))
            groups[r].append(i)
            loads[r] += len(docs[i][0])
        groups = [sorted(g) for g in groups]
    seqs = [sum((docs[i][0] for i in g), []) for g in groups]
    masks = [sum((docs[i][1] for i in g), []) for g in groups]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.float)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
        attn[i, : len(s)] = 1
    return ids, attn, loss_mask


DRAW = 32
"""Problems drawn at a time by document_texts: each draw is the batch of one step of the old
per-step encoding (encode_batch), so both see the same documents in the same order."""


def document_texts(tokenizer, problems: list[dict], rng: random.Random, n_docs: int, slip: float, mu_frac: float,
                   note_frac: float = 0.0, retry_frac: float = 0.0, recall_frac: float = 0.0) -> list[tuple[str, str]]:
    """n_docs pretraining documents as (prompt, completion) text, loss on the completion only:
    DRAW problems drawn at a time, then one document each (a note with probability note_frac:
    prompt "", completion NOTE; else pretraining_example, its head after the problem's prompt)."""
    docs = []
    while len(docs) < n_docs:
        for p in [problems[rng.randrange(len(problems))] for _ in range(DRAW)]:
            if rng.random() < note_frac:
                docs.append(("", NOTE))
                continue
            head, completion = pretraining_example(p, rng, slip, mu_frac, retry_frac, recall_frac)
            docs.append((utils.build_prompt(tokenizer, p["problem"]) + head, completion))
    return docs[:n_docs]


def encode_documents(tokenizer, docs: list[tuple[str, str]], prompt_weight: float = 0.0) -> list[tuple[list[int], list[float]]]:
    """(token ids, loss mask) per (prompt, completion) document, in two batched tokenizer calls:
    BOS + prompt (the tokenizer prepends BOS; an empty prompt is BOS alone), then completion +
    EOS, the loss mask 1 on the completion and EOS, prompt_weight on the prompt after BOS (0 by
    default: the loss on the completion only)."""
    prompts = tokenizer([p for p, _ in docs])["input_ids"]
    completions = tokenizer([c for _, c in docs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + c + [eos], [0] + [prompt_weight] * (len(p) - 1) + [1] * (len(c) + 1))
            for p, c in zip(prompts, completions)]


def pack_rows(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Documents packed in order into rows of exactly seq_len tokens: a document that does not
    fit in the current row's rest starts the next row; each row's rest is pad tokens with loss
    mask 0 (they follow every real token, so under causal attention no real token sees them).
    Returns (ids rows, loss-mask rows). Raises ValueError for a document longer than seq_len."""
    rows, masks, row, mask = [], [], [], []
    for ids, m in docs:
        if len(ids) > seq_len:
            raise ValueError(f"a pretraining document of {len(ids)} tokens does not fit --seq-len {seq_len}")
        if len(row) + len(ids) > seq_len:
            rows.append(row + [pad_id] * (seq_len - len(row)))
            masks.append(mask + [0] * (seq_len - len(mask)))
            row, mask = [], []
        row, mask = row + ids, mask + m
    if row:
        rows.append(row + [pad_id] * (seq_len - len(row)))
        masks.append(mask + [0] * (seq_len - len(mask)))
    return rows, masks


def pretraining_rows(tokenizer, problems: list[dict], rng: random.Random, n_rows: int, seq_len: int, slip: float,
                     mu_frac: float, note_frac: float = 0.0, retry_frac: float = 0.0, recall_frac: float = 0.0,
                     chunk: int = 0):
    """All pretraining rows of a build, made once before training: (ids, loss mask), each
    (n_rows, seq_len), from the document stream of document_texts (`chunk` documents at a time,
    0: about enough for the rows at 100 tokens a document; tokenized in batched calls, packed by
    pack_rows; documents past the last row are dropped). No document is split across rows."""
    import torch

    chunk = chunk or DRAW * (n_rows * seq_len // (100 * DRAW) + 1)
    docs = []
    while True:
        docs += encode_documents(tokenizer, document_texts(tokenizer, problems, rng, chunk, slip, mu_frac, note_frac,
                                                           retry_frac, recall_frac))
        rows, masks = pack_rows(docs, seq_len, tokenizer.pad_token_id)
        if len(rows) > n_rows:  # a row after the n_rows-th exists, so the first n_rows are complete
            break
    return torch.tensor(rows[:n_rows]), torch.tensor(masks[:n_rows], dtype=torch.float)


@dataclass
class Args:
    out: str = DEFAULT_DIR
    """output folder: data/, base/ and the training log go here"""
    preset: str = "default"
    """model size and budget: tiny (tests), default, bench (~25M parameters)"""
    seed: int = 0
    """seeds the problems, the tokenizer corpus, the initialisation and the data order"""
    n_train: int = 20000
    """training problems (used by pretraining and by every later stage)"""
    n_test: int = 256
    """held-out test problems"""
    max_value: int = MAX_VALUE
    """largest start or intermediate value of a problem (make_problem)"""
    max_arg: int = MAX_ARG
    """largest argument of an Add or Subtract"""
    slip: float = 0.10
    """per-step probability that a pretraining solution's result is wrong (higher slips push the
    base's pass@1 under the 20 percent the task asks for: README)"""
    mu_frac: float = 0.15
    """fraction of pretraining examples that teach the forced-answer meta-prover"""
    pack: int = 3
    """documents per pretraining sequence: one document is about 100 tokens, a backtrack
    trace or a linearized stream is longer, and a model pretrained on single documents fails
    at the positions it never trained (README)"""
    note_frac: float = 0.02
    """fraction of pretraining examples that are stand-alone notes holding the backtrack
    marker's words (never inside a solution)"""
    retry_frac: float = 0.30
    """fraction of pretraining examples that are retries: a slipped attempt, a RETRY_LINES line,
    and the attempt redone from a random step carrying the loss. A real base model has read
    such revisions; the toy needs them to write a revised attempt after the backtrack cue at
    all (README gives bench/restart_steps.py's numbers for several shares)"""
    recall_frac: float = 0.20
    """fraction of pretraining examples that are recalls: a slipped attempt, RECALL_LINE, then
    some of its step labels each with the operand its line starts from ("Step k: v"), the copy
    a restart's first line needs (README, issue 19)"""
    steps: int = 0
    """optimizer steps (0: the preset's)"""
    batch: int = 0
    """pretraining documents per step (0: the preset's)"""
    lr: float = 0.0
    """peak learning rate (0: the preset's)"""
    warmup: float = -1.0
    """linear warmup as a share of the steps (negative: the preset's)"""
    min_lr: float = -1.0
    """final learning rate of the cosine schedule, as a share of the peak (negative: the preset's)"""
    hidden: int = 0
    """model width (0: the preset's)"""
    layers: int = 0
    """decoder layers (0: the preset's)"""
    heads: int = 0
    """attention heads (0: the preset's; hidden / heads must stay >= 32)"""
    inter: int = 0
    """MLP width (0: the preset's)"""
    bf16: Optional[bool] = None
    """forward under bf16 autocast, fp32 weights and optimizer (unset: the preset's)"""
    mask: Optional[bool] = None
    """pass the attention mask; without it causal attention alone keeps real tokens off the
    pads, which come last in each row: same loss (unset: the preset's)"""
    pretok: Optional[bool] = None
    """draw and tokenize every pretraining document once before training, in batched
    tokenizer calls, instead of encode_batch every step (unset: the preset's)"""
    balance: Optional[bool] = None
    """with pretok: spread each step's documents over its rows by length (toy.collate) instead of
    `pack` consecutive ones per row, so rows pad less (unset: the preset's)"""
    optimizer: str = ""
    """adamw, or muon: Muon (toy.muon) on the decoder layers' weight matrices, AdamW (at --lr)
    on the embedding (tied to the output head) and the norms ('': the preset's)"""
    muon_lr: float = 0.0
    """Muon's peak learning rate, on the same schedule as --lr (0: the preset's)"""
    prompt_weight: float = -1.0
    """weight of a document's prompt tokens in the pretraining loss, against 1 for its completion's
    (0: the loss on the completion only; with --pretok only; negative: the preset's)"""
    muon_ns: str = ""
    """precision of Muon's Newton-Schulz iteration (toy.newton_schulz): bf16 (torch.optim.Muon's),
    fp32, rounded (fp32 products, each result rounded to bf16), or auto: bf16 on a CPU with native
    bf16 matrix products, rounded elsewhere, where bf16 products are emulated and many times
    slower and fp32 built weaker toys (README; '': the preset's)"""
    eval_samples: int = 8
    """samples per test problem for the pass@1 / pass@k report (0 skips it)"""
    threads: int = 0
    """torch CPU threads (0: all cores)"""


def recipe(args: Args) -> dict:
    """The build's model sizes and pretraining recipe: the preset's (RECIPE_DEFAULTS for the
    fields it leaves out) with args' overrides. An unknown preset or optimizer, a size or rate
    that is not positive, or heads that vLLM's CPU attention cannot take is a UserError, before
    anything is written."""
    if args.preset not in PRESETS:
        raise utils.UserError(f"toy: --preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    r = {**RECIPE_DEFAULTS, **PRESETS[args.preset]}
    for k in ("steps", "batch", "lr", "hidden", "layers", "heads", "inter", "optimizer", "muon_lr", "muon_ns"):
        r[k] = getattr(args, k) or r[k]
    for k in ("steps", "batch", "hidden", "layers", "heads", "inter", "lr", "muon_lr"):
        if r[k] <= 0:
            raise utils.UserError(f"toy: --{k.replace('_', '-')} must be positive, got {r[k]}")
    check_optimizer(r["optimizer"])
    resolve_muon_ns(r["muon_ns"])
    if r["hidden"] % r["heads"] or r["hidden"] // r["heads"] < 32:
        raise utils.UserError(f"toy: --hidden {r['hidden']} must split into --heads {r['heads']} heads of at least 32 "
                              "dimensions each (vLLM's CPU attention rejects smaller heads)")
    for k in ("warmup", "min_lr", "prompt_weight"):
        r[k] = r[k] if getattr(args, k) < 0 else getattr(args, k)
    for k in ("bf16", "mask", "pretok", "balance"):
        r[k] = r[k] if getattr(args, k) is None else getattr(args, k)
    if r["prompt_weight"] > 1:
        raise utils.UserError(f"toy: --prompt-weight must be at most 1 (the completion's weight), got {r['prompt_weight']}")
    if r["prompt_weight"] and not r["pretok"]:
        raise utils.UserError("toy: --prompt-weight needs --pretok true (the per-step encoding trains on the completion only)")
    return r


def build(args: Args) -> dict:
    """Build data, tokenizer and base model under args.out; return the build report."""
    import torch
    from tqdm import tqdm

    preset = recipe(args)
    steps = preset["steps"]
    if args.threads:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed)
    t0 = time.time()

    train, test = make_splits(args.seed, args.n_train, args.n_test, args.max_value, args.max_arg)
    data_dir, model_dir = os.path.join(args.out, "data"), os.path.join(args.out, "base")
    fields = ("problem", "answer")
    utils.write_jsonl(os.path.join(data_dir, "train.jsonl"), [{k: p[k] for k in fields} for p in train])
    utils.write_jsonl(os.path.join(data_dir, "test.jsonl"), [{k: p[k] for k in fields} for p in test])

    rng = random.Random(args.seed + 1)
    tokenizer = toy_tokenizer(train)
    model = make_model(tokenizer, preset)
    n_params = sum(p.numel() for p in model.parameters())
    utils.print0(f"toy: {args.preset} model, {n_params / 1e6:.2f}M parameters, {steps} steps")

    opts = optimizers(model, preset)
    warmup, floor = max(1, int(steps * preset["warmup"] + 1e-9)), preset["min_lr"]

    def lr_at(step):  # linear warmup, cosine to min_lr (a share of the peak)
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    docs = []
    if preset["pretok"]:  # every step's documents, drawn as encode_batch draws them, tokenized once
        docs = encode_documents(tokenizer, document_texts(tokenizer, train, rng, steps * preset["batch"], args.slip,
                                                          args.mu_frac, args.note_frac, args.retry_frac,
                                                          args.recall_frac), preset["prompt_weight"])

    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lr_at) for opt in opts]
    log_path = os.path.join(args.out, "train_log.jsonl")
    os.makedirs(args.out, exist_ok=True)
    model.train()
    t_train = time.time()
    with open(log_path, "w") as log:
        for step in tqdm(range(steps), desc="toy pretrain", disable=not utils.is_main()):
            if preset["pretok"]:
                b = preset["batch"]
                ids, attn, loss_mask = collate(docs[step * b:(step + 1) * b], args.pack, tokenizer.pad_token_id,
                                               preset["balance"])
            else:
                batch = [train[rng.randrange(len(train))] for _ in range(preset["batch"])]
                ids, attn, loss_mask = encode_batch(tokenizer, batch, rng, args.slip, args.mu_frac, args.note_frac,
                                                    args.pack, args.retry_frac, args.recall_frac)
            loss = train_step(model, opts, ids, attn, loss_mask, preset)
            for sched in scheds:
                sched.step()
            if step % 25 == 0 or step == steps - 1:
                log.write(json.dumps({"step": step, "loss": loss.item(), "lr": scheds[0].get_last_lr()[0]}) + "\n")
                log.flush()

    train_s = time.time() - t_train
    model.eval()
    with utils.atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    report = {"fingerprint": fingerprint(args), "preset": args.preset, "seed": args.seed, "params": n_params, "steps": steps,
              "slip": args.slip, "note_frac": args.note_frac, "retry_frac": args.retry_frac,
              "recall_frac": args.recall_frac, "n_train": args.n_train, "n_test": args.n_test, "max_value": args.max_value,
              "max_arg": args.max_arg, "pack": args.pack, "recipe": preset,
              "muon_ns": resolve_muon_ns(preset["muon_ns"]) if preset["optimizer"] == "muon" else None,
              "train_seconds": round(train_s, 1), "build_seconds": round(time.time() - t0, 1)}
    if args.eval_samples:
        report.update(evaluate_base(model_dir, os.path.join(data_dir, "test.jsonl"), args.eval_samples, args.seed))
        report["eval_seconds"] = round(time.time() - t0 - report["build_seconds"], 1)
    utils.write_json(os.path.join(model_dir, "build.json"), report)
    return report


def check_optimizer(name: str) -> None:
    """A UserError unless name is one of the build's optimizers (adamw, muon)."""
    if name not in ("adamw", "muon"):
        raise utils.UserError(f"toy: --optimizer must be adamw or muon, got {name!r}")


def optimizers(model, recipe: dict) -> list:
    """The build's optimizers, each stepped on the same lr schedule: AdamW (betas 0.9/0.95, weight
    decay 0.1) on every parameter; or, with recipe["optimizer"] == "muon", `muon` at muon_lr (its
    Newton-Schulz iteration's precision from recipe["muon_ns"]: `resolve_muon_ns`) on the decoder
    layers' 2-D weight matrices (attention and MLP projections) and AdamW on the rest (the
    embedding, which the output head shares, and the norms)."""
    import torch

    check_optimizer(recipe["optimizer"])
    matrices = []  # Muon's: the decoder layers' 2-D weights
    if recipe["optimizer"] == "muon":
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opts = [torch.optim.AdamW(rest, lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.1)]
    if matrices:
        opts.append(muon(matrices, lr=recipe["muon_lr"], weight_decay=0.1, ns=resolve_muon_ns(recipe["muon_ns"])))
    return opts


MUON_NS = ("auto", "bf16", "fp32", "rounded")
"""Values of the recipe field muon_ns (--muon-ns): the precision of Muon's Newton-Schulz iteration."""


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: its flags (Linux /proc/cpuinfo) carry
    avx512_bf16 or amx_bf16. Elsewhere torch emulates bf16 matrix products, many times slower than
    fp32 ones (bench/toy_recipes.py "muon_ns=bf16" "muon_ns=rounded"; README). Without
    /proc/cpuinfo: False."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_muon_ns(name: str) -> str:
    """The precision a muon_ns value runs Muon's Newton-Schulz iteration in (newton_schulz's ns):
    "bf16", "fp32" or "rounded" as given, and for "auto" bf16 where the CPU multiplies bf16
    natively (native_bf16), "rounded" elsewhere: bf16's precision at about fp32's speed (plain
    fp32 built toys that restart worse: README). Anything else is a UserError."""
    if name not in MUON_NS:
        raise utils.UserError(f"toy: --muon-ns must be one of {', '.join(MUON_NS)}, got {name!r}")
    if name == "auto":
        return "bf16" if native_bf16() else "rounded"
    return name


def newton_schulz(g, ns: str = "bf16", steps: int = 5, eps: float = 1e-7):
    """Muon's orthogonalization of a 2-D update g (rows <= columns after a transpose): g / ||g||_F,
    then `steps` quintic Newton-Schulz iterations X <- aX + (bA + cA^2)X, A = XX^T, with Keller
    Jordan's coefficients (a, b, c) = (3.4445, -4.7750, 2.0315). Its singular values end near, not
    at, 1 (about 0.5-1.5 by design). ns: "bf16" computes in bf16, torch.optim.Muon's iteration op
    for op; "fp32" in fp32; "rounded" in fp32 with every result rounded to bf16 (bf16's storage
    precision at fp32's speed on a CPU that emulates bf16 products)."""
    import torch

    dtype = torch.bfloat16 if ns == "bf16" else torch.float32
    rnd = (lambda t: t.bfloat16().float()) if ns == "rounded" else (lambda t: t)
    a, b, c = 3.4445, -4.7750, 2.0315
    x = rnd(g.to(dtype, copy=True))
    if g.size(0) > g.size(1):
        x = x.T
    x = rnd(x / rnd(x.norm()).clamp(min=eps))
    for _ in range(steps):
        gram = rnd(x @ x.T)  # (r, r)
        x = rnd(torch.addmm(x, rnd(torch.addmm(gram, gram, gram, beta=b, alpha=c)), x, beta=a))  # (r, c)
    return x.T if g.size(0) > g.size(1) else x


def muon(params, lr: float, weight_decay: float, ns: str = "bf16", momentum: float = 0.95):
    """Muon on 2-D parameters as torch.optim.Muon (torch 2.9+) computes it, with the Newton-Schulz
    iteration's precision a choice (newton_schulz's ns): per step, buf <- lerp(buf, grad, 1 -
    momentum), the Nesterov update lerp(grad, buf, momentum) orthogonalized, p <- p (1 - lr wd) -
    lr sqrt(max(1, rows/cols)) update. With ns "bf16" its steps equal torch.optim.Muon's bit for
    bit (tests/test_toy.py). Why its own: torch.optim.Muon always iterates in bf16, which a CPU
    without native bf16 products emulates (native_bf16)."""
    import torch

    class Muon(torch.optim.Optimizer):  # defined here: toy.py imports torch only where it trains
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.lerp_(p.grad, 1 - momentum)
                    update = newton_schulz(p.grad.lerp(buf, momentum), ns)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, p.size(0) / p.size(1))))
            return loss

    return Muon(params, dict(lr=lr, weight_decay=weight_decay))


def pretraining_loss(model, ids, loss_mask, bf16: bool = False, attention_mask=None):
    """Next-token NLL of a batch of rows (B, T), averaged with the loss mask's weights (1 on the
    trained tokens, 0 elsewhere; `--prompt-weight` puts a weight on the prompts). Without an
    attention mask causal attention alone keeps every real token off the pads, which come last
    in each row (same loss); the forward runs under bf16 autocast if bf16, the loss in fp32."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
    ).view_as(loss_mask[:, 1:])  # (B, T-1)
    return (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()


def train_step(model, opts, ids, attn, loss_mask, recipe: dict):
    """One pretraining step of a recipe (toy.build's, and bench/toy_recipes.py's): the loss of
    `pretraining_loss` (the attention mask passed only if recipe["mask"]), gradients clipped to
    norm 1.0, one step of every optimizer (`optimizers`). Returns the loss; the caller steps
    the learning-rate schedules."""
    import torch

    loss = pretraining_loss(model, ids, loss_mask, recipe["bf16"], attn if recipe["mask"] else None)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()
    return loss


def evaluate_base(model_dir: str, test_path: str, n: int, seed: int) -> dict:
    """pass@1 and pass@n of the base model at temperature 1.0 on the test split. The engine runs
    eager (no torch.compile warm-up, which costs more than it saves on one batch of a tiny model)
    and takes up to 2048 samples in one batch (max_num_seqs; vLLM's CPU default is 256), so that
    the default 256 problems x 8 samples decode at once, not in waves."""
    import numpy as np

    records = utils.read_records(test_path, ["problem", "answer"])
    sampler = sampling.Sampler(model_dir, seed=seed, enforce_eager=True, max_num_seqs=min(2048, max(1, len(records) * n)))
    prompts = [utils.build_prompt(sampler.tokenizer, r["problem"]) for r in records]
    outs = sampler.generate(prompts, n=n, temperature=1.0, max_tokens=160, seed=seed)
    correct = np.array([[utils.grade(s.text, r["answer"]) for s in group] for group, r in zip(outs, records)])
    c = correct.sum(1)
    pass1 = float(correct.mean())
    passn = float((c > 0).mean())
    return {"pass@1": round(pass1, 4), f"pass@{n}": round(passn, 4),
            "mean_tokens": round(float(np.mean([s.num_tokens for g in outs for s in g])), 1)}


def paths(root: str = DEFAULT_DIR) -> dict:
    return {"base": os.path.join(root, "base"), "train": os.path.join(root, "data", "train.jsonl"),
            "test": os.path.join(root, "data", "test.jsonl")}


def build_splits(model_dir: str, seed: int = Args.seed) -> tuple[list[dict], list[dict]]:
    """The (train, test) problems of the toy build that wrote model_dir, from its build.json
    (seed, split sizes, value range; a field it lacks, from an older build: Args' default); for a
    folder without one (a later stage's model) the default problems of `seed`.
    bench/restart_steps.py and bench/solution_fields.py draw from them."""
    path = os.path.join(model_dir, "build.json")
    report = {**dataclasses.asdict(Args(seed=seed)), **(json.load(open(path)) if os.path.exists(path) else {})}
    return make_splits(*(report[k] for k in ("seed", "n_train", "n_test", "max_value", "max_arg")))


def fingerprint(args: Args) -> str:
    """Hash of this file's source and the build arguments: a built folder whose
    build.json carries another fingerprint is stale and gets rebuilt by ensure_built."""
    import hashlib

    src = open(__file__, "rb").read()
    fields = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("out", "threads", "eval_samples")}
    return hashlib.sha1(src + json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def built_fingerprint(model_dir: str) -> str | None:
    """The fingerprint in model_dir's build.json: the toy build that folder is; None for any
    other folder (no build.json, or one that is not a build's report)."""
    return utils.json_field(os.path.join(model_dir, "build.json"), "fingerprint")


def is_built(root: str = DEFAULT_DIR, preset: str = "default", steps: int = 0) -> bool:
    """Whether root holds an up-to-date build (same toy.py source and arguments; steps 0: the
    preset's). A missing or unreadable build.json is no build."""
    p = paths(root)
    current = built_fingerprint(p["base"]) == fingerprint(Args(out=root, preset=preset, steps=steps))
    return current and all(os.path.exists(v) for v in p.values())


def ensure_built(root: str = DEFAULT_DIR, preset: str = "default", steps: int = 0, eval_samples: int = 0) -> dict:
    """Build the toy task and base model under root unless an up-to-date build is there;
    return the paths (steps and eval_samples as toy.py's flags; the defaults are the build every
    script uses, without the base's pass@k measurement, a few thousand samples that no stage
    reads: `python toy.py` measures it). Under torchrun (first use of
    `torchrun grpo.py` etc.), rank 0 builds in a child process (`python toy.py` on every core
    this process may run on) while the other ranks wait for the build: the build's own vLLM
    engine must not live in a torchrun process (closing an engine ends the process group), and a
    collective barrier could time out during a build of minutes. With MRT_TOY_NO_BUILD set, a
    missing or stale build is an error instead."""
    if is_built(root, preset, steps):
        return paths(root)
    if os.environ.get("MRT_TOY_NO_BUILD"):  # the tests set it when MRT_TOY_DIR names a build to use as it is
        raise utils.UserError(f"toy: {root} is missing or stale and MRT_TOY_NO_BUILD is set: no build here")
    if not utils.is_distributed():
        build(Args(out=root, preset=preset, steps=steps, eval_samples=eval_samples))
    elif utils.is_main():
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
        cmd = [sys.executable, os.path.abspath(__file__), "--out", root, "--preset", preset, "--steps", str(steps),
               "--eval-samples", str(eval_samples), "--threads", str(utils.usable_cores())]
        utils.print0(f"toy: building {root} first: {' '.join(cmd)}")
        if subprocess.run(cmd, env=env).returncode != 0:
            raise utils.UserError(f"toy: the build of {root} failed (run `python toy.py --out {root}` to see why)")
    else:
        while not is_built(root, preset, steps):
            time.sleep(1)
    utils.barrier()
    return paths(root)



def default_model() -> tuple[str, dict]:
    """The embedded default of the stages that train: runs/warmstart/model if warmstart.py
    fine-tuned it from this toy build (its mrt.json's base_build), else the toy base (built if
    missing; a warmstart model of another build is left alone, with a line saying so); and the
    toy's paths (paths)."""
    toy_paths = ensure_built()
    warm = os.path.join("runs", "warmstart", "model")
    if os.path.isdir(warm):
        built = utils.json_field(os.path.join(warm, "mrt.json"), "base_build")
        if built is not None and built == built_fingerprint(toy_paths["base"]):
            return warm, toy_paths
        utils.print0(f"{warm} was not fine-tuned from this toy build: starting from the toy base {toy_paths['base']}")
    return toy_paths["base"], toy_paths

if __name__ == "__main__":
    args = utils.parse_args(Args)
    report = utils.run_main(build, args)
    utils.print0(json.dumps(report, indent=2))
