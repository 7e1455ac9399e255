"""bench/sampling_throughput.py: generated tokens per second through `sampling.Sampler` with the
vLLM backend against its `transformers.generate` fallback (backend="hf"), same model, same
prompts, same n, temperature and max_tokens, measured side by side in one run.

Build the ~25M-parameter toy preset first (throughput does not need a trained model; with few
pretraining steps the model rarely stops early, so completions run to --max-tokens: the
lengths column says how close to the budget they were):
    python toy.py --preset bench --out runs/toy-bench --eval-samples 0 --steps 20
    python bench/sampling_throughput.py
Each backend gets one untimed warm-up call (engine compile, first allocations), then
--repeats timed calls; tokens/s = generated tokens (the samplers' own counts) / wall time.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sampling  # noqa: E402
import utils  # noqa: E402


@dataclass
class Args:
    model: str = "runs/toy-bench/base"
    """model to sample from (the toy bench preset)"""
    data: str = "runs/toy-bench/data/test.jsonl"
    """prompts come from this file's problem field"""
    prompts: int = 32
    """number of prompts"""
    n: int = 8
    """samples per prompt"""
    max_tokens: int = 256
    """generated tokens per sample at most"""
    temperature: float = 1.0
    """sampling temperature"""
    repeats: int = 1
    """timed calls per backend (after one warm-up call)"""
    backends: str = "hf,vllm"
    """comma-separated backends, measured in this order (hf first: once a vLLM engine has run
    on CPU, vLLM blocks torch.set_num_threads for the rest of the process)"""
    out: str = "runs/bench/sampling_throughput.json"
    """where the numbers are also written as JSON ('' to skip)"""


def measure(backend: str, prompts: list[str], args: Args, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)  # the process default (a vLLM Sampler sets 1 on CPU for itself)
    sampler = sampling.Sampler(args.model, backend=backend, seed=0)
    threads = torch.get_num_threads()
    sampler.generate(prompts[:2], n=2, temperature=args.temperature, max_tokens=16, seed=1)  # warm-up
    tokens, lengths, seconds = 0, [], 0.0
    for r in range(args.repeats):
        t0 = time.perf_counter()
        outs = sampler.generate(prompts, n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=r)
        seconds += time.perf_counter() - t0
        lengths += [s.num_tokens for g in outs for s in g]
        tokens += sum(s.num_tokens for g in outs for s in g)
    del sampler
    gc.collect()
    return {"backend": backend, "torch_threads": threads, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": tokens / seconds,
            "mean_len": sum(lengths) / len(lengths), "at_budget": sum(l >= args.max_tokens for l in lengths) / len(lengths)}


def main(args: Args) -> dict:
    records = utils.read_records(args.data, ["problem"])[: args.prompts]
    tok = utils.load_tokenizer(args.model)
    prompts = [utils.build_prompt(tok, r["problem"]) for r in records]
    utils.print0(f"{len(prompts)} prompts x n={args.n} x max_tokens={args.max_tokens}, T={args.temperature}, "
                 f"model {args.model}, vLLM eager={sampling.resolve_eager(os.environ.get('MRT_VLLM_EAGER'), utils.has_cuda())}")
    import torch

    threads = torch.get_num_threads()
    results = [measure(b.strip(), prompts, args, threads) for b in args.backends.split(",")]
    for r in results:
        utils.print0(f"{r['backend']:>5} ({r['torch_threads']} torch threads): {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tokens_per_s']:.0f} tokens/s "
                     f"(mean length {r['mean_len']:.0f}, {100 * r['at_budget']:.0f}% at the budget)")
    by = {r["backend"]: r for r in results}
    report = {"settings": vars(args), "results": results}
    if "vllm" in by and "hf" in by:
        report["ratio_vllm_over_hf"] = by["vllm"]["tokens_per_s"] / by["hf"]["tokens_per_s"]
        utils.print0(f"ratio vllm / hf: {report['ratio_vllm_over_hf']:.2f}x")
    if args.out:
        utils.write_json(args.out, report)
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
