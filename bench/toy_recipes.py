"""bench/toy_recipes.py: time per pretraining step of toy.py recipes, side by side.

Each recipe is toy.py's default preset with overrides (name=value pairs: batch, hidden, layers,
heads, inter, bf16, mask, pretok, balance, optimizer, muon_ns, prompt_weight; and compile=1, this bench's
own: the model's forward under torch.compile with dynamic shapes, which toy.py does not offer).
Every recipe trains its own model from the same seed on the same document stream, one step of
each recipe in turn, so that load from other work on the machine falls on every recipe alike.
Prints the median ms per step, ms per document, and each ratio against the first recipe (the
default preset as it is: step time / recipe's step time) and the seconds of each recipe's first
(warm-up, untimed) step, where a compiled recipe compiles; with --profile N, then each recipe's
operators by self time over N more steps (torch.profiler).

    python bench/toy_recipes.py "" "optimizer=adamw" "pretok=0 balance=0 mask=1 optimizer=adamw"
    python bench/toy_recipes.py "" "bf16=1" --steps 6 --profile 6   # and each one's top operators
    python bench/toy_recipes.py "" "compile=1" --steps 40            # torch.compile: step and compile time
    python bench/toy_recipes.py "muon_ns=bf16" "muon_ns=fp32" "muon_ns=rounded"   # Muon's Newton-Schulz precision
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_recipe(text: str) -> dict:
    """{field: value} from "name=value ..." (ints; bf16, mask, pretok, balance and compile as 0/1;
    optimizer and muon_ns names; prompt_weight a number)."""
    out = {}
    for kv in text.split():
        k, v = kv.split("=")
        if k in ("bf16", "mask", "pretok", "balance", "compile"):
            out[k] = bool(int(v))
        elif k in ("optimizer", "muon_ns"):
            out[k] = v
        elif k == "prompt_weight":
            out[k] = float(v)
        else:
            out[k] = int(v)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="+", help='overrides of the default preset, e.g. "batch=16 bf16=1 mask=0"')
    p.add_argument("--steps", type=int, default=24, help="timed steps per recipe (taken round robin, one step of each recipe in turn)")
    p.add_argument("--profile", type=int, default=0,
                   help="then profile this many more steps of each recipe (torch.profiler) and print its top operators")
    a = p.parse_args()

    import torch

    import toy
    import utils

    args = toy.Args()
    utils.seed_everything(args.seed)
    train, _ = toy.make_splits(args.seed, args.n_train, args.n_test, args.max_value, args.max_arg)
    tok = toy.toy_tokenizer(train)
    n_steps = a.steps + 1 + a.profile

    state = []
    for text in a.recipes:
        r = {**toy.RECIPE_DEFAULTS, **toy.PRESETS["default"], **parse_recipe(text)}
        torch.manual_seed(args.seed)
        model = toy.make_model(tok, r).train()
        opts = toy.optimizers(model, r)
        if r.get("compile"):
            model.forward = torch.compile(model.forward, dynamic=True)
        t = time.perf_counter()
        docs = toy.encode_documents(tok, toy.document_texts(tok, train, random.Random(1), n_steps * r["batch"], args.slip,
                                                            args.mu_frac, args.note_frac, args.retry_frac,
                                                            args.recall_frac), r["prompt_weight"])
        pre = time.perf_counter() - t
        state.append(dict(name=text or "default", r=r, rng=random.Random(1), model=model, opts=opts, docs=docs, pre=pre, i=0, times=[],
                          params=sum(q.numel() for q in model.parameters())))

    def step(st):  # one optimizer step of a recipe; returns its seconds
        r, b = st["r"], st["r"]["batch"]
        t0 = time.perf_counter()
        if r["pretok"]:
            ids, attn, m = toy.collate(st["docs"][st["i"] * b:(st["i"] + 1) * b], 3, tok.pad_token_id, r["balance"])
        else:  # toy.build's per-step encoding
            batch = [train[st["rng"].randrange(len(train))] for _ in range(b)]
            ids, attn, m = toy.encode_batch(tok, batch, st["rng"], args.slip, args.mu_frac, args.note_frac, 3,
                                            args.retry_frac, args.recall_frac)
        st["i"] += 1
        toy.train_step(st["model"], st["opts"], ids, attn, m, r)
        return time.perf_counter() - t0

    for st in state:  # warm-up (a compiled recipe compiles here)
        st["first"] = step(st)
    for _ in range(a.steps):  # round robin, one step each, so that load falls on all alike
        for st in state:
            st["times"].append(step(st))

    import statistics

    for st in state:
        st["t"], st["n"] = statistics.median(st["times"]), 1
    base = state[0]
    bstep, bdoc = base["t"] / base["n"], base["t"] / base["n"] / base["r"]["batch"]
    print(f"threads {torch.get_num_threads()}")
    print(f"{'recipe':40s} {'params':>7s} {'ms/step':>8s} {'ms/doc':>7s} {'x step':>7s} {'x doc':>6s} {'first s':>8s}")
    for st in state:
        per_step = st["t"] / st["n"]
        doc = per_step / st["r"]["batch"]
        print(f"{st['name']:40s} {st['params'] / 1e6:6.2f}M {1000 * per_step:8.1f} {1000 * doc:7.2f} {bstep / per_step:7.2f} "
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
