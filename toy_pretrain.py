"""toy_pretrain.py: the toy base model's pretraining recipe, the build that `python toy.py` runs.

The build writes the task's splits (toy.make_splits), trains a byte-level BPE tokenizer on clean
solutions, and pretrains a tiny Llama (head_dim 64, so vLLM's CPU attention accepts it) from
scratch on CPU, on four kinds of documents drawn from the training problems:

- a solution with slips: each step's result is wrong with probability `--slip` and the chain goes
  on from the wrong value, as a careless human solution would. The model learns a per-step error
  rate, so pass@1 falls with the number of steps and pass@k rises with k: the imperfection MRT
  needs, a real random mistake that a second attempt, or a restart from the step before it, can
  fix;
- a meta-prover example (`--mu-frac`): a clean solution cut after any step, `utils.MU_SUFFIX`
  ("Time is up. The answer is \\boxed{"), then the true answer, the loss on the answer only, so
  the model never emits the suffix on its own but answers from a partial solution when forced
  (infogain.py's meta-prover mu);
- a retry (`--retry-frac`): a slipped attempt, a line such as "Wait, let me check that.", then
  the attempt redone from a uniformly random `Step k:` on the attempt's own value after step k-1,
  as worked solutions in a real corpus have them. It never holds the backtrack marker and never
  picks k well, so where to restart is left to warmstart and RL; without it the toy could not
  write a revised attempt after the backtrack cue at all;
- a recall (`--recall-frac`): a slipped attempt, "Recall:", then some of its step labels each
  with the operand its line starts from ("Step k: v"), the copy a restart's first line makes.

The backtrack marker (`utils.BACKTRACK_MARKER`) never follows an attempt in pretraining, as in the
paper, but a small share of documents (`--note-frac`) are stand-alone notes holding its words, as
a real base model has read them: without them warmstart's short SFT cannot even spell the marker.

The recipe: every step's documents are drawn and tokenized once before training, `--pack` per
row on average, spread over the step's rows by length (`collate`; no attention mask: the pads
come last in each row), the loss on the completions only; Muon (torch.optim.Muon) on the decoder
layers' weight matrices and AdamW on the embedding (tied to the output head) and the norms, one
schedule (linear warmup, cosine to a tenth of the peak), gradients clipped to norm 1. The
alternatives that were measured against it (AdamW alone, bf16 autocast, the attention mask,
per-step encoding, unbalanced rows, prompt loss, Muon's iteration in other precisions,
torch.compile) live in bench/toy_recipes.py, which times each against it.

Run (toy.py runs this file with the same flags):
    python toy.py                                     # builds runs/toy, prints pass@1 and pass@8
    python toy.py --preset tiny --out runs/toy-tiny   # about a minute, for tests
    python toy.py --preset bench --out runs/toy-bench # about 25M parameters, for bench/

Outputs under --out: data/{train,test}.jsonl (fields problem, answer), base/ (a Hugging Face
checkpoint with its tokenizer), base/build.json (the build's fingerprint, arguments, recipe and
times; pass@1 and pass@8 unless --eval-samples 0), train_log.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time

import sampling
import toy
import utils

PRESETS = {
    # name: model sizes and pretraining budget (optimizer steps, documents per step, peak AdamW lr)
    "tiny": dict(hidden=128, layers=2, heads=2, inter=384, steps=300, batch=32, lr=3e-3),
    "default": dict(hidden=128, layers=3, heads=2, inter=256, steps=800, batch=32, lr=2e-3),
    "bench": dict(hidden=512, layers=8, heads=8, inter=1376, steps=200, batch=32, lr=1e-3),
}
SCHEDULE = dict(warmup=0.05, min_lr=0.1, muon_lr=0.02)
"""Every preset's schedule: linear warmup over this share of the steps, cosine down to min_lr
times the peak; Muon's peak learning rate."""


# ---- Tokenizer and model -------------------------------------------------------------


def toy_tokenizer(train: list[dict]):
    """The build's tokenizer: train_tokenizer on the clean solutions of the first 3000 training
    problems (prompt included) and the forced suffix and backtrack marker."""
    corpus = []
    for p in train[:3000]:
        lines, final = toy.solution_steps(p["start"], p["ops"])
        corpus.append(utils.build_prompt(None, p["problem"]) + toy.render_solution(lines, final))
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


# ---- Pretraining documents: (prompt, completion) with loss on the completion only ----


RETRY_LINES = ("Let me solve it again.", "Let me check this again.", "Let's start over.",
               "Wait, let me check that.", "Hmm, let me redo this.", "Wait, let me recompute.",
               "Let me double-check.", "Hold on, let me look again.")
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
        lines, final = toy.solution_steps(p["start"], p["ops"])
        k = rng.randint(0, len(lines) + 1)
        context = "\n".join(lines[:k]) if k <= len(lines) else toy.render_solution(lines, final)
        return context + utils.MU_SUFFIX, f"{p['answer']}}}"
    if u < mu_frac + retry_frac:
        lines, final = toy.solution_steps(p["start"], p["ops"], rng, slip)
        head = toy.render_solution(lines, final) + "\n" + rng.choice(RETRY_LINES) + "\n"
        k = rng.randint(1, len(lines))  # redo from a uniformly random step, on the attempt's value before it
        value = p["start"] if k == 1 else int(lines[k - 2].rsplit("= ", 1)[1])
        return head, toy.render_solution(*toy.solution_steps(value, p["ops"][k - 1:], rng, slip, first=k))
    if u < mu_frac + retry_frac + recall_frac:
        lines, final = toy.solution_steps(p["start"], p["ops"], rng, slip)
        ks = rng.sample(range(1, len(lines) + 1), min(RECALL_STEPS, len(lines)))
        return (toy.render_solution(lines, final) + "\n" + RECALL_LINE + "\n",
                "\n".join(f"Step {k}: {toy.STEP_LINE.match(lines[k - 1]).group(2)}" for k in ks))
    lines, final = toy.solution_steps(p["start"], p["ops"], rng, slip)
    return "", toy.render_solution(lines, final)


RECALL_LINE, RECALL_STEPS = "Recall:", 3
"""A recall example's line after the attempt, and how many of its steps it looks up."""


NOTE = "Note: " + utils.BACKTRACK_MARKER
"""A stand-alone pretraining document: the marker's words, outside any problem or solution."""


DRAW = 32
"""Problems drawn at a time by document_texts: the order of the stream of documents (and so the
built model) depends on it."""


def documents(tokenizer, problems: list[dict], rng: random.Random, slip: float, mu_frac: float,
              note_frac: float = 0.0, retry_frac: float = 0.0,
              recall_frac: float = 0.0) -> list[tuple[str, str]]:
    """One pretraining document per problem as (prompt, completion) text, loss on the completion
    only: a note with probability note_frac (prompt "", completion NOTE), else pretraining_example,
    its head after the problem's prompt."""
    docs = []
    for p in problems:
        if rng.random() < note_frac:
            docs.append(("", NOTE))
            continue
        head, completion = pretraining_example(p, rng, slip, mu_frac, retry_frac, recall_frac)
        docs.append((utils.build_prompt(tokenizer, p["problem"]) + head, completion))
    return docs


def document_texts(tokenizer, problems: list[dict], rng: random.Random, n_docs: int, slip: float,
                   mu_frac: float, note_frac: float = 0.0, retry_frac: float = 0.0,
                   recall_frac: float = 0.0) -> list[tuple[str, str]]:
    """n_docs pretraining documents (`documents`) of problems drawn DRAW at a time."""
    docs = []
    while len(docs) < n_docs:
        drawn = [problems[rng.randrange(len(problems))] for _ in range(DRAW)]
        docs += documents(tokenizer, drawn, rng, slip, mu_frac, note_frac, retry_frac, recall_frac)
    return docs[:n_docs]


def encode_documents(tokenizer, docs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per (prompt, completion) document, in two batched tokenizer calls:
    BOS + prompt (the tokenizer prepends BOS; an empty prompt is BOS alone), then completion +
    EOS; the loss mask is 1 on the completion and EOS, 0 elsewhere."""
    prompts = tokenizer([p for p, _ in docs])["input_ids"]
    completions = tokenizer([c for _, c in docs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(p + c + [eos], [0] * len(p) + [1] * (len(c) + 1)) for p, c in zip(prompts, completions)]


def collate(docs: list[tuple[list[int], list[int]]], pack: int, pad_id: int, balance: bool = False):
    """(ids, attention mask, loss mask), each (rows, T), from encoded documents (encode_documents):
    `pack` consecutive documents per row (each keeps its own BOS and EOS), padded to the longest
    row. With balance (the build's), the same number of rows (len(docs) / pack, rounded up), but
    each document goes to the row with the fewest tokens so far, longest documents first (rows
    keep their documents in stream order): rows of about equal length, less padding."""
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


def encode_batch(tokenizer, problems: list[dict], rng: random.Random, slip: float, mu_frac: float,
                 note_frac: float = 0.0, pack: int = 1, retry_frac: float = 0.0, recall_frac: float = 0.0):
    """(ids, attention mask, loss mask), each (rows, T): one document per problem (`documents`),
    `pack` consecutive ones per row (collate)."""
    docs = documents(tokenizer, problems, rng, slip, mu_frac, note_frac, retry_frac, recall_frac)
    return collate(encode_documents(tokenizer, docs), pack, tokenizer.pad_token_id)


# ---- Pretraining ---------------------------------------------------------------------


def recipe(args: toy.Args) -> dict:
    """The build's model sizes and schedule: the preset's (PRESETS, SCHEDULE), its steps replaced
    by args.steps unless 0. An unknown preset or steps below 0 is a UserError, before anything is
    written."""
    if args.preset not in PRESETS:
        raise utils.UserError(f"toy: --preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    r = {**SCHEDULE, **PRESETS[args.preset]}
    r["steps"] = args.steps or r["steps"]
    if r["steps"] <= 0:
        raise utils.UserError(f"toy: --steps must be positive, got {r['steps']}")
    return r


def muon_matrices(model) -> list:
    """Muon's parameters: the decoder layers' 2-D weights (attention and MLP projections)."""
    return [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]


def optimizers(model, recipe: dict) -> list:
    """[AdamW, Muon], each stepped on the same schedule: AdamW (betas 0.9/0.95, weight decay 0.1)
    at recipe["lr"] on the embedding (which the output head shares) and the norms;
    torch.optim.Muon (its defaults: momentum 0.95, Nesterov, 5 Newton-Schulz steps in bf16) at
    recipe["muon_lr"], weight decay 0.1, on muon_matrices."""
    import torch

    matrices = muon_matrices(model)
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.AdamW(rest, lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.1),
            torch.optim.Muon(matrices, lr=recipe["muon_lr"], weight_decay=0.1)]


def pretraining_loss(model, ids, loss_mask, attention_mask=None):
    """Next-token NLL of a batch of rows (B, T), averaged with the loss mask's weights (1 on the
    trained tokens, 0 elsewhere), in fp32. The build passes no attention mask: causal attention
    alone keeps every real token off the pads, which come last in each row (same loss)."""
    import torch

    logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
    ).view_as(loss_mask[:, 1:])  # (B, T-1)
    return (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()


def train_step(model, opts, ids, loss_mask):
    """One pretraining step: pretraining_loss, gradients clipped to norm 1.0, one step of every
    optimizer. Returns the loss; the caller steps the learning-rate schedules."""
    import torch

    loss = pretraining_loss(model, ids, loss_mask)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for opt in opts:
        opt.step()
    return loss


def build(args: toy.Args) -> dict:
    """Build data, tokenizer and base model under args.out; return the build report (also
    written to base/build.json)."""
    import torch
    from tqdm import tqdm

    r = recipe(args)
    steps, batch = r["steps"], r["batch"]
    if args.threads:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed)
    t0 = time.time()

    train, test = toy.make_splits(args.seed, args.n_train, args.n_test, args.max_value, args.max_arg)
    data_dir, model_dir = os.path.join(args.out, "data"), os.path.join(args.out, "base")
    fields = ("problem", "answer")
    utils.write_jsonl(os.path.join(data_dir, "train.jsonl"), [{k: p[k] for k in fields} for p in train])
    utils.write_jsonl(os.path.join(data_dir, "test.jsonl"), [{k: p[k] for k in fields} for p in test])

    rng = random.Random(args.seed + 1)
    tokenizer = toy_tokenizer(train)
    model = make_model(tokenizer, r)
    n_params = sum(p.numel() for p in model.parameters())
    utils.print0(f"toy: {args.preset} model, {n_params / 1e6:.2f}M parameters, {steps} steps")

    opts = optimizers(model, r)
    warmup, floor = max(1, int(steps * r["warmup"] + 1e-9)), r["min_lr"]

    def lr_at(step):  # linear warmup, cosine to min_lr (a share of the peak)
        if step < warmup:
            return (step + 1) / warmup
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    # every step's documents, drawn and tokenized once
    texts = document_texts(tokenizer, train, rng, steps * batch, args.slip, args.mu_frac, args.note_frac,
                           args.retry_frac, args.recall_frac)
    docs = encode_documents(tokenizer, texts)
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lr_at) for opt in opts]
    os.makedirs(args.out, exist_ok=True)
    model.train()
    t_train = time.time()
    with open(os.path.join(args.out, "train_log.jsonl"), "w") as log:
        for step in tqdm(range(steps), desc="toy pretrain", disable=not utils.is_main()):
            rows = docs[step * batch:(step + 1) * batch]
            ids, _, loss_mask = collate(rows, args.pack, tokenizer.pad_token_id, balance=True)  # (R, T) each
            loss = train_step(model, opts, ids, loss_mask)
            for sched in scheds:
                sched.step()
            if step % 25 == 0 or step == steps - 1:
                lr = scheds[0].get_last_lr()[0]
                log.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr}) + "\n")
                log.flush()

    train_s = time.time() - t_train
    model.eval()
    with utils.atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    fields = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("out", "threads", "eval_samples")}
    report = {"fingerprint": toy.fingerprint(args), **fields, "steps": steps, "params": n_params, "recipe": r,
              "train_seconds": round(train_s, 1), "build_seconds": round(time.time() - t0, 1)}
    if args.eval_samples:
        test_path = os.path.join(data_dir, "test.jsonl")
        report.update(evaluate_base(model_dir, test_path, args.eval_samples, args.seed))
        report["eval_seconds"] = round(time.time() - t0 - report["build_seconds"], 1)
    utils.write_json(os.path.join(model_dir, "build.json"), report)
    return report


def evaluate_base(model_dir: str, test_path: str, n: int, seed: int) -> dict:
    """pass@1 and pass@n of the base model at temperature 1.0 on the test split. The engine runs
    eager (no torch.compile warm-up, which costs more than it saves on one batch of a tiny model)
    and takes up to 2048 samples in one batch (max_num_seqs; vLLM's CPU default is 256), so that
    the default 256 problems x 8 samples decode at once, not in waves."""
    import numpy as np

    records = utils.read_records(test_path, ["problem", "answer"])
    sampler = sampling.Sampler(model_dir, seed=seed, enforce_eager=True,
                               max_num_seqs=min(2048, max(1, len(records) * n)))
    prompts = [utils.build_prompt(sampler.tokenizer, r["problem"]) for r in records]
    outs = sampler.generate(prompts, n=n, temperature=1.0, max_tokens=160, seed=seed)
    correct = np.array([[utils.grade(s.text, r["answer"]) for s in group] for group, r in zip(outs, records)])
    c = correct.sum(1)
    pass1 = float(correct.mean())
    passn = float((c > 0).mean())
    return {"pass@1": round(pass1, 4), f"pass@{n}": round(passn, 4),
            "mean_tokens": round(float(np.mean([s.num_tokens for g in outs for s in g])), 1)}


if __name__ == "__main__":
    args = utils.parse_args(toy.Args)
    report = utils.run_main(build, args)
    utils.print0(json.dumps(report, indent=2))
