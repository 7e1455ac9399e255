"""bench/vllm_engine.py: two settings of the vLLM engine side by side in one run: the start
(imports, engine start), the sampling time, the process's peak memory, and whether the samples
are the same.

--compare eager: vLLM with torch.compile against vLLM eager (MRT_VLLM_EAGER=0 / 1), the
measurement behind `sampling.resolve_eager`'s default (eager on CPU). A fresh machine has no
compile cache; the compiled mode here may find one that an earlier run left (vLLM logs whether
it loaded it), so its start is at best the fresh machine's.
--compare kv: the KV cache of a CPU engine at 2 GiB (VLLM_CPU_KVCACHE_SPACE=2, sampling.py's
fixed default before it sized the cache from the run) against the size the run needs
(`sampling.model_kv_cache_bytes`, the variable unset). The cache's memory is touched when the
engine starts; --cold drops the page cache before each setting (root only), as on a machine's
first run.

Each setting runs in processes of its own (one vLLM engine per process), --rounds of them, in
turn (a b, b a, ...; the times printed are their means): a process imports `sampling`, starts
a `Sampler` sized from this run's lengths (its longest prompt + --max-tokens, as the stages
size theirs; timed from the process's first line), then makes --repeats seeded `generate`
calls on the same prompts (timed; the first call includes whatever the engine still compiles
lazily). The samples' token ids are compared call by call.
    python bench/vllm_engine.py                      # --compare eager, the default toy
    python bench/vllm_engine.py --compare kv [--cold]
    python bench/vllm_engine.py --model <dir> --data <jsonl>
Prints one line per setting and the ratios; writes --out as JSON.
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

SETTINGS = {"eager": {"compiled": {"MRT_VLLM_EAGER": "0"}, "eager": {"MRT_VLLM_EAGER": "1"}},
            "kv": {"kv 2 GiB": {"VLLM_CPU_KVCACHE_SPACE": "2"}, "kv run-sized": {"VLLM_CPU_KVCACHE_SPACE": None}}}
"""--compare -> {setting: the environment variables it sets (None: removed)}; the first is the
numerator of the printed ratios."""


@dataclass
class Args:
    compare: str = "eager"
    """which settings: eager (MRT_VLLM_EAGER 0 / 1) or kv (VLLM_CPU_KVCACHE_SPACE 2 / unset)"""
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
    """timed generate calls per setting (seeds 0..repeats-1)"""
    rounds: int = 2
    """processes per setting, in turn (a b, then b a, ...); times are their means"""
    cold: bool = False
    """drop the page cache (sync; /proc/sys/vm/drop_caches) before each setting: root only"""
    worker: str = ""
    """internal: run in this process and print its JSON"""
    out: str = "runs/bench/vllm_engine.json"
    """where the numbers are also written as JSON ('' to skip)"""


def run_setting(args: Args) -> dict:
    """One setting in this process: engine start, then the timed calls; the token ids of every sample."""
    import resource

    import sampling

    records = utils.read_records(args.data, ["problem"])[: args.prompts]
    tok = utils.load_tokenizer(args.model)
    prompts = [utils.build_prompt(tok, r["problem"]) for r in records]
    longest = max(len(utils.encode(tok, p)) for p in prompts)
    t0 = time.perf_counter()
    sampler = sampling.Sampler(args.model, seed=0, max_model_len=sampling.engine_length(args.model, longest + args.max_tokens))
    engine_s, start_s = time.perf_counter() - t0, time.perf_counter() - T_START
    calls, ids = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        outs = sampler.generate(prompts, n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=r)
        calls.append(time.perf_counter() - t0)
        ids.append([s.token_ids for g in outs for s in g])
    return {"start_s": start_s, "engine_s": engine_s, "call_s": calls, "tokens": sum(len(t) for c in ids for t in c),
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ids": ids}


def drop_page_cache() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise utils.UserError(f"bench/vllm_engine.py: --cold needs root to write /proc/sys/vm/drop_caches ({e.strerror})")


def main(args: Args) -> dict:
    if args.compare not in SETTINGS:
        raise utils.UserError(f"bench/vllm_engine.py: --compare must be one of {', '.join(SETTINGS)}, got {args.compare!r}")
    if args.worker:
        print(json.dumps(run_setting(args)))
        return {}
    utils.check_model_path(args.model)
    if args.rounds < 1:
        raise utils.UserError(f"bench/vllm_engine.py: --rounds must be at least 1, got {args.rounds}")
    runs = {name: [] for name in SETTINGS[args.compare]}
    for i in range(args.rounds):  # a b, b a, ...: neither setting always runs first
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            setting = SETTINGS[args.compare][name]
            env = {k: v for k, v in os.environ.items() if setting.get(k, "") is not None}
            env.update({k: v for k, v in setting.items() if v is not None})
            if args.cold:
                drop_page_cache()
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", "1"]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["no error output"])[-1]
                raise utils.UserError(f"bench/vllm_engine.py: setting {name} ({setting}) failed: {last}")
            runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    res = {name: {"start_s": mean(rs, "start_s"), "engine_s": mean(rs, "engine_s"), "max_rss_mib": mean(rs, "max_rss_mib"),
                  "call_s": [sum(r["call_s"][j] for r in rs) / len(rs) for j in range(args.repeats)],
                  "tokens": rs[0]["tokens"], "engine_each_s": [r["engine_s"] for r in rs],
                  "ids": rs[0]["ids"], "same_each_round": all(r["ids"] == rs[0]["ids"] for r in rs)}
           for name, rs in runs.items()}
    for name, r in res.items():
        utils.print0(f"{name:>12}: process to engine ready {r['start_s']:.1f} s (engine {r['engine_s']:.1f} s: "
                     f"{', '.join(f'{e:.1f}' for e in r['engine_each_s'])}); "
                     f"{args.repeats} calls {sum(r['call_s']):.1f} s (first {r['call_s'][0]:.1f} s), {r['tokens']} tokens, "
                     f"{r['tokens'] / sum(r['call_s']):.0f} tokens/s; peak memory {r['max_rss_mib']:.0f} MiB")
    (a_name, a), (b_name, b) = res.items()
    same = sum(x == y for ca, cb in zip(a["ids"], b["ids"]) for x, y in zip(ca, cb))
    total = sum(len(ca) for ca in a["ids"])
    ratio = {"engine": a["engine_s"] / b["engine_s"], "start": a["start_s"] / b["start_s"],
             "calls": sum(a["call_s"]) / sum(b["call_s"]),
             "total": (a["start_s"] + sum(a["call_s"])) / (b["start_s"] + sum(b["call_s"])),
             "peak_memory": a["max_rss_mib"] / b["max_rss_mib"]}
    report = {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
              **{name: {k: v for k, v in r.items() if k != "ids"} for name, r in res.items()},
              "ratios": ratio, "identical_samples": same, "samples": total}
    utils.print0(f"{a_name} / {b_name}: engine start {ratio['engine']:.2f}x, process to engine ready {ratio['start']:.2f}x, "
                 f"calls {ratio['calls']:.2f}x, start + calls {ratio['total']:.2f}x, peak memory "
                 f"{ratio['peak_memory']:.2f}x; identical samples {same} of {total}")
    if args.out:
        utils.write_json(args.out, report)
    return report


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
