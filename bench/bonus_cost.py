"""bench/bonus_cost.py: what the information-gain bonus costs, MRT-B against outcome-only GRPO.

The same grpo.py run three ways in one process, on one vLLM engine: `outcome` (--variant
outcome, no meta-prover), `forced` (--variant mrt, forced mu) and `rollout` (--variant mrt,
--mu-mode rollout). Same seed, same sizes, same engine; each run samples z0 from the same base
weights with the same seed (the bench checks that the three z0.jsonl agree). The arms run one
after the other, in `--rounds` rounds with the order rotated each round, so that the load of a
shared machine falls on all of them alike; each run's first step (warm-up) is left out and the
median step of each arm is compared to the outcome arm's, and (steadier on a shared machine) each
MRT step to itself less mu's time, which is the outcome arm's work under the same load. Each
step is split from grpo.py's metrics.jsonl: policy
sampling (time_sample - time_mu), mu (time_mu), training (time_train less the weight sync,
timed here around sampler.sync_weights), sync, and the rest; plus mu's decoded tokens per
problem (mu_tokens_per_problem).

Sizes: `--size toy` is the toy preset (16 prompts x 8 per step, 128-token continuations,
m = 8, forced answers of up to 16 tokens, rollouts of up to 128); `--size realistic` is the
realistic-shape model of tests/realistic.py (Llama-3 vocabulary and chat template, built from
the toy base on first use) at paper lengths (1024-token continuations, G = 4, mu rollouts of up
to 1024 tokens), 2 prompts per step: its samples end where the model stops, so it measures the
shape's overheads, not a long-text workload.

`--levers` measures the meta-prover's levers on one rollout step of the toy base instead (no
training): the forced mu with and without the stop at its box's closing brace (gains must be
identical), the grading rule (the box the forced suffix opens against the last complete box:
how much the gains move), the forced and rollout mu at m = 4, 8, 16 (time, and the standard
error of I from a reference of --ref-m answers per context, against the spread of I within a
group).

    python bench/bonus_cost.py                      # toy, 5 steps per run, 1 round
    python bench/bonus_cost.py --steps 6 --rounds 2
    python bench/bonus_cost.py --levers
    python bench/bonus_cost.py --size realistic --steps 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as grpo.py: engine and trainer share the process

ARMS = ("outcome", "forced", "rollout")
SIZES = {  # grpo.py sizes per bench size (None: the toy preset's)
    "toy": dict(preset="toy", prompts_per_step=16, group_size=8, micro_batch_size=32, max_tokens=None,
                mu_max_tokens=16, mu_rollout_tokens=128),
    "realistic": dict(preset="paper", prompts_per_step=2, group_size=4, micro_batch_size=4, max_tokens=1024,
                      mu_max_tokens=16, mu_rollout_tokens=1024),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="toy")
    p.add_argument("--steps", type=int, default=5, help="steps per run (the first is left out)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each arm, order rotated per round")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--mu-samples", type=int, default=8, help="m of the MRT arms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bonus_cost"))
    p.add_argument("--toy", default=os.environ.get("MRT_TOY_DIR", ""), help="toy build folder ('' : runs/toy)")
    p.add_argument("--realistic", default=os.path.join(ROOT, "runs", "realistic"),
                   help="--size realistic: folder of tests/realistic.py's builds (one is built there if missing)")
    p.add_argument("--block-size", type=int, default=0,
                   help="engine KV block size in tokens (0: sampling.Sampler's; vLLM's CPU default is 128)")
    p.add_argument("--no-prefix-cache", action="store_true", help="engine without vLLM's prefix caching")
    p.add_argument("--levers", action="store_true", help="measure mu's levers on one step (see above)")
    p.add_argument("--ref-m", type=int, default=16, help="--levers: answers per context of the reference J")
    return p


def grpo_args(a, arm: str, model: str, data: dict, run: int = 0):
    """grpo.py's arguments for one arm of the bench (a: this script's parsed flags; data: the
    toy's {'train', 'test'} paths): `outcome` is --variant outcome, `forced` and `rollout`
    --variant mrt with that --mu-mode; no held-out evaluation, no checkpoint but the last.
    tests/test_bench.py builds and resolves them, so a renamed grpo.py flag fails the suite."""
    import grpo

    size = SIZES[a.size]
    return grpo.Args(variant="outcome" if arm == "outcome" else "mrt",
                     mu_mode="rollout" if arm == "rollout" else "forced",
                     preset=size["preset"], model=model, train_data=data["train"], test_data=data["test"],
                     out=os.path.join(a.work, a.size, f"{arm}-{run}"), seed=a.seed, steps=a.steps,
                     prompts_per_step=size["prompts_per_step"], group_size=size["group_size"],
                     micro_batch_size=size["micro_batch_size"], max_tokens=size["max_tokens"],
                     mu_samples=a.mu_samples, mu_max_tokens=size["mu_max_tokens"],
                     mu_rollout_tokens=size["mu_rollout_tokens"], eval_problems=0, save_every=10**9)


def model_and_data(a) -> tuple[str, dict]:
    import toy

    paths = toy.paths(a.toy) if a.toy else toy.ensure_built(os.path.join(ROOT, "runs", "toy"))
    if a.size == "toy":
        return paths["base"], paths
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from realistic import build_realistic

    return build_realistic(a.realistic, base=paths["base"]), paths


def make_sampler(a, model: str, data: dict):
    """One engine for every arm, long enough for the longest (the rollout mu's contexts)."""
    import grpo
    import sampling
    import utils

    args = grpo.resolve_args(grpo_args(a, "rollout", model, data), 1)
    tok = utils.load_tokenizer(model)
    args = dataclasses.replace(args, instruction=utils.stage_instruction(args.instruction, model))
    longest = max(p["prompt_tokens"] for p in utils.load_problems(
        data["train"], tokenizer=tok, instruction=args.instruction, max_prompt_tokens=args.max_prompt_length,
        too_long="raise --max-prompt-length"))
    mu_tokens = sampling.mu_need(tok, args.mu_mode, args.mu_suffix, args.mu_max_tokens, args.mu_rollout_tokens)
    need = sampling.trace_need(tok, longest, args.max_tokens, True, mu_tokens)
    return sampling.Sampler(model, seed=a.seed, max_model_len=sampling.engine_length(model, need),
                            enable_prefix_caching=not a.no_prefix_cache,
                            **({"block_size": a.block_size} if a.block_size else {}))


def split(rows: list[dict], syncs: list[float]) -> list[dict]:
    """Per step: policy sampling, mu, training (sync excluded), sync, the rest, the step."""
    out = []
    for r, s in zip(rows, syncs):
        out.append({"policy": r["time_sample"] - r["time_mu"], "mu": r["time_mu"], "train": r["time_train"] - s,
                    "sync": s, "other": r["time_step"] - r["time_sample"] - r["time_train"], "step": r["time_step"],
                    "mu_tokens": r.get("mu_tokens_per_problem", 0.0), "gain": r["info_gain_mean"]})
    return out


def run_arms(a) -> None:
    import grpo
    import sampling

    arms = [x for x in a.arms.split(",") if x]
    model, data = model_and_data(a)
    sampler = make_sampler(a, model, data)
    syncs: list[float] = []
    sync = sampler.sync_weights

    def timed_sync(m):  # the weight sync's share of time_train
        t0 = time.time()
        sync(m)
        syncs.append(time.time() - t0)

    sampler.sync_weights = timed_sync
    steps = {arm: [] for arm in arms}
    z0 = {}
    for rnd in range(a.rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
            args = grpo_args(a, arm, model, data, rnd)
            for name in ("metrics.jsonl", "samples.jsonl", "z0.jsonl"):
                if os.path.exists(os.path.join(args.out, name)):
                    os.remove(os.path.join(args.out, name))
            syncs.clear()
            t0 = time.time()
            with sampling.ready_engines({model: sampler}):
                grpo.main(args)
            rows = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
            z0[arm, rnd] = open(os.path.join(args.out, "z0.jsonl")).read()
            parts = split(rows, syncs[1:])  # syncs[0]: the start-of-run sync of the ready engine
            print(f"\n{arm} round {rnd} ({time.time() - t0:.0f}s run):")
            print("  step  policy      mu   train    sync   other    step  mu tok/problem  I mean")
            for i, p in enumerate(parts, 1):
                print(f"  {i:4d} {p['policy']:7.2f} {p['mu']:7.2f} {p['train']:7.2f} {p['sync']:7.2f} "
                      f"{p['other']:7.2f} {p['step']:7.2f} {p['mu_tokens']:15.0f} {p['gain']:7.3f}")
            steps[arm] += parts[1:]
    same = len(set(z0.values())) == 1
    print(f"\nz0 identical across arms and rounds: {same}")
    print(f"\nmedian over steps 2..{a.steps} of each run ({a.rounds} round(s)), size {a.size}, m = {a.mu_samples}:")
    print("  arm        policy      mu   train    sync    step  ratio  in-step  mu tok/problem")
    base = statistics.median(p["step"] for p in steps["outcome"]) if steps.get("outcome") else None
    for arm in arms:
        med = {k: statistics.median(p[k] for p in steps[arm])
               for k in ("policy", "mu", "train", "sync", "step", "mu_tokens")}
        ratio = f"{med['step'] / base:5.2f}x" if base else "   - "
        inner = statistics.median(p["step"] / (p["step"] - p["mu"]) for p in steps[arm])
        print(f"  {arm:9s} {med['policy']:7.2f} {med['mu']:7.2f} {med['train']:7.2f} {med['sync']:7.2f} "
              f"{med['step']:7.2f} {ratio}  {inner:5.2f}x {med['mu_tokens']:15.0f}")
    print("ratio: median step / the outcome arm's; in-step: median of step / (step - mu) within each step, the\n"
          "same step under the same machine load without mu's time (its sampling and training are the outcome\n"
          "arm's work: same sizes, same engine)")


# --------------------------------------------------------------------------------------
# --levers: mu on one step's contexts
# --------------------------------------------------------------------------------------


def run_levers(a) -> None:
    import numpy as np

    import grpo
    import infogain
    import sampling
    import utils

    model, data = model_and_data(a)
    sampler = make_sampler(a, model, data)
    args = grpo.resolve_args(grpo_args(a, "forced", model, data), 1)
    args = dataclasses.replace(args, instruction=utils.stage_instruction(args.instruction, model))
    train = utils.load_problems(data["train"], tokenizer=sampler.tokenizer, instruction=args.instruction,
                                max_prompt_tokens=args.max_prompt_length, too_long="raise --max-prompt-length")
    problems = utils.step_problems(train, 0, args, 0)
    z0s, _ = sampling.sample_z0(sampler, problems, temperature=args.temperature, max_tokens=args.max_tokens,
                                seed_parts=(a.seed, "z0", "train"))
    problems = [p for p in problems if p["id"] in z0s]
    seed = utils.derive_seed(a.seed, "rollout", 0, 0)

    class LastBox(sampling.MetaProver):  # the rule before the forced answer was its first box
        def grade(self, answer, gold):
            return sampling.grade_cached(answer, gold)

    def one(name, mu):
        t0 = time.time()
        rows = grpo.rollout(sampler, problems, z0s, args, seed, mu)
        gains = np.array([r["gain"] for r in rows])  # (P * G,)
        print(f"  {name:34s} {mu.seconds:7.2f}s of {time.time() - t0:6.2f}s  "
              f"{mu.tokens / len(problems):7.0f} tok/problem  I mean {gains.mean():+.4f}")
        return gains

    print(f"levers on one toy step: {len(problems)} problems x {args.group_size} continuations, seed {a.seed}")
    kw = dict(suffix=args.mu_suffix, max_tokens=args.mu_max_tokens)
    free = one("forced, no stop", sampling.MetaProver(sampler, m=a.mu_samples, stop_at_box=False, **kw))
    stop = one("forced, stop at the box", sampling.MetaProver(sampler, m=a.mu_samples, **kw))
    last = one("forced, no stop, last box graded", LastBox(sampler, m=a.mu_samples, stop_at_box=False, **kw))
    print(f"  stop changes no gain: {bool(np.array_equal(free, stop))}")
    moved = np.abs(last - free)
    print(f"  first box vs last box: {np.mean(moved > 0):.1%} of gains moved, mean |dI| {moved.mean():.4f}, "
          f"max {moved.max():.3f}")
    for m in (4, 8, 16):
        one(f"forced m={m}", sampling.MetaProver(sampler, m=m, **kw))
    for m in (4, 8, 16):
        one(f"rollout m={m}", sampling.MetaProver(sampler, m=m, mode="rollout",
                                                 rollout_tokens=args.mu_rollout_tokens))

    # standard error of I = J(after) - J(before) at m answers each, from reference J's at ref_m
    for mode in ("forced", "rollout"):
        mu = sampling.MetaProver(sampler, m=a.ref_m, mode=mode, rollout_tokens=args.mu_rollout_tokens, **kw)
        rows = grpo.rollout(sampler, problems, z0s, args, seed, None)
        before = mu.success_rates([p["prompt"] + z0s[p["id"]] for p in problems], [p["answer"] for p in problems],
                                  seed=utils.derive_seed(seed, "ref-before"))  # (P,)
        parsed = [r for r in rows if r["episodes"]]
        after = mu.success_rates([r["problem"]["prompt"] + r["episodes"].z0 + r["episodes"].z1 for r in parsed],
                                 [r["problem"]["answer"] for r in parsed], seed=utils.derive_seed(seed, "ref-after"))
        pb = np.array([before[r["group"]] for r in parsed])  # (N,)
        gains = after - pb  # (N,) reference gains
        spread = np.mean([np.std(gains[[i for i, r in enumerate(parsed) if r["group"] == g]], ddof=1)
                          for g in {r["group"] for r in parsed}
                          if sum(r["group"] == g for r in parsed) > 1])
        print(f"  {mode}: reference m={a.ref_m}, {len(parsed)} parsed continuations; spread of I within a group "
              f"(std) {spread:.3f}")
        for m in (4, 8, 16):
            se = infogain.gain_standard_error(pb, after, m, a.ref_m)  # (N,)
            print(f"    m={m:2d}: standard error of I mean {se.mean():.3f}, max {se.max():.3f}")


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    bad = [x for x in a.arms.split(",") if x not in ARMS]
    if bad or not a.arms:
        parser().error(f"--arms takes {','.join(ARMS)}, got {a.arms!r}")
    if a.steps < 2 or a.rounds < 1 or a.mu_samples < 1 or a.ref_m < 2:
        parser().error("--steps must be at least 2 (the first is left out), --rounds and --mu-samples at least 1, "
                       "--ref-m at least 2")
    if a.levers and a.size != "toy":
        parser().error("--levers runs on the toy (--size toy)")
    run_levers(a) if a.levers else run_arms(a)


if __name__ == "__main__":
    main()
