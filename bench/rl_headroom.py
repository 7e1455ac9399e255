"""bench/rl_headroom.py: does MRT-B RL raise held-out accuracy when the start model can
already write a correct revised attempt now and then?

With the toy's previous base (`python toy.py --retry-frac 0 --steps 1000`, no revision
documents), `python grpo.py` did not raise held-out accuracy: after z0 and the backtrack
cue that base wrote a correct revised attempt z2 in about 1% of cases, so the outcome reward
was almost always 0. This script separates such a limit of the start model from the RL code (it uses the
current toy base, built by `python toy.py`). It builds a second start model whose z2 is
more often right, by SFT on *oracle* backtrack traces, which only a toy task with known
solution steps allows:

    z0  an attempt sampled from the toy base (as grpo.py samples z0)
    z1  "\\n" + marker + "\\n" + the true "Step k: ..." line, k = z0's first wrong line
        (a random k when z0 is right)
    z2  the true remaining steps and the boxed answer

mixed with the same share of plain true solutions (so the SFT does not wipe out the base's
step-by-step solving). Then it runs grpo.py (same arguments, toy preset) from each start
model and prints held-out accuracy at the start and the end of RL, side by side.

This is a diagnostic, not a stage of MRT: the oracle traces use the toy's ground truth,
which no real data set gives in this form (the paper's warmstart builds traces by beam
search, warmstart.py).

    python bench/rl_headroom.py                      # base and oracle starts (~25 min on 2 cores)
    python bench/rl_headroom.py --starts oracle      # the oracle start only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def oracle_examples(problems: list[dict], attempts: list[str], tokenizer, rng: random.Random, mix: float,
                    marker: str) -> list[tuple[str, str]]:
    """(context, completion) pairs: prompt + z0 -> z1 + z2 from the true steps, and, with
    probability `mix` per trace, prompt -> the true solution."""
    import toy
    import utils

    out = []
    for p, z0 in zip(problems, attempts):
        true, final = toy.solution_steps(p["start"], p["ops"])
        got = z0.split("\n")
        k = next((i for i, line in enumerate(true) if i >= len(got) or got[i] != line), len(true))
        if k == len(true):  # a right attempt: restart anywhere, the same answer follows
            k = rng.randrange(len(true))
        prompt = utils.build_prompt(tokenizer, p["problem"])
        out.append((prompt + z0, "\n" + marker + "\n" + toy.render_solution(true[k:], final)))
        if rng.random() < mix:
            out.append((prompt, toy.render_solution(true, final)))
    return out


def build_oracle(a) -> str:
    """SFT the toy base on oracle traces; returns the model folder (reused if present)."""
    import torch

    import sampling
    import toy
    import training
    import utils

    out = os.path.join(a.work, "oracle-model")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    paths = toy.ensure_built()
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    train = toy.build_splits(paths["base"])[0][: a.traces]  # the built toy's own training problems
    sampler = sampling.Sampler(paths["base"], seed=a.seed)
    tok = sampler.tokenizer
    prompts = [utils.build_prompt(tok, p["problem"]) for p in train]
    attempts = [g[0].text for g in sampler.generate(prompts, n=1, temperature=1.0, max_tokens=160, seed=a.seed)]
    del sampler
    examples = oracle_examples(train, attempts, tok, rng, a.mix, utils.BACKTRACK_MARKER)
    model = utils.load_model(paths["base"], "auto", "cpu")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    B, t0 = a.batch, time.time()
    for epoch in range(a.epochs):
        rng.shuffle(examples)
        for i in range(0, len(examples) - B + 1, B):
            seqs, masks = [], []
            for ctx, comp in examples[i:i + B]:
                c = tok(ctx)["input_ids"]
                y = tok(comp, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                seqs.append(c + y)
                masks.append([0] * len(c) + [1] * len(y))
            ids, attn = training.pad_sequences(seqs, tok.pad_token_id)  # (B, T)
            loss_mask = training.pad_sequences(masks, 0)[0][:, 1:].float()  # (B, T-1)
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                                    reduction="none").view_as(loss_mask)
            loss = (nll * loss_mask).sum() / loss_mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        print(f"oracle SFT epoch {epoch + 1}/{a.epochs}: loss {loss.item():.3f} ({time.time() - t0:.0f}s, "
              f"{len(examples)} examples)", flush=True)
    model.eval()
    with utils.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def grpo_argv(variant: str, model: str, paths: dict, out: str, seed: int) -> list[str]:
    """grpo.py's command-line flags for one start model (toy preset, the toy's data). tests/test_bench.py
    parses them with grpo.py's own parser, so a renamed grpo.py flag fails the suite."""
    return ["--preset", "toy", "--variant", variant, "--model", model, "--train-data", paths["train"],
            "--test-data", paths["test"], "--out", out, "--seed", str(seed)]


def run_grpo(a, name: str, model: str) -> dict:
    """grpo.py (toy preset, the toy's data) from `model`; held-out start/end from its log."""
    import toy

    paths = toy.ensure_built()
    out = os.path.join(a.work, f"grpo-{name}")
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (the oracle model is reused)
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), *grpo_argv(a.variant, model, paths, out, a.seed)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    evals = json.load(open(os.path.join(out, "eval.json")))
    return {"start": evals["start"], "end": evals["end"], "seconds": time.time() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/bench/rl_headroom", help="output folder")
    p.add_argument("--starts", default="base,oracle", help="start models to run grpo.py from: base, oracle")
    p.add_argument("--variant", default="mrt", help="grpo.py --variant")
    p.add_argument("--traces", type=int, default=2000, help="oracle traces (toy training problems)")
    p.add_argument("--mix", type=float, default=0.5, help="plain true solutions per oracle trace (probability)")
    p.add_argument("--epochs", type=int, default=3, help="oracle SFT passes")
    p.add_argument("--lr", type=float, default=1e-3, help="oracle SFT learning rate (constant)")
    p.add_argument("--batch", type=int, default=16, help="oracle SFT sequences per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, the SFT and grpo.py")
    a = p.parse_args()
    import toy

    starts = [s for s in a.starts.split(",") if s]
    if not starts or not set(starts) <= {"base", "oracle"}:
        p.error(f"--starts takes base and/or oracle, comma-separated, not {a.starts!r}")
    os.makedirs(a.work, exist_ok=True)
    results = {}
    for name in starts:
        model = toy.ensure_built()["base"] if name == "base" else build_oracle(a)
        results[name] = run_grpo(a, name, model)
    print(f"\ngrpo.py --variant {a.variant} (toy preset) on the toy: held-out accuracy of the revised attempt")
    for name, r in results.items():
        print(f"  start model {name:6s}  start {100 * r['start']:5.1f}%  end {100 * r['end']:5.1f}%  "
              f"({r['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
