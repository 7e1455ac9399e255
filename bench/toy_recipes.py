"""bench/toy_recipes.py: time per pretraining step of toy recipes, side by side.

Each recipe is toy_pretrain.py's default preset and recipe with overrides, name=value pairs:
the sizes batch, hidden, layers, heads, inter; the peak rates lr and muon_lr; and the
alternatives the build does not take, each 0/1 unless named:

- pretok (1, the build's): every document drawn and tokenized once before training; 0 encodes
  each step's batch when it comes (toy_pretrain.encode_batch);
- balance (1, the build's): rows balanced in length (toy_pretrain.collate); 0: `pack`
  consecutive documents per row;
- mask (0, the build's): pass the attention mask (the pads come last in each row, so causal
  attention alone gives the same loss);
- bf16: the forward under bf16 autocast (fp32 weights and optimizer);
- optimizer: muon (the build's: Muon on the decoder matrices, AdamW on the rest) or adamw (AdamW
  on every parameter);
- muon_ns: the precision of Muon's Newton-Schulz iteration: bf16 (torch.optim.Muon, the build's),
  fp32, or rounded (fp32 products, each result rounded to bf16: bf16's precision at fp32's speed
  on a CPU that emulates bf16 products), the last two this bench's own Muon (`muon`);
- prompt_weight: the weight of a document's prompt tokens (after BOS) in the loss, against 1 for
  its completion's (0, the build's);
- compile: the model's forward under torch.compile with dynamic shapes.

Every recipe trains its own model from the same seed on the same document stream, one step of
each recipe in turn, so that load from other work on the machine falls on every recipe alike.
Prints the median ms per step, ms per document, and each ratio against the first recipe (step
time / recipe's step time) and the seconds of each recipe's first (warm-up, untimed) step, where
a compiled recipe compiles; with --profile N, then each recipe's operators by self time over N
more steps (torch.profiler).

    python bench/toy_recipes.py "" "optimizer=adamw" "pretok=0 balance=0 mask=1 optimizer=adamw"
    python bench/toy_recipes.py "" "bf16=1" --steps 6 --profile 6   # and each one's top operators
    python bench/toy_recipes.py "" "compile=1" --steps 40            # torch.compile: step and compile time
    python bench/toy_recipes.py "" "muon_ns=fp32" "muon_ns=rounded"  # Muon's Newton-Schulz precision
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = ("bf16", "mask", "pretok", "balance", "compile")
"""Recipe fields written 0/1."""
RATES = ("lr", "muon_lr", "prompt_weight")
"""Recipe fields written as numbers."""
SIZES = ("batch", "hidden", "layers", "heads", "inter")
"""Recipe fields written as whole numbers."""
CHOICES = {"optimizer": ("muon", "adamw"), "muon_ns": ("bf16", "fp32", "rounded")}
"""Recipe fields written as names, and the names each takes."""
BUILD = dict(pretok=True, balance=True, mask=False, bf16=False, optimizer="muon", muon_ns="bf16", prompt_weight=0.0,
             compile=False)
"""The build's value of each alternative (toy_pretrain.build)."""


def parse_recipe(text: str) -> dict:
    """The full recipe of "name=value ...": toy_pretrain's default preset and schedule, BUILD,
    then the overrides. An unknown name or a value of the wrong kind is a ValueError naming it."""
    import toy_pretrain

    out = {**toy_pretrain.SCHEDULE, **toy_pretrain.PRESETS["default"], **BUILD}
    for kv in text.split():
        k, _, v = kv.partition("=")
        try:
            if k in FLAGS and v in ("0", "1"):
                out[k] = v == "1"
            elif k in RATES:
                out[k] = float(v)
            elif k in SIZES:
                out[k] = int(v)
            elif v in CHOICES.get(k, ()):
                out[k] = v
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"recipe {text!r}: bad field {kv!r} (fields: {', '.join(FLAGS + RATES + SIZES + tuple(CHOICES))}; "
                             f"{', '.join(f'{k} one of {v}' for k, v in CHOICES.items())}; flags 0 or 1)") from None
    return out


def newton_schulz(g, ns: str = "bf16", steps: int = 5, eps: float = 1e-7):
    """Muon's orthogonalization of a 2-D update g (rows <= columns after a transpose): g / ||g||_F,
    then `steps` quintic Newton-Schulz iterations X <- aX + (bA + cA^2)X, A = XX^T, with Keller
    Jordan's coefficients (a, b, c) = (3.4445, -4.7750, 2.0315). Its singular values end near, not
    at, 1 (about 0.5-1.5 by design). ns: "bf16" computes in bf16, torch.optim.Muon's iteration op
    for op; "fp32" in fp32; "rounded" in fp32 with every result rounded to bf16."""
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
    """Muon on 2-D parameters as torch.optim.Muon computes it, with the Newton-Schulz iteration's
    precision a choice (newton_schulz's ns): per step, buf <- lerp(buf, grad, 1 - momentum), the
    Nesterov update lerp(grad, buf, momentum) orthogonalized, p <- p (1 - lr wd) - lr sqrt(max(1,
    rows/cols)) update. With ns "bf16" its steps equal torch.optim.Muon's bit for bit
    (tests/test_toy.py)."""
    import torch

    class Muon(torch.optim.Optimizer):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.lerp_(p.grad, 1 - momentum)
                    update = newton_schulz(p.grad.lerp(buf, momentum), ns)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update, alpha=-group["lr"] * math.sqrt(max(1, p.size(0) / p.size(1))))

    return Muon(params, dict(lr=lr, weight_decay=weight_decay))


def optimizers(model, r: dict) -> list:
    """A recipe's optimizers: the build's (toy_pretrain.optimizers) for optimizer muon and muon_ns
    bf16; AdamW alone for optimizer adamw; this bench's `muon` at the other precisions."""
    import torch

    import toy_pretrain

    if r["optimizer"] == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.95), weight_decay=0.1)]
    opts = toy_pretrain.optimizers(model, r)
    if r["muon_ns"] != "bf16":
        opts[1] = muon(toy_pretrain.muon_matrices(model), lr=r["muon_lr"], weight_decay=0.1, ns=r["muon_ns"])
    return opts


def weigh_prompts(docs: list[tuple[list[int], list[int]]], weight: float) -> list[tuple[list[int], list[float]]]:
    """Encoded documents (toy_pretrain.encode_documents) with loss weight `weight` on their prompt
    tokens after BOS (the mask's 0 entries but the first) instead of 0."""
    return [(ids, [m[0]] + [x or weight for x in m[1:]]) for ids, m in docs]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="+", help='overrides of the build\'s recipe, e.g. "batch=16 bf16=1 mask=1"')
    p.add_argument("--steps", type=int, default=24, help="timed steps per recipe (taken round robin, one step of each recipe in turn)")
    p.add_argument("--profile", type=int, default=0,
                   help="then profile this many more steps of each recipe (torch.profiler) and print its top operators")
    a = p.parse_args()
    try:
        recipes = [parse_recipe(text) for text in a.recipes]
    except ValueError as e:
        sys.exit(f"toy_recipes: {e}")

    import torch

    import toy
    import toy_pretrain
    import utils

    args = toy.Args()
    utils.seed_everything(args.seed)
    train, _ = toy.make_splits(args.seed, args.n_train, args.n_test, args.max_value, args.max_arg)
    tok = toy_pretrain.toy_tokenizer(train)
    n_steps = a.steps + 1 + a.profile
    doc_args = (args.slip, args.mu_frac, args.note_frac, args.retry_frac, args.recall_frac)

    state = []
    for text, r in zip(a.recipes, recipes):
        torch.manual_seed(args.seed)
        model = toy_pretrain.make_model(tok, r).train()
        opts = optimizers(model, r)
        if r["compile"]:
            model.forward = torch.compile(model.forward, dynamic=True)
        t = time.perf_counter()
        docs = weigh_prompts(toy_pretrain.encode_documents(tok, toy_pretrain.document_texts(
            tok, train, random.Random(1), n_steps * r["batch"], *doc_args)), r["prompt_weight"])
        pre = time.perf_counter() - t
        state.append(dict(name=text or "default", r=r, rng=random.Random(1), model=model, opts=opts, docs=docs, pre=pre, i=0,
                          times=[], params=sum(q.numel() for q in model.parameters())))

    def step(st):  # one optimizer step of a recipe; returns its seconds
        r, b = st["r"], st["r"]["batch"]
        t0 = time.perf_counter()
        if r["pretok"]:
            ids, attn, m = toy_pretrain.collate(st["docs"][st["i"] * b:(st["i"] + 1) * b], args.pack, tok.pad_token_id,
                                                r["balance"])
        else:  # this step's batch encoded now
            batch = [train[st["rng"].randrange(len(train))] for _ in range(b)]
            slip, mu_frac, note_frac, retry_frac, recall_frac = doc_args
            ids, attn, m = toy_pretrain.encode_batch(tok, batch, st["rng"], slip, mu_frac, note_frac, args.pack,
                                                     retry_frac, recall_frac)
        st["i"] += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["bf16"]):
            loss = toy_pretrain.pretraining_loss(st["model"], ids, m, attn if r["mask"] else None)
        for opt in st["opts"]:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st["model"].parameters(), 1.0)
        for opt in st["opts"]:
            opt.step()
        return time.perf_counter() - t0

    for st in state:  # warm-up (a compiled recipe compiles here)
        st["first"] = step(st)
    for _ in range(a.steps):  # round robin, one step each, so that load falls on all alike
        for st in state:
            st["times"].append(step(st))

    base = statistics.median(state[0]["times"])
    print(f"threads {torch.get_num_threads()}")
    print(f"{'recipe':40s} {'params':>7s} {'ms/step':>8s} {'ms/doc':>7s} {'x step':>7s} {'x doc':>6s} {'first s':>8s}")
    for st in state:
        per_step = statistics.median(st["times"])
        doc, bdoc = per_step / st["r"]["batch"], base / state[0]["r"]["batch"]
        print(f"{st['name']:40s} {st['params'] / 1e6:6.2f}M {1000 * per_step:8.1f} {1000 * doc:7.2f} {base / per_step:7.2f} "
              f"{bdoc / doc:6.2f} {st['first']:8.1f}", flush=True)

    if a.profile:  # where a step's time goes, by operator (self time: matrix products, attention, elementwise, optimizer)
        from torch.profiler import ProfilerActivity, profile

        for st in state:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.profile):
                    step(st)
            print(f"\n{st['name']}: {a.profile} steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
