"""bench/infogain_prefill.py: what sharing the prefill saves when the meta-prover estimates
J(mu | c) from m rollouts of each of C long contexts (sampling.MetaProver), side by side in
one run on the same model, contexts, m and answer length:

  (a) shared:   one request per context with n=m, prefix caching on (what MetaProver does);
  (b) separate: m requests of n=1 per context, prefix caching off (every rollout prefills);
  (c) n=m, caching off: isolates where the saving comes from (in vLLM V1, n=m fans out into
      m child requests, so without the prefix cache each child prefills the context again).

Tokens prefilled are measured from vLLM's own counters (prompt tokens minus prefix-cache
hits) next to the computable ideal C x L (shared) and C x m x L (separate). On CPU, vLLM's KV
block is 128 tokens and only full blocks are shared, so each extra rollout recomputes the
context's last partial block (on GPU blocks are 16 tokens; --block-size 32 is the smallest
the CPU attention accepts). Each mode gets one untimed
warm-up call on other contexts, then --repeats timed calls (the prefix cache is reset before
each, so no call reuses an earlier call's blocks).

Run (build the ~25M-parameter preset first; its quality does not matter here):
    python toy.py --preset bench --out runs/toy-bench --eval-samples 0 --steps 20
    python bench/infogain_prefill.py
    python bench/infogain_prefill.py --block-size 32
    python bench/infogain_prefill.py --model runs/toy/base --contexts 32 --m 8 --context-tokens 400
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampling  # noqa: E402
import toy  # noqa: E402
import utils  # noqa: E402


@dataclass
class Args:
    model: str = "runs/toy-bench/base"
    """model folder (the toy bench preset by default; any toy model works)"""
    contexts: int = 32
    """C: contexts per call"""
    m: int = 8
    """rollouts (mu answers) per context"""
    context_tokens: int = 400
    """L: tokens per context (prompt plus a stream of attempts and backtracks)"""
    max_tokens: int = 16
    """mu's answer length"""
    block_size: int = 0
    """KV block size of both engines (0: vLLM's default, 128 on CPU; CPU needs a multiple of 32)"""
    repeats: int = 3
    """timed calls per mode (the median is reported)"""
    seed: int = 0
    """seeds the contexts and the sampling"""
    out: str = "runs/bench/infogain_prefill.json"
    """where the measured numbers are written"""


def make_contexts(tokenizer, n: int, tokens: int, seed: int) -> tuple[list[str], list[str]]:
    """n distinct contexts of about `tokens` tokens: a toy prompt, then attempts (with
    slips) separated by the backtrack marker, as a linearized MRT-B stream would be."""
    rng = random.Random(seed)
    contexts, golds = [], []
    for _ in range(n):
        p = toy.make_problem(rng)
        text = utils.build_prompt(tokenizer, p["problem"])
        while True:
            attempt = toy.render_solution(*toy.solution_steps(p["start"], p["ops"], rng, slip=0.3))
            longer = text + attempt + "\n" + utils.BACKTRACK_MARKER + "\n"
            if len(utils.encode(tokenizer, longer)) > tokens:
                break
            text = longer
        contexts.append(text)
        golds.append(p["answer"])
    return contexts, golds


def prefill_counters(sampler) -> tuple[int, int]:
    """(prompt tokens, prefix-cache hit tokens) so far, from vLLM's metrics."""
    vals = {m.name: m.value for m in sampler.llm.get_metrics()
            if m.name in ("vllm:prompt_tokens", "vllm:prefix_cache_hits")}
    return int(vals.get("vllm:prompt_tokens", 0)), int(vals.get("vllm:prefix_cache_hits", 0))


def separate_requests(sampler, contexts, golds, m, max_tokens, seed):
    """J(mu | c) with m independent n=1 requests per context (no shared prefill)."""
    tok = sampler.tokenizer
    prompts = [utils.encode(tok, sampling.mu_context(c, utils.MU_SUFFIX)) for c in contexts for _ in range(m)]
    outs = sampler.generate(prompts, n=1, temperature=1.0, max_tokens=max_tokens, seed=seed, logprobs=False)
    ok = [sampling.grade_cached(utils.MU_SUFFIX + g[0].text, gold) for g, gold in zip(outs, [x for x in golds for _ in range(m)])]
    return [sum(ok[i * m:(i + 1) * m]) / m for i in range(len(contexts))]


def measure(name, sampler, fn, warm, timed, repeats):
    fn(*warm)  # untimed warm-up on other contexts
    times, tokens = [], []
    for r in range(repeats):
        sampler.llm.reset_prefix_cache()
        p0, h0 = prefill_counters(sampler)
        t0 = time.perf_counter()
        fn(*timed, r)
        times.append(time.perf_counter() - t0)
        p1, h1 = prefill_counters(sampler)
        tokens.append((p1 - p0) - (h1 - h0))
    times.sort()
    row = {"mode": name, "seconds": round(times[len(times) // 2], 3), "prefilled_tokens": tokens[0],
           "prompt_tokens_seen": p1 - p0}
    utils.print0(json.dumps(row))
    return row


def main(args: Args) -> dict:
    if not os.path.isdir(args.model):
        raise utils.UserError(f"model path does not exist: {args.model} (build it: python toy.py --preset bench "
                              f"--out runs/toy-bench --eval-samples 0 --steps 20)")
    kw = dict(seed=args.seed, disable_log_stats=False)  # counters for prefilled tokens
    if args.block_size:
        kw["block_size"] = args.block_size
    shared = sampling.make_sampler(args.model, enable_prefix_caching=True, **kw)
    tok = shared.tokenizer
    contexts, golds = make_contexts(tok, args.contexts, args.context_tokens, args.seed)
    warm = make_contexts(tok, 4, args.context_tokens, args.seed + 1)
    L = sum(len(utils.encode(tok, sampling.mu_context(c, utils.MU_SUFFIX))) for c in contexts) / len(contexts)
    block = shared.llm.llm_engine.vllm_config.cache_config.block_size
    utils.print0(f"{args.model}: C={args.contexts} contexts of {L:.0f} tokens (with the suffix), m={args.m}, "
                 f"answers of <= {args.max_tokens} tokens; KV block {block} tokens")

    mu = sampling.MetaProver(shared, m=args.m, max_tokens=args.max_tokens)
    rows = [measure("(a) shared: n=m, prefix caching on", shared,
                    lambda c, g, r=0: mu.success_rates(c, g, seed=args.seed + r), warm, (contexts, golds), args.repeats)]
    del mu, shared
    gc.collect()

    plain = sampling.make_sampler(args.model, enable_prefix_caching=False, **kw)
    rows.append(measure("(b) separate: m requests of n=1, caching off", plain,
                        lambda c, g, r=0: separate_requests(plain, c, g, args.m, args.max_tokens, args.seed + r),
                        warm, (contexts, golds), args.repeats))
    mu_plain = sampling.MetaProver(plain, m=args.m, max_tokens=args.max_tokens)
    rows.append(measure("(c) n=m, caching off", plain,
                        lambda c, g, r=0: mu_plain.success_rates(c, g, seed=args.seed + r), warm, (contexts, golds),
                        args.repeats))

    a, b = rows[0], rows[1]
    report = {"model": args.model, "block_size": block, "contexts": args.contexts, "m": args.m, "context_tokens": round(L, 1),
              "max_tokens": args.max_tokens, "ideal_prefill_shared": round(args.contexts * L),
              "ideal_prefill_separate": round(args.contexts * args.m * L), "rows": rows,
              "prefill_token_ratio_b_over_a": round(b["prefilled_tokens"] / max(1, a["prefilled_tokens"]), 2),
              "time_ratio_b_over_a": round(b["seconds"] / a["seconds"], 2)}
    utils.print0(f"prefilled tokens: shared {a['prefilled_tokens']} (ideal {report['ideal_prefill_shared']}) vs "
                 f"separate {b['prefilled_tokens']} (ideal {report['ideal_prefill_separate']}): "
                 f"{report['prefill_token_ratio_b_over_a']}x fewer with sharing")
    utils.print0(f"wall time: shared {a['seconds']:.2f} s vs separate {b['seconds']:.2f} s: "
                 f"{report['time_ratio_b_over_a']}x faster with sharing")
    utils.write_json(args.out, report)
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
