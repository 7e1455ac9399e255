"""study.py: the whole MRT study on the embedded default, one command (MRT paper Sec. 6-7).

For each seed, every stage runs as its own process (its own vLLM engine, freed on exit);
--jobs stages run at a time, from any seed, each once the stages it reads from are done:

  warmstart   warmstart.py: beam search + Backtrack traces + SFT; the RISE and rejection
              schemes on the same search tree (Fig. 6: SFT loss against tokens)
  star        star.py: MRT-B (STaR, 2 iterations) and its STaR / RISE baselines, from the base
  grpo        grpo.py from the warmstart model: MRT-B (RL, alpha > 0) and its outcome-only
              GRPO and length-penalty baselines (Fig. 9)
  evaluate    evaluate.py: every model in parallel and linearized modes (Fig. 7)
  infogain    infogain.py: the backtrack episode's information gain per model (Fig. 8)
  r1          r1_analysis.py: episodes and cumulative regret of the base and MRT-B (RL) models
  truth-*     backtracking against the toy's ground truth (truth_stages): does the gain rank
              restarts that can fix z0 above those that cannot, with the forced and the rollout
              meta-prover; RL from the base with either meta-prover against outcome-only RL

then the seeds are aggregated into RESULTS.md (mean and spread over seeds): pass@k / maj@k at
matched token budgets, the token efficiency of MRT-B against each baseline (the paper's
"30% / 38%" figures), information-gain means, regret, and the figures.

Run (CPU, no network; builds the toy base model first if missing; bench/README.md gives measured times):
    python study.py             # full: 3 seeds -> RESULTS.md, results/
    python study.py --quick     # 1 seed, smaller sizes -> runs/study/quick/RESULTS.md
    python study.py --seeds 0   # one seed
A killed run resumes: a stage whose outputs exist is skipped (the log says so), a grpo or
warmstart stage with a checkpoint continues from it (--resume). Delete a stage's folder to
redo it. Every stage's command and output go to <out>/seed<s>/logs/<stage>.log.

Decisions:
- The toy base is shared by all seeds (it is the "given" pretrained model); the seed varies
  the search, the traces, the fine-tuning data order, RL sampling and evaluation sampling.
- MRT-B (RL) and its baselines start from the Backtrack warmstart model of the same seed, as
  in the paper (Sec. 6.2). STaR variants start from the base (Alg. 1 fine-tunes the base).
- Token efficiency is computed on maj@k curves (the paper's Fig. 7 reports maj@k for the
  linearized evaluation), in both modes; the reference is each baseline's peak.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import utils

ROOT = os.path.dirname(os.path.abspath(__file__))

# Sizes per preset. Each value is a list of flags for that stage's script.
SIZES = {
    "quick": dict(
        seeds=[0],
        warmstart=["--problems", "24"],
        star=["--iterations", "2", "--problems", "32", "--eval-problems", "16"],
        grpo=["--steps", "4", "--eval-problems", "16"],
        evaluate=["--problems", "16", "--samples", "4", "--window", "128", "--max-tokens", "200"],
        infogain=["--problems", "8", "--continuations", "2", "--mu-samples", "4"],
        r1=["--problems", "8"],
        truth=["--problems", "8", "--continuations", "2", "--mu-samples", "4", "--mu-rollout-tokens", "128"],
        truth_grpo=["--steps", "4", "--eval-problems", "16", "--mu-rollout-tokens", "128"],
        truth_eval=["--problems", "16", "--samples", "4", "--window", "128", "--max-tokens", "200"],
    ),
    "full": dict(
        seeds=[0, 1, 2],
        warmstart=["--problems", "48"],
        star=["--iterations", "2"],
        grpo=["--steps", "10", "--eval-problems", "64"],
        evaluate=["--problems", "64", "--samples", "4", "--window", "128", "--max-tokens", "200"],
        infogain=["--problems", "32", "--continuations", "2", "--mu-samples", "8"],
        r1=[],
        truth=["--problems", "64", "--continuations", "4", "--mu-samples", "8", "--mu-rollout-tokens", "128"],
        truth_grpo=["--steps", "40", "--mu-rollout-tokens", "128"],
        truth_eval=["--problems", "64", "--samples", "4", "--window", "128", "--max-tokens", "200"],
    ),
}

STAR_METHODS = ("mrt", "star", "rise")
GRPO_VARIANTS = ("mrt", "outcome", "length")
TRUTH_MU = ("forced", "rollout")
"""meta-provers compared against the toy's ground truth (sampling.MetaProver modes)"""
TRUTH_GRPO = {"mrt-forced": ["--variant", "mrt", "--mu-mode", "forced"],
              "mrt-rollout": ["--variant", "mrt", "--mu-mode", "rollout"],
              "outcome": ["--variant", "outcome"]}
"""RL variants of the ground-truth section: grpo.py from the toy base (not the warmstart)"""
TRUTH_CLASSES = ("before", "at", "after", "z0-correct")
"""restart classes shown in the discrimination table (toy.RESTART_CLASSES; "beyond" is rare
and only counted among the unfixable restarts of the AUC)"""


@dataclass
class Args:
    quick: bool = False
    """one seed, smaller sizes, written under runs/study/quick"""
    seeds: list[int] = field(default_factory=list)
    """seeds to run (empty: the preset's, 3 for the full study, 1 for --quick)"""
    out: str = ""
    """run folder ('' : runs/study/full or runs/study/quick)"""
    results: str = ""
    """where RESULTS.md and its figures go ('' : the repository's RESULTS.md and results/ for the
    full study, <out>/RESULTS.md and <out>/results/ for --quick)"""
    only: list[str] = field(default_factory=list)
    """run only these stages (names as in the logs, e.g. warmstart grpo-mrt evaluate); empty: all"""
    jobs: int = 2
    """stages run side by side, from any seed, as their inputs allow (each stage mostly keeps
    one core busy; 2 fits 2 cores)"""
    aggregate_only: bool = False
    """skip every stage and only (re)write RESULTS.md from the outputs that exist"""
    eager: str = "auto"
    """vLLM without torch.compile in every stage (MRT_VLLM_EAGER=1): on | off | auto (on for
    --quick, else the sampler's default: eager on CPU, compiled on CUDA)"""


# ---- Stages --------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    cmd: list[str] | Callable[[], list[str]]
    """the command, or a function that builds it when the stage runs (from the models that
    the stages before it produced)"""
    done: str
    """a file that exists only once the stage has finished (it is written last)"""
    resume_from: str = ""
    """a checkpoint that, when present, makes the stage continue with --resume"""
    after: tuple[str, ...] = ()
    """stages of the same seed that must finish before this one starts"""


def stages(seed_dir: str, seed: int, sizes: dict, base: str) -> list[Stage]:
    py = [sys.executable]
    d = lambda *p: os.path.join(seed_dir, *p)  # noqa: E731
    s = ["--seed", str(seed)]
    out = []
    ws = d("warmstart", "backtrack")
    out.append(Stage("warmstart", py + ["warmstart.py", "--out", ws, *s, *sizes["warmstart"]],
                     d("warmstart", "backtrack", "summary.json"),
                     d("warmstart", "backtrack", "checkpoint", "latest")))
    for scheme in ("rise", "rejection"):
        out.append(Stage(f"warmstart-{scheme}", py + ["warmstart.py", "--scheme", scheme, "--search-from",
                                                      os.path.join(ws, "search.jsonl"), "--out",
                                                      d("warmstart", scheme), *s, *sizes["warmstart"]],
                         d("warmstart", scheme, "summary.json"), after=("warmstart",)))
    for m in STAR_METHODS:
        out.append(Stage(f"star-{m}", py + ["star.py", "--method", m, "--model", base, "--preset", "toy",
                                            "--out", d("star", m), *s, *sizes["star"]],
                         d("star", m, "summary.json")))
    for v in GRPO_VARIANTS:
        out.append(Stage(f"grpo-{v}", py + ["grpo.py", "--variant", v, "--model", os.path.join(ws, "model"),
                                            "--preset", "toy", "--out", d("grpo", v), *s, *sizes["grpo"]],
                         d("grpo", v, "model", "mrt.json"), d("grpo", v, "checkpoint", "latest"),
                         after=("warmstart",)))
    trained = tuple(st.name for st in out)  # evaluate and infogain read every model these write
    present = lambda: existing_models(seed_dir, base)  # noqa: E731  (read when the stage runs)
    out.append(Stage("evaluate", lambda: py + ["evaluate.py", "--models",
                                               *[f"{k}={v}" for k, v in present().items()],
                                               "--out", d("eval"), *s, *sizes["evaluate"]],
                     d("eval", "curves.json"), after=trained))
    backtrack = lambda: {k: v for k, v in present().items()  # noqa: E731
                         if k != "base" and k not in ("star-star", "warmstart-rejection")}
    out.append(Stage("infogain", lambda: py + ["infogain.py", "--model",
                                               *[f"{k}={v}" for k, v in backtrack().items()],
                                               "--out", d("infogain"), *s, *sizes["infogain"]],
                     d("infogain", "summary.json"), after=trained))
    models = model_paths(seed_dir, base)
    for name in ("base", "grpo-mrt"):
        out.append(Stage(f"r1-{name}", py + ["r1_analysis.py", "--generate", "--model", models[name],
                                             "--preset", "toy", "--direct-model", base, "--out",
                                             d("r1", name), *s, *sizes["r1"]],
                         d("r1", name, "summary.json"), after=() if name == "base" else (name,)))
    return out + truth_stages(seed_dir, seed, sizes, base)


def truth_stages(seed_dir: str, seed: int, sizes: dict, base: str) -> list[Stage]:
    """The "Backtracking against ground truth" stages of one seed:
      truth-forced   infogain.py on the base's and the warmstart's own backtrack traces, mu forced
      truth-rollout  the same traces (the files truth-forced wrote), mu rolling out (--mu-mode rollout)
      truth-grpo-*   grpo.py from the toy base: mrt with either meta-prover, and outcome-only
      truth-eval     evaluate.py on the base and those RL models (token efficiency)"""
    py = [sys.executable]
    d = lambda *p: os.path.join(seed_dir, "truth", *p)  # noqa: E731
    s = ["--seed", str(seed)]
    ws = os.path.join(seed_dir, "warmstart", "backtrack", "model")
    sampled = lambda: {k: v for k, v in (("base", base), ("warmstart", ws))  # noqa: E731
                       if k == "base" or os.path.exists(os.path.join(v, "config.json"))}

    def rollout_cmd():  # every model whose forced run sampled at least one trace, on those traces
        runs = {k: v for k, v in sampled().items()
                if os.path.exists(d("forced", f"traces_{k}.jsonl"))
                and os.path.getsize(d("forced", f"traces_{k}.jsonl"))}
        return py + ["infogain.py", "--model", *[f"{k}={v}" for k, v in runs.items()],
                     "--traces", *[d("forced", f"traces_{k}.jsonl") for k in runs], "--mu-mode", "rollout",
                     "--out", d("rollout"), *s, *sizes["truth"]]

    out = [Stage("truth-forced", lambda: py + ["infogain.py", "--model",
                                               *[f"{k}={v}" for k, v in sampled().items()],
                                               "--mu-mode", "forced", "--out", d("forced"), *s,
                                               *sizes["truth"]],
                 d("forced", "summary.json"), after=("warmstart",)),
           Stage("truth-rollout", rollout_cmd, d("rollout", "summary.json"), after=("truth-forced",))]
    for name, flags in TRUTH_GRPO.items():
        out.append(Stage(f"truth-grpo-{name}", py + ["grpo.py", *flags, "--model", base, "--preset", "toy",
                                                     "--out", d("grpo", name), *s, *sizes["truth_grpo"]],
                         d("grpo", name, "model", "mrt.json"), d("grpo", name, "checkpoint", "latest")))
    models = [f"base={base}"] + [f"grpo-{n}={d('grpo', n, 'model')}" for n in TRUTH_GRPO]
    out.append(Stage("truth-eval", py + ["evaluate.py", "--models", *models, "--out", d("eval"), *s,
                                         *sizes["truth_eval"]],
                     d("eval", "curves.json"), after=tuple(f"truth-grpo-{n}" for n in TRUTH_GRPO)))
    return out


def model_paths(seed_dir: str, base: str) -> dict[str, str]:
    """Every model of one seed, by run name (evaluation order: the reference first)."""
    d = lambda *p: os.path.join(seed_dir, *p, "model")  # noqa: E731
    return {"base": base, "warmstart": d("warmstart", "backtrack"),
            "warmstart-rejection": d("warmstart", "rejection"),
            **{f"star-{m}": d("star", m) for m in STAR_METHODS},
            **{f"grpo-{v}": d("grpo", v) for v in GRPO_VARIANTS}}


def existing_models(seed_dir: str, base: str) -> dict[str, str]:
    """model_paths without the models that were never written: a STaR run that kept no
    example in any iteration fine-tunes nothing (its model is the base; see RESULTS.md)."""
    return {k: v for k, v in model_paths(seed_dir, base).items()
            if k == "base" or os.path.exists(os.path.join(v, "config.json"))}


def run_stage(stage: Stage, log_dir: str, env: dict | None = None, tag: str = "") -> float:
    """Run one stage unless done; returns its seconds (0 when skipped). Output goes to its log."""
    name = f"{tag}{stage.name}"
    if os.path.exists(stage.done):
        utils.print0(f"  {name}: done before ({os.path.relpath(stage.done, ROOT)}), skipped")
        return 0.0
    cmd = list(stage.cmd() if callable(stage.cmd) else stage.cmd)
    if stage.resume_from and os.path.exists(stage.resume_from):
        cmd.append("--resume")
    os.makedirs(log_dir, exist_ok=True)
    log = os.path.join(log_dir, f"{stage.name}.log")
    utils.print0(f"  {name}: {shlex.join(cmd)}")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if p.returncode != 0:
        tail = open(log).read().splitlines()[-5:]
        raise utils.UserError(f"stage {stage.name} failed (exit {p.returncode}); see {log}: "
                              + " | ".join(tail)[-400:])
    if not os.path.exists(stage.done):
        raise utils.UserError(f"stage {stage.name} ended without writing {stage.done}; see {log}")
    seconds = time.time() - t0
    utils.print0(f"  {name}: {seconds:.0f}s")
    return seconds


def run_stages(plans: dict[int, list[Stage]], log_dirs: dict[int, str], jobs: int,
               env: dict | None = None) -> dict:
    """Run every seed's stages, `jobs` at a time. A stage starts once the stages it comes
    `after` (same seed; those not in the plan count as done) have finished; among the ready
    ones, the seed with the most stages left goes first, so that the seeds progress evenly and
    no worker idles while another seed still has work. Each seed's stage times are appended to
    <log dir>/times.jsonl. On a failure no new stage starts; the running ones finish, then the
    first error is raised. Returns {seed: {stage: seconds}}."""
    from concurrent.futures import FIRST_COMPLETED, wait

    left = {seed: list(plan) for seed, plan in plans.items()}
    planned = {seed: {st.name for st in plan} for seed, plan in plans.items()}
    finished = {seed: set() for seed in plans}
    times = {seed: {} for seed in plans}
    tag = (lambda seed: f"[seed {seed}] ") if len(plans) > 1 else (lambda seed: "")  # noqa: E731

    def next_ready():
        for seed in sorted(left, key=lambda s: (-len(left[s]), s)):
            for st in left[seed]:
                if all(a in finished[seed] or a not in planned[seed] for a in st.after):
                    return seed, st
        return None

    running, error = {}, None
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            while True:
                while error is None and len(running) < max(1, jobs) and (ready := next_ready()):
                    seed, st = ready
                    left[seed].remove(st)
                    running[pool.submit(run_stage, st, log_dirs[seed], env, tag(seed))] = ready
                if not running:
                    break
                for fut in wait(running, return_when=FIRST_COMPLETED)[0]:
                    seed, st = running.pop(fut)
                    try:
                        times[seed][st.name] = round(fut.result(), 1)
                        finished[seed].add(st.name)
                    except Exception as e:  # keep the first failure; the running stages finish
                        error = error or e
        if error is None and any(left.values()):
            raise RuntimeError("stages never became ready: "
                               f"{({s: [st.name for st in v] for s, v in left.items() if v})}")
    finally:
        for seed, t in times.items():
            if t:
                os.makedirs(log_dirs[seed], exist_ok=True)
                with open(os.path.join(log_dirs[seed], "times.jsonl"), "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": t}) + "\n")
    if error is not None:
        raise error
    return times


# ---- Aggregation over seeds: numbers, table, figures ---------------------------------


def load_json(path: str) -> dict | None:
    return json.load(open(path)) if os.path.exists(path) else None


def mean_sd(values) -> tuple[float | None, float | None, int]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return None, None, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def paired(a: dict, b: dict) -> dict | None:
    """The paired difference a - b over the seeds both have a value for ({seed: value} each;
    same seed: same z0 and data order): {"diffs": {seed: a - b}, "mean", "sd", "n", "clear"}.
    "clear" is the call this study makes: True only when every seed's difference has the same
    sign (none zero) and |mean| > 2 sd / sqrt(n) (twice the standard error); otherwise the
    difference is within the seeds' noise. None when no seed has both values."""
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    if not seeds:
        return None
    diffs = {s: float(a[s]) - float(b[s]) for s in seeds}
    v = np.array(list(diffs.values()))
    n = len(v)
    sd = float(v.std(ddof=1)) if n > 1 else 0.0
    same_sign = bool(np.all(v > 0) or np.all(v < 0))
    clear = n > 1 and same_sign and abs(float(v.mean())) > 2 * sd / np.sqrt(n)
    return {"diffs": diffs, "mean": float(v.mean()), "sd": sd, "n": n, "clear": bool(clear)}


def paired_cell(p: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    """'+m ± sd (per seed: x, y, z; call)' for a paired() result, '-' for None."""
    if p is None:
        return "-"
    per = ", ".join(f"{scale * x:+.{digits}f}" for x in p["diffs"].values())
    call = "a difference" if p["clear"] else "within the noise"
    return f"{scale * p['mean']:+.{digits}f} ± {scale * p['sd']:.{digits}f} (seeds: {per}; {call})"


def fmt(values, scale: float = 100.0, digits: int = 1, sign: bool = False, unit: str = "") -> str:
    """'mean ± sd' over seeds (sd omitted when only one seed has a value; '-' when none has;
    the count of seeds in brackets when some seeds lack a value)."""
    m, s, n = mean_sd(values)
    if m is None:
        return "-"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = f.format(scale * m) + unit + ("" if n == 1 else f" ± {scale * s:.{digits}f}{unit}")
    return text + ("" if n == len(values) else f" ({n}/{len(values)} seeds)")


def mean_curves(per_seed: list[dict], mode: str) -> dict:
    """{run: {tokens, pass, maj, maj_sd}} averaged over seeds by k (tokens averaged too)."""
    import evaluate

    out = {}
    names = [n for n in per_seed[0]["runs"]
             if all(mode in s["runs"].get(n, {}).get("modes", {}) for s in per_seed)]
    for name in names:
        cs = [s["runs"][name]["modes"][mode] for s in per_seed]
        k = min(len(c["k"]) for c in cs)
        arr = lambda key: np.array([c[key][:k] for c in cs])  # noqa: E731  (seeds, k)
        out[name] = {"tokens": arr("tokens").mean(0).tolist(), "pass": arr("pass").mean(0).tolist(),
                     "maj": arr("maj").mean(0).tolist(), "maj_sd": arr("maj").std(0).tolist()}
        evaluate._check_curve(out[name]["tokens"], out[name]["maj"])
    return out


COMPARISONS = [  # (MRT-B run, baseline runs)
    ("grpo-mrt", ["grpo-outcome", "grpo-length", "warmstart", "base"]),
    ("star-mrt", ["star-star", "star-rise", "base"]),
]


def aggregate(out: str, seeds: list[int], results_md: str, fig_dir: str) -> str:
    """RESULTS.md from the seeds' outputs (whatever exists); returns its text."""
    import evaluate

    seed_dirs = {s: os.path.join(out, f"seed{s}") for s in seeds}
    evals = {s: load_json(os.path.join(d, "eval", "curves.json")) for s, d in seed_dirs.items()}
    have = [evals[s] for s in seeds if evals[s]]
    os.makedirs(fig_dir, exist_ok=True)
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(results_md)))  # noqa: E731
    lines = ["# MRT on the embedded toy task: results", "",
             f"Written by `python study.py{' --quick' if 'quick' in out else ''}` from the outputs under "
             f"`{out}` (seeds {', '.join(map(str, seeds))}; {len(have)} with an evaluation). Cells are mean "
             "± standard deviation over seeds. Nothing here is edited by hand.", ""]

    # ---- accuracy at matched token budgets --------------------------------------------------
    if have:
        ev_settings = have[0]["settings"]
        lines += ["## Accuracy at matched token budgets", "",
                  f"Toy test split, {ev_settings['problems']} problems, N = {ev_settings['samples']} "
                  f"traces (parallel) or rounds (linearized, window {ev_settings['window']} tokens), "
                  f"temperature {ev_settings['temperature']}. Each cell: pass@k / maj@k (%) interpolated "
                  "on the run's accuracy-tokens curve at that many generated tokens per problem (- : "
                  "outside the curve).", ""]
        n = ev_settings["samples"]
        lines += [f"pass@1, pass@{n} and maj@{n} (%) and generated tokens per trace (parallel mode):", "",
                  f"| run | pass@1 | pass@{n} | maj@{n} | tokens per trace |", "|---|---|---|---|---|"]
        for name in dict.fromkeys(r for e in have for r in e["runs"]):  # every run of any seed, in order
            cs = [e["runs"][name]["modes"]["parallel"] for e in have
                  if "parallel" in e["runs"].get(name, {}).get("modes", {})]
            if cs:
                pad = [None] * (len(have) - len(cs))  # seeds without this run
                lines.append(f"| {name} | {fmt([c['pass'][0] for c in cs] + pad)} | "
                             f"{fmt([c['pass'][-1] for c in cs] + pad)} | "
                             f"{fmt([c['maj'][-1] for c in cs] + pad)} | "
                             f"{fmt([c['tokens'][0] for c in cs] + pad, 1, 0)} |")
        lines.append("")
        for mode in evaluate.MODES:
            mc = mean_curves(have, mode)
            if not mc:
                continue
            budgets = evaluate.budgets_for(list(mc.values()))
            lines += [f"### {mode}", "", "| run | " + " | ".join(f"{b:.0f} tok" for b in budgets) + " |",
                      "|---" * (len(budgets) + 1) + "|"]
            for name in mc:
                cells = []
                for b in budgets:
                    p = [evaluate.interp_curve(e["runs"][name]["modes"][mode]["tokens"],
                                               e["runs"][name]["modes"][mode]["pass"], b) for e in have]
                    m = [evaluate.interp_curve(e["runs"][name]["modes"][mode]["tokens"],
                                               e["runs"][name]["modes"][mode]["maj"], b) for e in have]
                    cells.append("-" if all(x is None for x in p) else f"{fmt(p)} / {fmt(m)}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
            plot_mean_curves(mc, mode, os.path.join(fig_dir, f"fig7_{mode}.png"), len(have))
            lines += [f"![{mode}]({rel(os.path.join(fig_dir, f'fig7_{mode}.png'))})", ""]

        # ---- token efficiency -------------------------------------------------------------
        lines += ["## Token efficiency of MRT-B (maj@k)", "",
                  "Saving = 1 - (tokens MRT-B needs to reach the baseline's peak maj@k) / (tokens the "
                  "baseline needs for its peak); positive: MRT-B matches the baseline's best with fewer "
                  "tokens (the paper reports about 30% against outcome-reward GRPO and 38% in the "
                  "linearized setting). 'not reached': MRT-B's curve never reaches the baseline's peak in "
                  "that seed.", "",
                  "| MRT-B | baseline | parallel saving | linearized saving |", "|---|---|---|---|"]
        for mrt, bases in COMPARISONS:
            for b in bases:
                cells = []
                for mode in evaluate.MODES:
                    vals, miss = [], 0
                    for e in have:
                        runs = e["runs"]
                        if mrt not in runs or b not in runs or mode not in runs[mrt]["modes"]:
                            continue
                        ca, cb = runs[mrt]["modes"][mode], runs[b]["modes"][mode]
                        eff = evaluate.token_efficiency((ca["tokens"], ca["maj"]), (cb["tokens"], cb["maj"]))
                        vals.append(eff["saving"])
                        miss += eff["saving"] is None
                    cell = (fmt(vals, sign=True, digits=0, unit="%") if any(v is not None for v in vals)
                            else "-")
                    cells.append(cell + (f", not reached in {miss}/{len(vals)}" if miss else ""))
                lines.append(f"| {mrt} | {b} | " + " | ".join(cells) + " |")
        lines.append("")

    # ---- STaR: what each iteration kept, held-out accuracy ----------------------------------
    star_rows = []
    for m in STAR_METHODS:
        sums = [load_json(os.path.join(d, "star", m, "summary.json")) for d in seed_dirs.values()]
        sums = [x for x in sums if x]
        if sums:
            per_it = lambda key: " / ".join(  # noqa: E731  (one cell: the iterations in order)
                fmt([x["iterations"][i].get(key) for x in sums if len(x["iterations"]) > i])
                for i in range(len(sums[0]["iterations"])))
            no_model = sum(x["model_dir"] is None for x in sums)
            star_rows.append(f"| star-{m} | {per_it('kept_fraction')} | {per_it('kept_fraction_gain_pos')} | "
                             f"{per_it('kept_fraction_gain_nonneg')} | "
                             f"{fmt([x['accuracy'][0] for x in sums])} | "
                             f"{fmt([x['accuracy'][-1] for x in sums])} | "
                             + (f"kept nothing in {no_model}/{len(sums)} seeds: no model, no evaluation row |"
                                if no_model else "|"))
    if star_rows:
        lines += ["## MRT-B (STaR) and baselines (Alg. 1)", "",
                  "Fraction of training problems kept per iteration, the fraction MRT's filter keeps under "
                  "each reading of it on the same samples (a correct continuation with gain > 0, Alg. 1, "
                  "star.py's default; with gain >= 0, Fig. 4: with m forced answers ties are common), and "
                  "held-out accuracy (%) in the method's own format (backtrack: the base's z0, the cue, z2 "
                  "graded) before the first and after the last iteration.", "",
                  "| run | kept per iteration (%) | gain > 0 would keep | gain >= 0 would keep | "
                  "held-out start | held-out end | note |", "|---|---|---|---|---|---|---|", *star_rows, ""]

    # ---- RL training: held-out accuracy start -> end ---------------------------------------
    grpo_rows = []
    for v in GRPO_VARIANTS:
        ev = [load_json(os.path.join(d, "grpo", v, "eval.json")) for d in seed_dirs.values()]
        ev = [e for e in ev if e]
        paths = [os.path.join(d, "grpo", v, "metrics.jsonl") for d in seed_dirs.values()]
        ms = [utils.read_records(p, []) for p in paths if os.path.exists(p)]
        if ev:
            grpo_rows.append(f"| grpo-{v} | {fmt([e.get('start') for e in ev])} | "
                             f"{fmt([e.get('end') for e in ev])} | "
                             f"{first_last(ms, 'unparsed_share')} |")
    if grpo_rows:
        lines += ["## MRT-B (RL) and baselines: held-out accuracy during training", "",
                  "Accuracy (%) of the revised attempt on held-out problems (each variant's own format, the "
                  "same z0), before and after RL from the warmstart model; unparsed: the share (%) of "
                  "training continuations that do not split into episodes (no restart line, a box on it, or "
                  "no step and no box after it), in the first / last quarter of the steps.", "",
                  "| run | start | end | unparsed first / last |", "|---|---|---|---|", *grpo_rows, ""]
        plot_training(seed_dirs, os.path.join(fig_dir, "fig9_rl_training.png"))
        lines += [f"![rl]({rel(os.path.join(fig_dir, 'fig9_rl_training.png'))})", ""]

    # ---- information gain ---------------------------------------------------------------
    igs = [load_json(os.path.join(d, "infogain", "summary.json")) for d in seed_dirs.values()]
    igs = [x for x in igs if x]
    if igs:
        names = list(igs[0]["models"])
        lines += ["## Information gain of the backtrack episode (Def. 5.1)", "",
                  "J(mu | x, z0, z1) - J(mu | x, z0) with mu = the model forced to answer, m answers per "
                  "context; mean over the model's own sampled backtrack traces.", "",
                  "| model | traces | gain of z1 | gain, z2 correct | gain, z2 wrong | z2 accuracy |",
                  "|---|---|---|---|---|---|"]
        for n in names:
            ms = [x["models"][n] for x in igs if n in x["models"]]
            lines.append(f"| {n} | {fmt([m['traces'] for m in ms], 1, 0)} | "
                         f"{fmt([m['gain_mean']['z1'] for m in ms], 1, 3, True)} | "
                         f"{fmt([m['backtrack_gain_mean_z2_correct'] for m in ms], 1, 3, True)} | "
                         f"{fmt([m['backtrack_gain_mean_z2_wrong'] for m in ms], 1, 3, True)} | "
                         f"{fmt([m['z2_accuracy'] for m in ms])} |")
        lines.append("")
        copy_figure(os.path.join(seed_dirs[seeds[0]], "infogain", "infogain_hist.png"),
                    os.path.join(fig_dir, "fig8_infogain.png"))
        lines += [f"![infogain]({rel(os.path.join(fig_dir, 'fig8_infogain.png'))}) (seed {seeds[0]})", ""]

    # ---- regret of long traces (r1_analysis.py) -------------------------------------------
    r1_rows = []
    for name in ("base", "grpo-mrt"):
        sums = [load_json(os.path.join(d, "r1", name, "summary.json")) for d in seed_dirs.values()]
        ov = [x["analysis"]["overall"] for x in sums if x]
        if ov:
            r1_rows.append(f"| {name} | {fmt([o['mean_episodes'] for o in ov], 1, 2)} | "
                           f"{fmt([o['maj1_first'] for o in ov])} | {fmt([o['maj1_last'] for o in ov])} | "
                           f"{fmt([o['trace_regret_mean'] for o in ov], 1, 3)} |")
    if r1_rows:
        lines += ["## Episodes and cumulative regret of long linearized streams (Sec. 4, Def. 3.1)", "",
                  "r1_analysis.py on the toy: linearized streams of up to 8 rounds, split into episodes at "
                  "each backtrack marker; [maj@1]_j is the meta-prover's accuracy after j episodes; regret "
                  "per trace is sum_j (J* - [maj@1]_j) with J* the best value the meta-prover reached on "
                  "that trace.", "",
                  "| model | episodes per trace | [maj@1] after episode 1 | [maj@1] after the last | "
                  "regret per trace |",
                  "|---|---|---|---|---|", *r1_rows, ""]
        copy_figure(os.path.join(seed_dirs[seeds[0]], "r1", "grpo-mrt", "accuracy_tokens.png"),
                    os.path.join(fig_dir, "r1_grpo_mrt.png"))

    # ---- warmstart (Fig. 6) -------------------------------------------------------------
    logs = [os.path.join(seed_dirs[seeds[0]], "warmstart", s, "log.jsonl")
            for s in ("backtrack", "rise", "rejection")]
    if all(os.path.exists(p) for p in logs):
        import warmstart

        warmstart.plot_losses(logs, os.path.join(fig_dir, "fig6_warmstart_loss.png"))
        sums = [load_json(os.path.join(d, "warmstart", "backtrack", "summary.json"))
                for d in seed_dirs.values()]
        sums = [x for x in sums if x]
        lines += ["## Warmstart (Sec. 6.2, Fig. 6)", "",
                  f"Beam search solved {fmt([x['search']['search_solved'] for x in sums])}% of the searched "
                  "problems against a single-sample pass@1 of "
                  f"{fmt([x['search']['attempt_pass@1'] for x in sums])}%; "
                  f"{fmt([x['traces']['count'] for x in sums], 1, 0)} Backtrack traces per seed.", "",
                  "The curves are not like for like: Backtrack and RISE take the loss on z1 + z2 with z0 in "
                  "the prompt, rejection on whole solutions (warmstart.py's docstring; the legend names "
                  "each curve's loss target for logs written since it was added).", "",
                  f"![fig6]({rel(os.path.join(fig_dir, 'fig6_warmstart_loss.png'))}) (seed {seeds[0]})", ""]

    lines += paired_section(seed_dirs)
    lines += truth_section(seed_dirs, fig_dir, rel)

    text = "\n".join(lines) + "\n"
    with utils.atomic_path(results_md) as tmp, open(tmp, "w") as f:
        f.write(text)
    return text


def _mean_over(rows: list[dict], key: str, part: slice) -> float | None:
    """Mean of `key` over a slice of a run's metrics rows (rows without it left out)."""
    v = [r[key] for r in rows[part] if r.get(key) is not None]
    return float(np.mean(v)) if v else None


def first_last(runs: list[list[dict]], key: str) -> str:
    """'first / last' cell: `key`'s mean over the first and over the last quarter of each
    run's metrics rows (at least one row each), then over the runs (fmt)."""
    q = lambda m: max(1, len(m) // 4)  # noqa: E731
    return " / ".join(fmt([_mean_over(m, key, part(m)) for m in runs])
                      for part in (lambda m: slice(0, q(m)), lambda m: slice(-q(m), None)))


RESTART_BINS = ("1", "2", "3", "4", "5+", "none")


def restart_step_counts(rows: list[dict]) -> dict[str, int]:
    """Where the continuations logged in grpo.py's samples.jsonl rows restart: counts per
    RESTART_BINS (the k of "Step k:" after the marker; none: the continuation does not split into
    episodes, infogain.split_continuation)."""
    import infogain

    counts = dict.fromkeys(RESTART_BINS, 0)
    for row in rows:
        for c in row["completions"]:
            ep = infogain.split_continuation(row["z0"], infogain.backtrack_cue(row["z0"]) + c["text"])
            counts["none" if ep is None else "5+" if ep.restart_step >= 5 else str(ep.restart_step)] += 1
    return counts


def paired_section(seed_dirs: dict) -> list[str]:
    """The verdict table: MRT-B (forced and rollout mu) against outcome-only GRPO, each as a
    paired difference per seed (paired): held-out z2 accuracy at the end of RL (from the
    warmstart, and from the base in the ground-truth runs), the share of fixable restarts in the
    last quarter of training, and the token saving at the baseline's peak maj@k. [] when no
    pair of runs exists."""
    import evaluate

    def end(*parts):
        return {s: (load_json(os.path.join(d, *parts, "eval.json")) or {}).get("end")
                for s, d in seed_dirs.items()}

    def last_quarter(key, *parts):
        out = {}
        for s, d in seed_dirs.items():
            p = os.path.join(d, *parts, "metrics.jsonl")
            rows = utils.read_records(p, []) if os.path.exists(p) else []
            out[s] = _mean_over(rows, key, slice(-max(1, len(rows) // 4), None)) if rows else None
        return out

    def saving(a, b, mode):
        out = {}
        for s, d in seed_dirs.items():
            c = load_json(os.path.join(d, "truth", "eval", "curves.json"))
            runs = (c or {}).get("runs", {})
            if a in runs and b in runs and mode in runs[a]["modes"] and mode in runs[b]["modes"]:
                ca, cb = runs[a]["modes"][mode], runs[b]["modes"][mode]
                out[s] = evaluate.token_efficiency((ca["tokens"], ca["maj"]),
                                                   (cb["tokens"], cb["maj"]))["saving"]
        return out

    rows = [("held-out z2, RL from the warmstart (forced mu)",
             paired(end("grpo", "mrt"), end("grpo", "outcome")))]
    for mu in TRUTH_MU:
        name = f"mrt-{mu}"
        rows += [(f"held-out z2, RL from the base ({mu} mu)",
                  paired(end("truth", "grpo", name), end("truth", "grpo", "outcome"))),
                 (f"fixable restarts, last quarter ({mu} mu)",
                  paired(last_quarter("restart_fixable", "truth", "grpo", name),
                         last_quarter("restart_fixable", "truth", "grpo", "outcome")))]
        for mode in evaluate.MODES:
            sv = saving(f"grpo-{name}", "grpo-outcome", mode)
            rows.append((f"token saving at outcome-only's peak maj@k, {mode} ({mu} mu)",
                         paired(sv, {s: 0.0 for s in sv})))
    rows = [(k, p) for k, p in rows if p is not None]
    if not rows:
        return []
    return ["## MRT-B against outcome-only GRPO, paired by seed", "",
            "Each row: MRT-B minus outcome-only GRPO in the same seed (the same z0, problems and data "
            "order), in points (%); mean ± sd over seeds, each seed's difference, and the call: 'a "
            "difference' only when every seed's difference has the same sign and the mean exceeds twice its "
            "standard error, else 'within the noise'. Token saving (evaluate.token_efficiency): 1 - MRT-B's "
            "tokens / outcome-only's tokens at outcome-only's peak maj@k (a seed where MRT-B never reaches "
            "that peak has no value).", "",
            "| comparison | MRT-B - outcome-only |", "|---|---|",
            *(f"| {k} | {paired_cell(p)} |" for k, p in rows), ""]


def truth_section(seed_dirs: dict, fig_dir: str, rel: Callable[[str], str]) -> list[str]:
    """The "Backtracking against ground truth" section from the truth-* stages'
    outputs that exist: the gain's discrimination per meta-prover, the RL table, the restart
    precision figure, the token-efficiency curves. [] when none exists."""
    lines = []
    disc = {mu: [load_json(os.path.join(d, "truth", mu, "summary.json")) for d in seed_dirs.values()]
            for mu in TRUTH_MU}
    disc = {mu: [x for x in sums if x] for mu, sums in disc.items()}
    models = list(dict.fromkeys(m for sums in disc.values() for x in sums for m in x["models"]))
    rl = {}
    for name in TRUTH_GRPO:
        runs = [(load_json(os.path.join(d, "truth", "grpo", name, "eval.json")),
                 utils.read_records(p, [])
                 if os.path.exists(p := os.path.join(d, "truth", "grpo", name, "metrics.jsonl")) else None)
                for d in seed_dirs.values()]
        runs = [(e, m) for e, m in runs if e or m]
        if runs:
            rl[name] = runs
    curves = [c for c in (load_json(os.path.join(d, "truth", "eval", "curves.json"))
                          for d in seed_dirs.values()) if c]
    if not (models or rl or curves):
        return lines
    lines += ["## Backtracking against ground truth", "",
              "For every attempt z0 the toy knows the first wrong step f (toy.first_wrong_step), so it "
              "knows which restart steps k can fix z0 (k <= f) and which cannot (k > f). Classes of a "
              "backtrack continuation: before (k < f), at (k = f), after (k > f), z0 correct (no restart "
              "needed).", ""]
    if models:
        # the forced run's: it sampled the traces
        settings = next(x["settings"] for sums in disc.values() for x in sums)
        settings = {**settings,
                    "mu_rollout_tokens": next((x["settings"]["mu_rollout_tokens"] for x in disc["rollout"]),
                                              settings["mu_rollout_tokens"])}
        lines += ["### Does the information gain discriminate good restarts from bad ones?", "",
                  f"Each model's own backtrack traces on {settings['problems']} held-out problems x "
                  f"{settings['continuations']} continuations; gain = J(mu | x, z0, z1) - J(mu | x, z0) "
                  f"with m = {settings['mu_samples']}. forced: mu answers right after the context (\"Time "
                  f"is up. The answer is ...\", {settings['mu_max_tokens']} tokens); rollout: mu continues "
                  f"the context for up to {settings['mu_rollout_tokens']} tokens and its last boxed answer "
                  "is graded (both runs score the same traces). Cells: mean gain / share of positive gains "
                  "(%). AUC: probability that a fixable restart's gain exceeds an unfixable one's (ties one "
                  "half; 0.5 = no discrimination).", "",
                  "| model | meta-prover | traces | " + " | ".join(TRUTH_CLASSES) + " | AUC |",
                  "|---|---|---|" + "---|" * len(TRUTH_CLASSES) + "---|"]
        counts = []
        for m in models:
            for mu in TRUTH_MU:
                ds = [x["models"][m]["discrimination"] for x in disc[mu] if m in x["models"]]
                ds = [x for x in ds if x]
                if not ds:
                    continue
                cells = [f"{fmt([x['groups'][c]['gain_mean'] for x in ds], 1, 3, True)} / "
                         f"{fmt([x['groups'][c]['positive_share'] for x in ds], digits=0)}"
                         for c in TRUTH_CLASSES]
                lines.append(f"| {m} | {mu} | {fmt([x['traces'] for x in ds], 1, 0)} | " + " | ".join(cells) +
                             f" | {fmt([x['auc'] for x in ds], 1, 3)} |")
                if mu == TRUTH_MU[0]:
                    cell = lambda c: (f"{fmt([x['groups'][c]['n'] for x in ds], 1, 0)} "  # noqa: E731
                                      f"({fmt([x['groups'][c]['z2_accuracy'] for x in ds], digits=0)})")
                    counts.append(f"| {m} | " + " | ".join(cell(c) for c in TRUTH_CLASSES) + " |")
        lines += ["", "Traces per class (per seed) and, in brackets, the accuracy (%) of the revised "
                      "attempt z2:", "",
                  "| model | " + " | ".join(TRUTH_CLASSES) + " |", "|---|" + "---|" * len(TRUTH_CLASSES),
                  *counts, ""]
        path = os.path.join(fig_dir, "truth_gain_by_class.png")
        per_model = {m: {mu: [x["models"][m]["discrimination"] for x in disc[mu]
                              if m in x["models"] and x["models"][m]["discrimination"]] for mu in TRUTH_MU}
                     for m in models}
        per_model = {m: v for m, v in per_model.items() if any(v.values())}  # models with ground truth only
        if per_model:
            plot_gain_by_class(per_model, path)
            lines += [f"![gain by class]({rel(path)})", ""]
    if rl:
        lines += ["### Does RL with the bonus restart better than outcome-only RL?", "",
                  "grpo.py from the toy base (not the warmstart), toy preset. Held-out: accuracy (%) of the "
                  "revised attempt at the start and the end. Restart precision over training (training "
                  "continuations after a wrong z0): fixable = share whose restart step can fix z0, at f = "
                  "share restarting exactly at the first wrong step, z2 after wrong z0 = their accuracy; "
                  "unparsed = share of continuations that do not split into episodes; first / last quarter "
                  "of the steps. Tokens: mean completion tokens in the last quarter; mu time: the "
                  "meta-prover's share of step time.", "",
                  "| run | held-out start | held-out end | fixable first / last | at f first / last | "
                  "z2 after wrong z0 first / last | unparsed first / last | tokens | mu time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, runs in rl.items():
            ev = [e or {} for e, _ in runs]
            ms = [m for _, m in runs if m]
            q = lambda m: max(1, len(m) // 4)  # noqa: E731
            fl = lambda key: first_last(ms, key)  # noqa: E731
            mu = [sum(r.get("time_mu", 0.0) for r in m) / max(1e-9, sum(r["time_step"] for r in m))
                  for m in ms]
            lines.append(
                f"| grpo-{name} | {fmt([e.get('start') for e in ev])} | {fmt([e.get('end') for e in ev])} | "
                f"{fl('restart_fixable')} | {fl('restart_at_first_wrong')} | {fl('z2_acc_z0_wrong')} | "
                f"{fl('unparsed_share')} | "
                f"{fmt([_mean_over(m, 'completion_len_mean', slice(-q(m), None)) for m in ms], 1, 0)} | "
                f"{fmt(mu, digits=0, unit='%')} |")
        steps = {}
        for name in rl:
            paths = [os.path.join(d, "truth", "grpo", name, "samples.jsonl") for d in seed_dirs.values()]
            logged = [sorted(utils.read_records(p, []), key=lambda r: r["step"])
                      for p in paths if os.path.exists(p)]
            steps[name] = restart_step_counts([r for rows in logged for r in rows[-max(1, len(rows) // 4):]])
        lines += ["", "Where the continuations logged in the last quarter of the steps restart "
                      "(samples.jsonl: one group of continuations per step; counts over all seeds; none: no "
                      "restart line):", "",
                  "| run | " + " | ".join(f"Step {b}" if b != "none" else b for b in RESTART_BINS) + " |",
                  "|---|" + "---|" * len(RESTART_BINS),
                  *(f"| grpo-{name} | " + " | ".join(str(c[b]) for b in RESTART_BINS) + " |"
                    for name, c in steps.items())]
        path = os.path.join(fig_dir, "truth_restart_precision.png")
        plot_restart_precision({f"grpo-{n}": [m for _, m in runs if m] for n, runs in rl.items()}, path)
        lines += ["", f"![restart precision]({rel(path)})", ""]
    if curves:
        import evaluate

        lines += ["### Token efficiency at test time", "",
                  f"evaluate.py on the base and the RL runs above ({curves[0]['settings']['problems']} "
                  f"held-out problems, N = {curves[0]['settings']['samples']}); maj@k against generated "
                  "tokens per problem, mean over seeds.", ""]
        for mode in evaluate.MODES:
            mc = mean_curves(curves, mode)
            if mc:
                path = os.path.join(fig_dir, f"truth_{mode}.png")
                plot_mean_curves(mc, mode, path, len(curves))
                lines += [f"![{mode}]({rel(path)})", ""]
    return lines


def plot_gain_by_class(disc: dict, path: str) -> None:
    """Mean gain of the backtrack episode per restart class, one bar per meta-prover (mean over
    seeds, one standard deviation as the error bar); one panel per model in a grid with
    shared axes and one legend. `disc`: {model: {meta-prover: [discrimination per seed]}}."""
    plt = utils.pyplot()
    ncols = min(3, len(disc))
    nrows = -(-len(disc) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    x, w = np.arange(len(TRUTH_CLASSES)), 0.8 / len(TRUTH_MU)
    for ax, (model, per_mu) in zip(axes.flat, disc.items()):
        for i, (mu, ds) in enumerate(per_mu.items()):
            vals = [[d["groups"][c]["gain_mean"] for d in ds if d["groups"][c]["gain_mean"] is not None]
                    for c in TRUTH_CLASSES]
            ax.bar(x + (i - (len(per_mu) - 1) / 2) * w, [np.mean(v) if v else np.nan for v in vals], w,
                   yerr=[np.std(v) if len(v) > 1 else 0.0 for v in vals], label=f"mu {mu}", capsize=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for i, ax in enumerate(axes.flat):
        if i >= len(disc):
            ax.set_visible(False)
        elif i + ncols >= len(disc):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xticks(x, [c.replace("z0-correct", "z0 right") for c in TRUTH_CLASSES])
            ax.set_xlabel("restart step vs z0's first wrong step", fontsize=8)
    for row in axes:
        row[0].set_ylabel("mean gain of z1")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    utils.save_png(fig, path, rect=(0, 0.4 / (3.2 * nrows + 0.4), 1, 1), bbox_inches="tight")


RESTART_KEYS = {"restart_fixable": "fixable restarts (share)",
                "restart_at_first_wrong": "restarts at f (share)",
                "z2_acc_z0_wrong": "z2 accuracy after a wrong z0"}


def plot_restart_precision(runs: dict, path: str, window: int = 5) -> None:
    """Restart precision over RL training per variant: one panel per RESULTS key (fixable share,
    share at the first wrong step, z2 accuracy after a wrong z0) in one row with shared axes and
    one legend; each line the mean over seeds of a trailing moving average over `window` steps.
    `runs`: {variant: [metrics rows per seed]}."""
    plt = utils.pyplot()
    fig, axes = plt.subplots(1, len(RESTART_KEYS), figsize=(4.2 * len(RESTART_KEYS), 3.8), sharex=True,
                             sharey=True, squeeze=False)
    import warnings

    # steps where no seed has a value
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    for ax, (key, title) in zip(axes[0], RESTART_KEYS.items()):
        for name, seeds in runs.items():
            series = []
            for rows in seeds:
                v = np.array([r.get(key) if r.get(key) is not None else np.nan for r in rows],
                             dtype=float)  # (steps,)
                series.append([np.nanmean(v[max(0, i - window + 1): i + 1])
                               if np.isfinite(v[max(0, i - window + 1): i + 1]).any()
                               else np.nan for i in range(len(v))])
            if series:
                k = min(len(x) for x in series)
                ax.plot(range(1, k + 1), np.nanmean([x[:k] for x in series], 0), label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"mean over seeds, moving average of {window} steps", fontsize=8)
    axes[0][0].set_ylim(-0.02, 1.02)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
    utils.save_png(fig, path, rect=(0, 0.08, 1, 1), bbox_inches="tight")


def copy_figure(src: str, dst: str) -> None:
    if os.path.exists(src):
        with utils.atomic_path(dst) as tmp, open(src, "rb") as a, open(tmp, "wb") as b:
            b.write(a.read())


def plot_mean_curves(mc: dict, mode: str, path: str, n_seeds: int) -> None:
    """Fig. 7 style: maj@k (solid) and pass@k (dotted) against tokens, mean over seeds, a band
    of one standard deviation of maj@k."""
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in mc.items():
        t, m, sd = np.array(c["tokens"]), np.array(c["maj"]), np.array(c["maj_sd"])
        (line,) = ax.plot(t, m, "-o", ms=3, label=f"{name} maj@k")
        ax.fill_between(t, m - sd, m + sd, color=line.get_color(), alpha=0.12)
        ax.plot(t, c["pass"], ":", color=line.get_color(), lw=1)
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{mode}: maj@k (solid), pass@k (dotted); mean of {n_seeds} seed(s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    utils.save_png(fig, path, bbox_inches="tight")


def plot_training(seed_dirs: dict, path: str) -> None:
    """Fig. 9 style: training accuracy of the revised attempt and completion length per RL
    step, mean over seeds, for MRT-B and its baselines."""
    plt = utils.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in GRPO_VARIANTS:
        runs = []
        for d in seed_dirs.values():
            p = os.path.join(d, "grpo", v, "metrics.jsonl")
            if os.path.exists(p):
                runs.append(utils.read_records(p, ["step", "accuracy", "completion_len_mean"]))
        if not runs:
            continue
        k = min(len(r) for r in runs)
        steps = [r["step"] for r in runs[0][:k]]
        for ax, key in zip(axes, ("accuracy", "completion_len_mean")):
            ax.plot(steps, np.mean([[x[key] for x in r[:k]] for r in runs], 0), label=f"grpo-{v}")
    axes[0].set_ylabel("training accuracy (revised attempt)")
    axes[1].set_ylabel("completion tokens (mean)")
    for ax in axes:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    utils.save_png(fig, path)


# ---- Main ----------------------------------------------------------------------------


def stage_env(args: Args, environ: dict) -> dict:
    """The environment of every stage process: the cores shared between the --jobs stages
    that run side by side (unless OMP_NUM_THREADS is set), vLLM eager mode per --eager."""
    env = dict(environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = str(max(1, utils.usable_cores() // args.jobs))
    if args.eager == "on" or (args.eager == "auto" and args.quick):
        env["MRT_VLLM_EAGER"] = "1"
    elif args.eager == "off":
        env["MRT_VLLM_EAGER"] = "0"
    return env


def main(args: Args) -> str:
    import toy

    if args.jobs < 1:
        raise utils.UserError(f"--jobs must be >= 1, got {args.jobs}")
    if args.eager not in ("on", "off", "auto"):
        raise utils.UserError(f"--eager must be on, off or auto, got {args.eager!r}")
    preset = "quick" if args.quick else "full"
    sizes = SIZES[preset]
    seeds = args.seeds or sizes["seeds"]
    out = args.out or os.path.join("runs", "study", preset)
    results_md = args.results or (os.path.join(out, "RESULTS.md") if args.quick else "RESULTS.md")
    fig_dir = os.path.join(os.path.dirname(results_md) or ".", "results")
    base = toy.ensure_built()["base"]
    t0 = time.time()
    if not args.aggregate_only:
        env = stage_env(args, dict(os.environ))

        plans = {seed: [st for st in stages(os.path.join(out, f"seed{seed}"), seed, sizes, base)
                        if not args.only or st.name in args.only] for seed in seeds}
        for seed, plan in plans.items():
            utils.print0(f"seed {seed}: {len(plan)} stages -> {os.path.join(out, f'seed{seed}')}")
        run_stages(plans, {seed: os.path.join(out, f"seed{seed}", "logs") for seed in seeds}, args.jobs, env)
    text = aggregate(out, seeds, results_md, fig_dir)
    utils.print0(text)
    utils.print0(f"wrote {results_md} and {fig_dir}/ in {time.time() - t0:.0f}s")
    return results_md


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
