"""bench/toy_build.py: where the toy's pretraining time goes, old pipeline against new, side by side.

Builds the preset's tokenizer and model as toy.build does (same seed), then times
optimizer steps of each pipeline on its own copy of the initial model, in interleaved rounds
(so that load from other work on the machine falls on every pipeline alike):

- old:      toy.encode_batch every step (HF tokenizer per document, `--pack` documents per row,
            rows padded to the longest, attention mask), fp32;
- old causal: the same batches without the attention mask (the pads come last in each row,
            so causal attention alone keeps every real token off them: same loss, same
            gradients), fp32 and under bf16 autocast (and with --compile, fp32 compiled);
- packed:   rows of --seq-len tokens built once up front (toy.pretraining_rows), no padding
            mask, fp32;
- packed+bf16: the same under bf16 autocast (toy.build does not use the packed pipelines:
  on equal steps they gave a worse base model);
- with --compile, also packed+bf16 with the model's forward under torch.compile (its compile
  time is printed apart).

Per pipeline it prints the time per step split into data (batch building; for the packed
pipelines the up-front build divided by the steps it fed), forward+backward and optimizer
(gradient clipping and AdamW), tokens per second (all positions, and real ones: not
padding), and achieved FLOP/s, estimated as (6 N + 6 L T d) per real position (N parameters,
the tied embedding counted once, L layers, T row length, d hidden size: matrix products plus causal
attention, forward and backward).

    python bench/toy_build.py                       # default preset, 2 rounds of 10 steps
    python bench/toy_build.py --steps 5 --rounds 3 --threads 1 --compile
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def flops_per_position(model, seq_len: int) -> float:
    """6 N + 6 L T d: training FLOPs per position of a causal decoder (N parameters: the
    embedding is tied to the output layer, so it counts once, as that layer's product)."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 6 * cfg.num_hidden_layers * seq_len * cfg.hidden_size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", help="toy.py preset (model sizes, rows per step)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per pipeline per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (the first step of each pipeline is a warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--pack", type=int, default=3, help="documents per row of the old pipeline")
    p.add_argument("--old-batch", type=int, default=32, help="documents per step of the old pipeline")
    p.add_argument("--seq-len", type=int, default=384, help="row length of the packed pipelines")
    p.add_argument("--rows", type=int, default=10, help="rows per step of the packed pipelines")
    p.add_argument("--compile", action="store_true", help="also time packed+bf16 under torch.compile")
    a = p.parse_args()

    import torch

    import toy
    import utils

    if a.threads:
        torch.set_num_threads(a.threads)
    args = toy.Args(preset=a.preset)
    seq_len = a.seq_len
    preset = toy.PRESETS[a.preset]
    utils.seed_everything(args.seed)
    train, _ = toy.make_splits(args.seed, args.n_train, args.n_test)
    tok = toy.toy_tokenizer(train)
    model0 = toy.make_model(tok, preset)
    n_steps = a.rounds * (a.steps + 1)
    rows = a.rows

    t = time.perf_counter()
    ids, loss_mask = toy.pretraining_rows(tok, train, random.Random(args.seed + 1), n_steps * rows, seq_len, args.slip,
                                          args.mu_frac, args.note_frac, args.retry_frac)  # (steps * rows, T) each
    packed_build = time.perf_counter() - t
    print(f"threads {torch.get_num_threads()}; packed rows: {n_steps * rows} x {seq_len} built in {packed_build:.2f} s; "
          f"old: {a.old_batch} documents per step, {a.pack} per row", flush=True)

    def packed_batches():
        for s in range(n_steps):
            yield 0.0, ids[s * rows:(s + 1) * rows], None, loss_mask[s * rows:(s + 1) * rows]

    def old_batches():
        rng = random.Random(args.seed + 1)
        for _ in range(n_steps):
            t0 = time.perf_counter()
            batch = [train[rng.randrange(len(train))] for _ in range(a.old_batch)]
            x, attn, m = toy.encode_batch(tok, batch, rng, args.slip, args.mu_frac, args.note_frac, a.pack,
                                          args.retry_frac)
            yield time.perf_counter() - t0, x, attn, m

    # name: (batches, attention mask passed, bf16 autocast). "old" is toy.build's loss before the packed
    # pipeline (with the mask); the others leave it out (pads come last in each row: same loss)
    variants = {"old": (old_batches(), True, False), "old causal": (old_batches(), False, False),
                "old causal+bf16": (old_batches(), False, True),
                "packed": (packed_batches(), False, False),
                "packed+bf16": (packed_batches(), False, True)}
    if a.compile:
        variants["old causal+compile"] = (old_batches(), False, False)
        variants["packed+bf16+compile"] = (packed_batches(), False, True)
    state = {}
    for name, (batches, masked, bf16) in variants.items():
        model = copy.deepcopy(model0).train()
        if name.endswith("compile"):
            model.forward = torch.compile(model.forward)
        opt = torch.optim.AdamW(model.parameters(), lr=preset["lr"], betas=(0.9, 0.95), weight_decay=0.1)
        state[name] = dict(model=model, opt=opt, batches=batches, masked=masked, bf16=bf16,
                           data=0.0, fb=0.0, opt_s=0.0, steps=0, positions=0, real=0, flops=0.0, first=None)

    for _ in range(a.rounds):
        for name, st in state.items():
            for i in range(a.steps + 1):
                data_s, x, attn, m = next(st["batches"])
                t0 = time.perf_counter()
                loss = toy.pretraining_loss(st["model"], x, m, st["bf16"], attention_mask=attn if st["masked"] else None)
                st["opt"].zero_grad(set_to_none=True)
                loss.backward()
                t1 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(st["model"].parameters(), 1.0)
                st["opt"].step()
                t2 = time.perf_counter()
                if i == 0:  # warm-up step (for compile: the compilation)
                    if st["first"] is None:
                        st["first"] = t2 - t0
                    continue
                real = int(attn.sum()) if attn is not None else int((x != tok.pad_token_id).sum())
                st["data"] += data_s
                st["fb"] += t1 - t0
                st["opt_s"] += t2 - t1
                st["steps"] += 1
                st["positions"] += x.numel()
                st["real"] += real
                st["flops"] += real * flops_per_position(st["model"], x.shape[1])

    print(f"{'pipeline':22s} {'data ms':>8s} {'fwd+bwd ms':>11s} {'opt ms':>7s} {'step ms':>8s} {'tok/s':>7s} "
          f"{'real tok/s':>10s} {'GFLOP/s':>8s} {'real ms/1k tok':>14s}")
    base = None
    for name, st in state.items():
        n = st["steps"]
        data = st["data"] / n if name.startswith("old") else packed_build / n_steps
        step = data + (st["fb"] + st["opt_s"]) / n
        per_k = 1000 * step / (st["real"] / n / 1000)
        base = base or per_k
        print(f"{name:22s} {1000 * data:8.1f} {1000 * st['fb'] / n:11.1f} {1000 * st['opt_s'] / n:7.1f} {1000 * step:8.1f} "
              f"{st['positions'] / n / step:7.0f} {st['real'] / n / step:10.0f} {st['flops'] / n / step / 1e9:8.1f} "
              f"{per_k:14.1f}  (x{base / per_k:.2f} of old per real token; first step {st['first']:.1f} s)")


if __name__ == "__main__":
    main()
