"""bench/restart_steps.py: where a backtrack model restarts, and how often each restart works.

grpo.py's held-out accuracy is one number; this splits it by the step the continuation
restarts at (the k of "Step k:" after the cue). It uses grpo.py's own pieces: z0 from the
model (cut at the marker, `sampling.sample_z0`), then continuations after the backtrack cue
(`grpo.rollout`, outcome = grade of z2). Comparing models side by side (a warmstart start, an
RL end point, bench/rl_headroom.py's oracle start) shows which restarts a model prefers and
which ones pay, e.g. whether RL has moved the restarts to "Step 1" (a fresh second attempt).

    python bench/restart_steps.py runs/warmstart/model runs/grpo/mrt/model
    python bench/restart_steps.py M --problems 128 --samples 4 --seed 0
    python bench/restart_steps.py runs/toy/base --forced 256   # and the teacher-forced check

`--forced N` adds a teacher-forced check on N toy documents (toy_pretrain's retry layout: a slipped
attempt, a cue line, the attempt redone from a random Step k on the attempt's value after step
k-1), once with the backtrack marker as the cue line and once with a toy_pretrain.RETRY_LINES line: for
each field of the redone first line ("Step k: v op a = r") and for the lines after it, the
share the model predicts exactly (argmax). It tells which part of a restart a model cannot
write even when told where to restart (k itself is random, so its own share is chance).
"""

from __future__ import annotations

import argparse
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import toy  # noqa: E402
import utils  # noqa: E402
import toy_pretrain  # noqa: E402


def by_restart_step(rows: list[dict], z0_correct: dict) -> dict:
    """{"all": .., "z0_wrong": .., "steps": {k: {"n", "acc"}}} from grpo.rollout rows; k is the
    restart step, "none" when the continuation did not parse into episodes."""
    def acc(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    steps: dict = {}
    for r in rows:
        k = str(r["episodes"].restart_step) if r["episodes"] else "none"
        steps.setdefault(k, []).append(r["outcome"])
    return {"all": acc([r["outcome"] for r in rows]),
            "z0_wrong": acc([r["outcome"] for r in rows if not z0_correct[r["problem"]["id"]]]),
            "steps": {k: {"n": len(v), "acc": acc(v)} for k, v in sorted(steps.items(), key=lambda kv: (len(kv[0]), kv[0]))}}


FIELDS = toy.STEP_FIELDS


def token_fields(completion: str, offsets: list[tuple[int, int]]) -> list[str | None]:
    """The field of each token of a completion that opens with a step line, from the token's
    (start, end) character offsets: the FIELDS group its last character falls in, "later" past
    the first line, None for the line's other characters ("Step", ":", " =")."""
    m = toy.STEP_LINE.match(completion)
    if m is None:
        raise ValueError(f"restart_steps: completion does not open with a step line: {completion[:40]!r}")
    spans = [m.span(i + 1) for i in range(len(FIELDS))]
    out = []
    for start, end in offsets:
        if start >= m.end():
            out.append("later")
        else:
            out.append(next((f for f, (a, b) in zip(FIELDS, spans) if a <= end - 1 < b), None))
    return out


def forced_accuracy(model_dir: str, n: int, cue: str, seed: int) -> dict:
    """{field: share of documents whose field the model predicts exactly} over n toy retry
    documents (the test problems of the model's toy build: toy.build_splits) whose cue line is
    replaced by `cue`; "later" is per token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, test = toy.build_splits(model_dir)
    rng, hits = random.Random(seed), {f: [] for f in FIELDS + ("later",)}
    for p in (test * (n // len(test) + 1))[:n]:
        head, completion = toy_pretrain.pretraining_example(p, rng, toy.Args.slip, mu_frac=0.0, retry_frac=1.0)
        head = head[: head.rstrip("\n").rfind("\n") + 1] + cue + "\n"  # swap the retry line for the cue
        ctx = tok(utils.build_prompt(tok, p["problem"]) + head)["input_ids"]
        enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([ctx + enc["input_ids"]])
        with torch.no_grad():
            pred = model(input_ids=ids).logits[0, len(ctx) - 1:-1].argmax(-1)  # (T_completion,)
        right = (pred == torch.tensor(enc["input_ids"])).tolist()
        fields = token_fields(completion, enc["offset_mapping"])
        for f in FIELDS:
            hits[f].append(all(r for r, g in zip(right, fields) if g == f))
        hits["later"] += [r for r, g in zip(right, fields) if g == "later"]
    return {f: round(sum(v) / len(v), 4) for f, v in hits.items() if v}


def grpo_args(model: str, samples: int):
    """grpo.py's resolved arguments for sampling z0 and continuations as grpo.py does (toy preset,
    --variant outcome: no meta-prover), `samples` continuations per problem; the micro-batch, unused
    here (nothing trains), is one group so that any --samples resolves. tests/test_bench.py builds
    them, so a renamed grpo.py flag fails the suite."""
    import grpo

    return grpo.resolve_args(grpo.Args(preset="toy", model=model, variant="outcome", group_size=samples,
                                       micro_batch_size=samples), 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="backtrack-format model folders")
    p.add_argument("--data", default="", help="held-out problems ('' : the toy test split)")
    p.add_argument("--problems", type=int, default=128, help="held-out problems")
    p.add_argument("--samples", type=int, default=4, help="continuations per problem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forced", type=int, default=0, help="toy documents for the teacher-forced check (0: skip it)")
    p.add_argument("--out", default="runs/bench/restart_steps.json", help="JSON with every model's breakdown")
    a = p.parse_args()

    import grpo
    import sampling

    for model in a.models:  # every argument checked before any work
        if not os.path.isdir(model):
            raise utils.UserError(f"restart_steps: no such model folder: {model}")
    resolved = {model: grpo_args(model, a.samples) for model in a.models}
    data = a.data or toy.ensure_built()["test"]
    report = {}
    for model, args in resolved.items():
        sampler = sampling.Sampler(model, seed=a.seed)
        problems = utils.load_problems(data, limit=a.problems, tokenizer=sampler.tokenizer,
                                       max_prompt_tokens=args.max_prompt_length)
        z0s, _ = sampling.sample_z0(sampler, problems, temperature=args.temperature, top_p=args.top_p,
                                    max_tokens=args.max_tokens, seed_parts=(a.seed, "z0", "test"))  # as grpo.py
        problems = [p for p in problems if p["id"] in z0s]  # those with no usable z0 are dropped, as in grpo.py
        z0_correct = {p["id"]: utils.grade(z0s[p["id"]], p["answer"]) for p in problems}
        rows = grpo.rollout(sampler, problems, z0s, args, utils.derive_seed(a.seed, "rollout"))
        report[model] = {"z0_acc": round(sum(z0_correct.values()) / len(problems), 4), **by_restart_step(rows, z0_correct)}
        del sampler
        r = report[model]
        if a.forced:
            r["forced"] = {name: forced_accuracy(model, a.forced, cue, a.seed)
                           for name, cue in (("marker", utils.BACKTRACK_MARKER), ("retry", toy_pretrain.RETRY_LINES[0]))}
            for name, acc in r["forced"].items():
                print(f"{model}: teacher-forced after the {name} line: " + ", ".join(f"{k} {v}" for k, v in acc.items()))
        print(f"{model}: z0 {r['z0_acc']:.3f}  z2 {r['all']:.3f}  z2 | z0 wrong {r['z0_wrong']}  by restart step "
              + ", ".join(f"{k}: {v['acc']} (n={v['n']})" for k, v in r["steps"].items()), flush=True)
    utils.write_json(a.out, {"problems": a.problems, "samples": a.samples, "seed": a.seed, "forced": a.forced, "models": report})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    utils.run_main(main)  # a grpo.py argument error (e.g. --samples 1) is one line, exit 2
