"""bench/grpo_vs_trl.py: grpo.py's training step against TRL's GRPOTrainer, side by side.

Same ~25M-parameter toy model (toy.py --preset bench), same problems, same GRPO setup:
plain GRPO on the prompt (grpo.py --variant direct), P prompts x G completions per step,
micro-batch M with gradient accumulation (TRL: per_device_train_batch_size = M,
gradient_accumulation_steps = P * G / M), loss `dapo`, beta 0, one iteration, temperature 1,
and exactly L completion tokens per sequence on both sides: the benchmark's copy of the model
has its EOS remapped to <pad>, a token it never emits, so neither side stops early and both
process the same number of tokens (checked and printed). TRL generates with
`transformers.generate` (its CPU path); grpo.py with its colocated vLLM engine.

Each side runs in its own process, one after the other, with the same thread count; the
first step (warm-up) is excluded, the median of the remaining step times is compared. Each
step is also split into sampling (vLLM in grpo.py; `model.generate`, timed by wrapping it,
in TRL) and the rest (rewards, log-probs, loss, backward, optimizer, weight sync).

    pip install -r bench/requirements.txt         # trl (bench only; not a project requirement)
    python bench/grpo_vs_trl.py                    # builds runs/toy-bench if missing
    python bench/grpo_vs_trl.py --steps 6 --prompts 16 --group 8 --length 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def toy_args(bench_dir: str):
    """toy.py's arguments for the bench model: the ~25M-parameter `bench` preset, 20 steps of
    pretraining (enough for throughput; its answers do not matter), no pass@k evaluation.
    tests/test_bench.py builds them, so a renamed toy.py flag fails the suite."""
    import toy

    return toy.Args(out=bench_dir, preset="bench", eval_samples=0, steps=20)


def prepare_model(bench_dir: str) -> tuple[str, str]:
    """Build the bench toy if missing (toy_args) and make a copy whose EOS is <pad>, so every
    completion runs to the length limit."""
    import toy

    base = os.path.join(bench_dir, "base")
    if not os.path.exists(os.path.join(base, "config.json")):
        a = toy_args(bench_dir)
        toy.ensure_built(a.out, a.preset, steps=a.steps, eval_samples=a.eval_samples)
    noeos = os.path.join(bench_dir, "base-noeos")
    if not os.path.exists(os.path.join(noeos, "config.json")):
        tmp = noeos + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp)
        for name in ("config.json", "generation_config.json"):
            path = os.path.join(tmp, name)
            if os.path.exists(path):
                cfg = json.load(open(path))
                cfg["eos_token_id"] = 0
                json.dump(cfg, open(path, "w"), indent=2)
        tcfg_path = os.path.join(tmp, "tokenizer_config.json")
        tcfg = json.load(open(tcfg_path))
        tcfg["eos_token"] = "<pad>"
        json.dump(tcfg, open(tcfg_path, "w"), indent=2)
        os.replace(tmp, noeos)
    return noeos, os.path.join(bench_dir, "data", "train.jsonl")


# --------------------------------------------------------------------------------------
# The two sides (each runs in its own process: `--side grpo` / `--side trl`)
# --------------------------------------------------------------------------------------


def grpo_args(a):
    """grpo.py's arguments for one side of the bench (a: this script's parsed flags): plain GRPO
    (--variant direct) with the sizes above: no warmup, no KL term, no held-out evaluation, no
    checkpoint. tests/test_bench.py builds and resolves them, so a renamed grpo.py flag fails the
    suite, not the next measurement."""
    import grpo

    return grpo.Args(variant="direct", preset="toy", model=a.model, train_data=a.data, test_data=a.data,
                     out=os.path.join(a.work, "grpo"), steps=a.steps, prompts_per_step=a.prompts,
                     group_size=a.group, micro_batch_size=a.micro, lr=1e-5, warmup_ratio=0.0, temperature=1.0,
                     max_tokens=a.length, loss_type="dapo", beta=0.0, eval_problems=0, save_every=10**9)


def trl_config_kwargs(a) -> dict:
    """TRL GRPOConfig's arguments for the same run (TRL's own names: its max_completion_length is
    grpo.py's --max-tokens). tests/test_bench.py builds a GRPOConfig from them where trl is
    installed."""
    return dict(output_dir=os.path.join(a.work, "trl"), use_cpu=True, bf16=False, report_to="none",
                max_steps=a.steps, per_device_train_batch_size=a.micro,
                gradient_accumulation_steps=a.prompts * a.group // a.micro, num_generations=a.group,
                max_completion_length=a.length, temperature=1.0, learning_rate=1e-5, beta=0.0,
                loss_type="dapo", logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
                lr_scheduler_type="constant", shuffle_dataset=False)


def run_grpo(a) -> dict:
    import grpo

    args = grpo_args(a)
    out = args.out
    grpo.main(args)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"step_times": [r["time_step"] for r in rows], "tokens": [r["completion_len_mean"] * a.prompts * a.group for r in rows],
            "sample_times": [r["time_sample"] for r in rows],
            "train_times": [r["time_step"] - r["time_sample"] for r in rows]}  # the rest, as on TRL's side


def run_trl(a) -> dict:
    import torch
    import utils
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = utils.load_tokenizer(a.model)
    recs = utils.read_records(a.data, ["problem", "answer"])[: a.prompts * (a.steps + 1)]
    ds = Dataset.from_list([{"prompt": utils.build_prompt(tok, r["problem"]), "answer": r["answer"]} for r in recs])

    def correctness(prompts, completions, answer, **kw):
        return [utils.grade(c, g) for c, g in zip(completions, answer)]

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.time() - self.t)

    cfg = GRPOConfig(**trl_config_kwargs(a))
    trainer = GRPOTrainer(model=a.model, reward_funcs=[correctness], args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    gen_times, generate = [], trainer.model.generate

    def timed_generate(*args, **kw):  # TRL samples with model.generate once per step (its CPU path)
        t = time.time()
        out = generate(*args, **kw)
        gen_times.append(time.time() - t)
        return out

    trainer.model.generate = timed_generate
    trainer.train()
    for h in trainer.state.log_history:
        if "completions/mean_length" in h:
            tokens.append(h["completions/mean_length"] * a.prompts * a.group)
    assert len(gen_times) == len(times), (len(gen_times), len(times))
    return {"step_times": times, "tokens": tokens, "threads": torch.get_num_threads(), "sample_times": gen_times,
            "train_times": [t - g for t, g in zip(times, gen_times)]}


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench-dir", default="runs/toy-bench", help="toy bench build (made if missing)")
    p.add_argument("--work", default="runs/bench/grpo_vs_trl", help="scratch output folder")
    p.add_argument("--steps", type=int, default=6, help="training steps per side (the first is warm-up)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--micro", type=int, default=32, help="sequences per forward/backward")
    p.add_argument("--length", type=int, default=128, help="completion tokens per sequence")
    p.add_argument("--threads", type=int, default=1, help="OMP threads for both sides")
    p.add_argument("--side", choices=["grpo", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main():
    p = parser()
    a = p.parse_args()
    if a.prompts * a.group % a.micro:
        p.error(f"--micro {a.micro} must divide --prompts x --group = {a.prompts * a.group}")
    if a.side:  # child: one side, result to a JSON file
        res = run_grpo(a) if a.side == "grpo" else run_trl(a)
        json.dump(res, open(a.result, "w"))
        return

    model, data = prepare_model(a.bench_dir)
    os.makedirs(a.work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    results = {}
    for side in ("grpo", "trl"):
        result = os.path.join(a.work, f"{side}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", model, "--data", data,
               "--result", result, "--work", a.work] + [f"--{k}={getattr(a, k)}" for k in
                                                       ("steps", "prompts", "group", "micro", "length", "threads")]
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        results[side] = json.load(open(result))
        results[side]["wall"] = time.time() - t0

    print(f"\nGRPO step on the ~25M toy model, {a.prompts} prompts x {a.group} completions x {a.length} tokens, "
          f"micro-batch {a.micro}, {a.threads} thread(s), median of steps 2..{a.steps}")
    med = {}
    for side, r in results.items():
        steps = r["step_times"][1:]
        med[side] = statistics.median(steps)
        toks = statistics.mean(r["tokens"][1:]) if r["tokens"] else float("nan")
        med[side + "/sample"] = statistics.median(r["sample_times"][1:])
        med[side + "/train"] = statistics.median(r["train_times"][1:])
        print(f"  {side:5s} step {med[side]:7.2f}s  completion tokens/step {toks:7.0f}  process wall {r['wall']:.0f}s"
              f"  (sampling {med[side + '/sample']:.2f}s, the rest {med[side + '/train']:.2f}s)")
    print(f"  speed-up of grpo.py over TRL GRPOTrainer: {med['trl'] / med['grpo']:.2f}x per step (target >= 3x); "
          f"sampling {med['trl/sample'] / med['grpo/sample']:.2f}x, the rest {med['trl/train'] / med['grpo/train']:.2f}x")


if __name__ == "__main__":
    main()
