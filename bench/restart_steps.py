"""bench/restart_steps.py: where a backtrack model restarts, and how often each restart works.

grpo.py's held-out accuracy is one number; this splits it by the step the continuation
restarts at (the k of "Step k:" after the cue). It uses grpo.py's own pieces: z0 from the
model (cut at the marker, `grpo.sample_z0`), then continuations after the backtrack cue
(`grpo.rollout`, outcome = grade of z2). Comparing models side by side (a warmstart start, an
RL end point, bench/rl_headroom.py's oracle start) shows which restarts a model prefers and
which ones pay, e.g. whether RL has moved the restarts to "Step 1" (a fresh second attempt).

    python bench/restart_steps.py runs/warmstart/model runs/grpo/mrt/model
    python bench/restart_steps.py M --problems 128 --samples 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="backtrack-format model folders")
    p.add_argument("--data", default="", help="held-out problems ('' : the toy test split)")
    p.add_argument("--problems", type=int, default=128, help="held-out problems")
    p.add_argument("--samples", type=int, default=4, help="continuations per problem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench/restart_steps.json", help="JSON with every model's breakdown")
    a = p.parse_args()

    import grpo
    import toy
    import utils

    data = a.data or toy.ensure_built()["test"]
    report = {}
    for model in a.models:
        if not os.path.isdir(model):
            raise SystemExit(f"restart_steps: no such model folder: {model}")
        args = grpo.resolve_args(grpo.Args(preset="toy", model=model, variant="outcome", group_size=a.samples), 1)
        sampler = utils.Sampler(model, seed=a.seed)
        problems = grpo.load_problems(data, args, sampler.tokenizer)[:a.problems]
        z0s = grpo.sample_z0(sampler, problems, args, a.seed)
        z0_correct = {p["id"]: utils.grade(z0s[p["id"]], p["answer"]) for p in problems}
        rows = grpo.rollout(sampler, problems, z0s, args, a.seed + 1)
        report[model] = {"z0_acc": round(sum(z0_correct.values()) / len(problems), 4), **by_restart_step(rows, z0_correct)}
        del sampler
        r = report[model]
        print(f"{model}: z0 {r['z0_acc']:.3f}  z2 {r['all']:.3f}  z2 | z0 wrong {r['z0_wrong']}  by restart step "
              + ", ".join(f"{k}: {v['acc']} (n={v['n']})" for k, v in r["steps"].items()), flush=True)
    utils.write_json(a.out, {"problems": a.problems, "samples": a.samples, "seed": a.seed, "models": report})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
