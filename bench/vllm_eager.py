"""bench/vllm_eager.py: vLLM with torch.compile against vLLM eager (MRT_VLLM_EAGER=0 / 1), side
by side in one run: the engine's start, the sampling time, and whether the samples are the same.

Each mode runs in a process of its own (one vLLM engine per process; the compile's state
stays in its process), one after the other: the process imports `sampling`, starts a
`Sampler` (timed from the process's first line: imports, engine start, any compile), then
makes --repeats seeded `generate` calls on the same prompts (timed; the first call includes
whatever the engine still compiles lazily). The samples' token ids of the two modes are
compared call by call. This is the measurement behind `sampling.resolve_eager`'s default
(eager on CPU). A fresh machine has no compile cache; the compiled mode here may find one
that an earlier run left (vLLM logs whether it loaded it), so its start is at best the
fresh machine's.
    python bench/vllm_eager.py                       # the default toy
    python bench/vllm_eager.py --model <dir> --data <jsonl>
Prints one line per mode and the ratios; writes --out as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import utils  # noqa: E402


@dataclass
class Args:
    model: str = "runs/toy/base"
    """model to sample from"""
    data: str = "runs/toy/data/test.jsonl"
    """prompts come from this file's problem field"""
    prompts: int = 64
    """number of prompts"""
    n: int = 8
    """samples per prompt"""
    max_tokens: int = 128
    """generated tokens per sample at most"""
    temperature: float = 1.0
    """sampling temperature"""
    repeats: int = 5
    """timed generate calls per mode (seeds 0..repeats-1)"""
    worker: str = ""
    """internal: run one mode ("0" or "1") and print its JSON"""
    out: str = "runs/bench/vllm_eager.json"
    """where the numbers are also written as JSON ('' to skip)"""


def run_mode(args: Args) -> dict:
    """One mode in this process: engine start, then the timed calls; the token ids of every sample."""
    import sampling

    records = utils.read_records(args.data, ["problem"])[: args.prompts]
    sampler = sampling.Sampler(args.model, seed=0)
    start_s = time.perf_counter() - T_START
    prompts = [utils.build_prompt(sampler.tokenizer, r["problem"]) for r in records]
    calls, ids = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        outs = sampler.generate(prompts, n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=r)
        calls.append(time.perf_counter() - t0)
        ids.append([s.token_ids for g in outs for s in g])
    return {"start_s": start_s, "call_s": calls, "tokens": sum(len(t) for c in ids for t in c), "ids": ids}


def main(args: Args) -> dict:
    if args.worker:
        print(json.dumps(run_mode(args)))
        return {}
    utils.check_model_path(args.model)
    res = {}
    for mode in ("0", "1"):
        env = dict(os.environ, MRT_VLLM_EAGER=mode)
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", mode]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["no error output"])[-1]
            raise utils.UserError(f"bench/vllm_eager.py: mode MRT_VLLM_EAGER={mode} failed: {last}")
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    name = {"0": "compiled", "1": "eager"}
    for mode, r in res.items():
        utils.print0(f"{name[mode]:>8}: process to engine ready {r['start_s']:.1f} s; {args.repeats} calls "
                     f"{sum(r['call_s']):.1f} s (first {r['call_s'][0]:.1f} s), {r['tokens']} tokens, "
                     f"{r['tokens'] / sum(r['call_s']):.0f} tokens/s")
    c, e = res["0"], res["1"]
    same = sum(a == b for ca, cb in zip(c["ids"], e["ids"]) for a, b in zip(ca, cb))
    total = sum(len(ca) for ca in c["ids"])
    report = {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
              "compiled": {k: v for k, v in c.items() if k != "ids"}, "eager": {k: v for k, v in e.items() if k != "ids"},
              "start_compiled_over_eager": c["start_s"] / e["start_s"],
              "calls_compiled_over_eager": sum(c["call_s"]) / sum(e["call_s"]),
              "total_compiled_over_eager": (c["start_s"] + sum(c["call_s"])) / (e["start_s"] + sum(e["call_s"])),
              "identical_samples": same, "samples": total}
    utils.print0(f"compiled / eager: start {report['start_compiled_over_eager']:.2f}x, calls "
                 f"{report['calls_compiled_over_eager']:.2f}x, start + calls {report['total_compiled_over_eager']:.2f}x; "
                 f"identical samples {same} of {total}")
    if args.out:
        utils.write_json(args.out, report)
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
