"""toy.py: the embedded default task of every mrt stage, its ground truth, and its base model.

The task: multi-step arithmetic in the paper's solution format. A problem is a start value
and 3-5 operations; the solution computes one operation per step and boxes the result:

    Problem: Start with 17. Add 5. Multiply by 2. Subtract 8. What is the result?
    Solution:
    Step 1: 17 + 5 = 22
    Step 2: 22 * 2 = 44
    Step 3: 44 - 8 = 36
    The answer is \\boxed{36}

Every step of a solution can be checked, so the ground truth of an attempt (its first wrong
step) and of a backtrack (whether restarting at step k can fix the attempt) is exact: infogain.py,
grpo.py and study.py report it next to what the method itself sees.

The base model is a tiny Llama pretrained from scratch on this task by toy_pretrain.py (the
recipe: documents with slips, so that mistakes are real and random). Its build ships with the
project under assets/toy/ (the splits, the tokenizer and weights, base/build.json), so that every
machine trains from the same bytes: the default toy (runs/toy: `paths`, `ensure_built`,
`default_model`) is that folder while its build.json carries this code's fingerprint
(`fingerprint`: the code that defines the build and its arguments). After a change to the build's
code the shipped files are stale: the stages then build runs/toy on first use (a few minutes), and
tests/test_toy.py fails until the shipped folder is rebuilt (`python toy.py --out assets/toy`).

Run (the build itself is toy_pretrain.py; this file runs it with the same flags):
    python toy.py                       # rebuilds runs/toy, prints the base's pass@1 and pass@8
    python toy.py --preset tiny --out runs/toy-tiny   # about a minute, for tests
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import utils

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = "runs/toy"
"""Where the default toy is built when the shipped one is stale (relative to the working directory)."""
SHIPPED_DIR = os.path.join(HERE, "assets", "toy")
"""The shipped build of the default toy (read only: nothing writes into it but a rebuild)."""
BUILD_FILE = os.path.join(HERE, "toy_pretrain.py")
"""The build's own code: run as a command (it imports this module, never the reverse)."""

# ---- The task ------------------------------------------------------------------------

OP_WORDS = {"+": "Add", "-": "Subtract", "*": "Multiply by"}
MAX_VALUE, MAX_ARG = 49, 9  # the default task's range: values 0-49, + and - arguments 1-9


def make_problem(rng: random.Random, max_value: int = MAX_VALUE, max_arg: int = MAX_ARG) -> dict:
    """One problem: a start value (2 to 0.6 max_value) and 3-5 operations, every
    intermediate value in [0, max_value], arguments of + and - at most max_arg, of * 2 to 5."""
    n_ops = rng.randint(3, 5)
    value = rng.randint(2, max_value * 60 // 99)
    start, ops = value, []
    for _ in range(n_ops):
        choices = [op for op, ok in (("+", value < max_value), ("-", value > 0), ("*", 1 <= value <= max_value // 2))
                   if ok]
        op = rng.choice(choices)
        if op == "*":
            arg = rng.randint(2, min(5, max_value // value))
        elif op == "+":
            arg = rng.randint(1, min(max_arg, max_value - value))
        else:
            arg = rng.randint(1, min(max_arg, value))
        value = apply_op(value, op, arg)
        ops.append((op, arg))
    text = f"Start with {start}. " + " ".join(f"{OP_WORDS[o]} {a}." for o, a in ops)
    text += " What is the result?"
    return {"problem": text, "answer": str(value), "start": start, "ops": ops}


def apply_op(value: int, op: str, arg: int) -> int:
    return value + arg if op == "+" else value - arg if op == "-" else value * arg


def solution_steps(start: int, ops: list, rng: random.Random | None = None, slip: float = 0.0, first: int = 1):
    """Step lines (numbered from `first`) and final value. With rng and slip > 0, each result is
    wrong with probability slip (off by a small amount or by ten), and later steps use the wrong value."""
    value, lines = start, []
    for i, (op, arg) in enumerate(ops, first):
        result = apply_op(value, op, arg)
        if rng is not None and slip > 0 and rng.random() < slip:
            wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
            result = wrong if wrong >= 0 else result + 1
        lines.append(f"Step {i}: {value} {op} {arg} = {result}")
        value = result
    return lines, value


def render_solution(lines: list[str], final) -> str:
    return "\n".join(lines) + f"\nThe answer is \\boxed{{{final}}}"


def make_splits(seed: int, n_train: int, n_test: int, max_value: int = MAX_VALUE,
                max_arg: int = MAX_ARG) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test problem lists (by problem text), deterministic for a seed."""
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < n_train + n_test:
        p = make_problem(rng, max_value, max_arg)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            problems.append(p)
    return problems[n_test:], problems[:n_test]


# ---- Ground truth of attempts and restarts (pure: used by infogain.py, grpo.py and study.py) ----

_PROBLEM = re.compile(r"Start with (\d+)\.((?: (?:Add|Subtract|Multiply by) \d+\.)+) What is the result\?")
_OP = re.compile(r" (Add|Subtract|Multiply by) (\d+)\.")
STEP_LINE = re.compile(r"Step (\d+): (-?\d+) ([+*-]) (\d+) = (-?\d+)")
"""A step line as solution_steps writes it; a slipped chain can go below 0 (operand and result)."""
STEP_FIELDS = ("step", "operand", "op", "arg", "result")
"""STEP_LINE's groups, in order."""
RESTART_CLASSES = ("before", "at", "after", "beyond", "z0-correct")
"""Where a restart step k lies against z0's first wrong step f: before (k < f), at (k == f),
after (k > f), beyond (k outside 1..number of operations, z0 wrong), z0-correct (no wrong step)."""


def parse_problem(text: str) -> tuple[int, list[tuple[str, int]]] | None:
    """(start, [(op, arg), ...]) of a toy problem text (as make_problem writes it, anywhere in
    `text`), None when the text holds no toy problem."""
    m = _PROBLEM.search(text)
    if m is None:
        return None
    words = {w: o for o, w in OP_WORDS.items()}
    return int(m.group(1)), [(words[w], int(a)) for w, a in _OP.findall(m.group(2))]


def first_wrong_step(attempt: str, start: int, ops: list) -> int | None:
    """The first wrong step (1-based) of an attempt at the problem (start, ops); None when every
    step is right and the boxed answer is the result. The attempt's lines that start with
    "Step" are its steps, in order: the i-th must read exactly "Step i: v op arg = r" with v the
    true value before step i (so an operand that does not follow from the line above is wrong),
    op and arg the problem's i-th operation and r its true result. A missing step is wrong; when
    all len(ops) steps are right but the box is missing or wrong (or extra step lines follow),
    the answer line is the wrong one: len(ops) + 1."""
    steps = [line.strip() for line in attempt.splitlines() if line.strip().startswith("Step")]
    value = start
    for i, (op, arg) in enumerate(ops, 1):
        m = STEP_LINE.fullmatch(steps[i - 1]) if i <= len(steps) else None
        result = apply_op(value, op, arg)
        if m is None or (int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))) \
                != (i, value, op, arg, result):
            return i
        value = result
    box = utils.extract_boxed(attempt)
    return None if len(steps) == len(ops) and box is not None and box == str(value) else len(ops) + 1


def restart_class(first_wrong: int | None, k: int, n_steps: int) -> str:
    """One of RESTART_CLASSES for a restart at step k of an attempt whose first wrong step is
    `first_wrong` (first_wrong_step) in a problem of n_steps operations."""
    if first_wrong is None:
        return "z0-correct"
    if not 1 <= k <= n_steps:
        return "beyond"
    return "before" if k < first_wrong else "at" if k == first_wrong else "after"


def restart_can_fix(first_wrong: int | None, k: int, n_steps: int) -> bool | None:
    """Whether a revised attempt restarting at step k (steps 1..k-1 of the attempt stand) can
    end right: k within 1..n_steps and k <= first_wrong. None when the attempt is right (no
    restart is needed)."""
    if first_wrong is None:
        return None
    return 1 <= k <= n_steps and k <= first_wrong


def restart_truth(problem: str, z0: str, k: int | None) -> dict | None:
    """{first_wrong, class, can_fix} of a backtrack continuation restarting at step k after the
    attempt z0 (k None: the continuation names no restart step; class "none", can_fix False
    when z0 is wrong); None when `problem` is not a toy problem."""
    parsed = parse_problem(problem)
    if parsed is None:
        return None
    start, ops = parsed
    f = first_wrong_step(z0, start, ops)
    if k is None:
        return {"first_wrong": f, "class": "z0-correct" if f is None else "none", "can_fix": None if f is None else False}
    return {"first_wrong": f, "class": restart_class(f, k, len(ops)), "can_fix": restart_can_fix(f, k, len(ops))}


def restart_precision(items: list[dict]) -> dict:
    """Restart precision over continuations, each {"truth": restart_truth(...) or None,
    "outcome": 0/1 of the revised attempt}: among those after a wrong z0 (class not
    z0-correct; None truths are left out), the share whose restart can fix it (fixable),
    the share at exactly the first wrong step (at_first_wrong), and their outcome (z2 accuracy
    after a wrong z0); n counts them. Shares are None when there are none."""
    wrong = [x for x in items if x["truth"] is not None and x["truth"]["first_wrong"] is not None]
    share = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {"n": len(wrong), "fixable": share([bool(x["truth"]["can_fix"]) for x in wrong]),
            "at_first_wrong": share([x["truth"]["class"] == "at" for x in wrong]),
            "z2_acc_z0_wrong": share([float(x["outcome"]) for x in wrong])}


# ---- The build: its arguments, fingerprint and folders -------------------------------


@dataclass
class Args:
    out: str = DEFAULT_DIR
    """output folder: data/, base/ and the training log go here"""
    preset: str = "default"
    """model size and budget: tiny (tests), default, bench (~25M parameters)"""
    seed: int = 0
    """seeds the problems, the tokenizer corpus, the initialisation and the data order"""
    n_train: int = 20000
    """training problems (used by pretraining and by every later stage)"""
    n_test: int = 256
    """held-out test problems"""
    max_value: int = MAX_VALUE
    """largest start or intermediate value of a problem (make_problem)"""
    max_arg: int = MAX_ARG
    """largest argument of an Add or Subtract"""
    slip: float = 0.10
    """per-step probability that a pretraining solution's result is wrong (higher slips push the
    base's pass@1 under the 20 percent the task asks for)"""
    mu_frac: float = 0.15
    """fraction of pretraining examples that teach the forced-answer meta-prover"""
    pack: int = 3
    """documents per pretraining sequence: one document is about 100 tokens, a backtrack
    trace or a linearized stream is longer, and a model pretrained on single documents fails
    at the positions it never trained"""
    note_frac: float = 0.02
    """fraction of pretraining examples that are stand-alone notes holding the backtrack
    marker's words (never inside a solution)"""
    retry_frac: float = 0.30
    """fraction of pretraining examples that are retries: a slipped attempt, a retry line
    ("Wait, let me check that."), and the attempt redone from a random step carrying the loss.
    A real base model has read such revisions; the toy needs them to write a revised attempt
    after the backtrack cue at all"""
    recall_frac: float = 0.20
    """fraction of pretraining examples that are recalls: a slipped attempt, "Recall:", then
    some of its step labels each with the operand its line starts from ("Step k: v"), the copy
    a restart's first line needs"""
    steps: int = 0
    """optimizer steps (0: the preset's)"""
    eval_samples: int = 8
    """samples per test problem for the pass@1 / pass@k report (0 skips it)"""
    threads: int = 0
    """torch CPU threads (0: all cores)"""


def build_code(task_source: str, recipe_source: str) -> bytes:
    """The code that defines a toy build, as the fingerprint hashes it: every top-level statement
    of recipe_source (toy_pretrain.py) and those of task_source (toy.py) that it names as
    `toy.<name>`, with the ones these name in turn, each cut from its source text with every
    docstring (string statement) left out. So a docstring, a comment between definitions or a
    change to code the build does not use (the ground truth, ensure_built) keeps the fingerprint;
    any other change to that code changes it."""
    import ast

    def cut(source: str, nodes) -> bytes:  # the nodes' text in order, their string statements removed
        data = source.encode()  # ast offsets count UTF-8 bytes
        starts = [0]
        for line in data.splitlines(keepends=True):
            starts.append(starts[-1] + len(line))
        at = lambda line, col: starts[line - 1] + col  # noqa: E731
        out = []
        for node in nodes:
            pos = at(min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]), 0)
            docs = sorted((at(n.lineno, n.col_offset), at(n.end_lineno, n.end_col_offset))
                          for n in ast.walk(node)
                          if isinstance(n, ast.Expr) and isinstance(getattr(n.value, "value", None), str))
            for a, b in docs:
                out.append(data[pos:a])
                pos = b
            out.append(data[pos:at(node.end_lineno, node.end_col_offset)] + b"\n")
        return b"".join(out)

    recipe, task = ast.parse(recipe_source), ast.parse(task_source)
    defs = {}  # name: the top-level statement of task_source that defines it
    for node in task.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        for target in node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []:
            defs.update((n.id, node) for n in ast.walk(target) if isinstance(n, ast.Name))
    todo = [n.attr for n in ast.walk(recipe) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "toy"]
    used = set()
    while todo:
        node = defs.get(todo.pop())
        if node is not None and id(node) not in used:
            used.add(id(node))
            todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    return cut(recipe_source, recipe.body) + cut(task_source, [n for n in task.body if id(n) in used])


def fingerprint(args: Args) -> str:
    """Hash of the code that defines a build (build_code of this file and toy_pretrain.py), the
    prompt format and marker strings it writes (utils), and the build arguments but out, threads
    and eval_samples: a built folder whose build.json carries another fingerprint is stale."""
    import hashlib

    code = build_code(open(os.path.join(HERE, "toy.py")).read(), open(BUILD_FILE).read())
    fields = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("out", "threads", "eval_samples")}
    strings = [utils.build_prompt(None, "{problem}"), utils.MU_SUFFIX, utils.BACKTRACK_MARKER]
    return hashlib.sha1(code + json.dumps([fields, strings], sort_keys=True).encode()).hexdigest()[:16]


def built_fingerprint(model_dir: str) -> str | None:
    """The fingerprint in model_dir's build.json: the toy build that folder is; None for any
    other folder (no build.json, or one that is not a build's report)."""
    return utils.json_field(os.path.join(model_dir, "build.json"), "fingerprint")


def files(root: str) -> dict:
    """{'base', 'train', 'test'}: the model folder and the two splits of the build under root."""
    return {"base": os.path.join(root, "base"), "train": os.path.join(root, "data", "train.jsonl"),
            "test": os.path.join(root, "data", "test.jsonl")}


def is_built(root: str = DEFAULT_DIR, preset: str = "default", steps: int = 0) -> bool:
    """Whether root itself holds an up-to-date build (its build.json's fingerprint is this code's
    for these arguments; steps 0: the preset's) with both splits. A missing or unreadable
    build.json is no build."""
    p = files(root)
    current = built_fingerprint(p["base"]) == fingerprint(Args(preset=preset, steps=steps))
    return current and all(os.path.exists(v) for v in p.values())


def toy_dir(root: str = DEFAULT_DIR) -> str:
    """The folder the toy at root is read from: for the default root (runs/toy, relative to the
    working directory or to this checkout) the shipped build while it is up to date
    (is_built(SHIPPED_DIR)), else root itself."""
    default = os.path.abspath(root) in (os.path.abspath(DEFAULT_DIR), os.path.join(HERE, DEFAULT_DIR))
    return SHIPPED_DIR if default and is_built(SHIPPED_DIR) else root


def paths(root: str = DEFAULT_DIR) -> dict:
    """files() of toy_dir(root): the default toy's are the shipped files while they are current."""
    return files(toy_dir(root))


def build_splits(model_dir: str, seed: int = Args.seed) -> tuple[list[dict], list[dict]]:
    """The (train, test) problems of the toy build that wrote model_dir, from its build.json
    (seed, split sizes, value range; a field it lacks, from an older build: Args' default); for a
    folder without one (a later stage's model) the default problems of `seed`.
    bench/restart_steps.py and bench/solution_fields.py draw from them."""
    path = os.path.join(model_dir, "build.json")
    report = {**dataclasses.asdict(Args(seed=seed)), **(json.load(open(path)) if os.path.exists(path) else {})}
    return make_splits(*(report[k] for k in ("seed", "n_train", "n_test", "max_value", "max_arg")))


def ensure_built(root: str = DEFAULT_DIR, preset: str = "default", steps: int = 0,
                 eval_samples: int = 0) -> dict:
    """The files() of an up-to-date build at root, built first unless one is there (for the
    default toy at the default root: the shipped build while it is current, toy_dir). steps and
    eval_samples are toy.py's flags; the defaults are the build every script uses, without the
    base's pass@k measurement, a few thousand samples that no stage reads (`python toy.py`
    measures it). The build runs as a child process, `python toy_pretrain.py` on every core this
    process may run on; under torchrun (first use of `torchrun grpo.py` etc.) rank 0 starts it
    while the other ranks wait for it: the build's own vLLM engine must not live in a torchrun
    process (closing an engine ends the process group), and a collective barrier could time out
    during a build of minutes. With MRT_TOY_NO_BUILD set, a missing or stale build is an error
    instead."""
    if preset == "default" and not steps:
        root = toy_dir(root)
    if is_built(root, preset, steps):
        return files(root)
    if os.environ.get("MRT_TOY_NO_BUILD"):  # the tests set it when MRT_TOY_DIR names a build to use as it is
        raise utils.UserError(f"toy: {root} is missing or stale and MRT_TOY_NO_BUILD is set: no build here")
    if utils.is_main():
        import subprocess

        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS")}
        cmd = [sys.executable, BUILD_FILE, "--out", root, "--preset", preset, "--steps", str(steps),
               "--eval-samples", str(eval_samples), "--threads", str(utils.usable_cores())]
        utils.print0(f"toy: building {root} first: {' '.join(cmd)}")
        if subprocess.run(cmd, env=env).returncode != 0:
            raise utils.UserError(f"toy: the build of {root} failed "
                                  f"(run `python toy.py --out {root}` to see why)")
    else:
        while not is_built(root, preset, steps):
            time.sleep(1)
    utils.barrier()
    return files(root)


def default_model() -> tuple[str, dict]:
    """The embedded default of the stages that train: runs/warmstart/model if warmstart.py
    fine-tuned it from this toy build (its mrt.json's base_build), else the toy base (built if
    missing; a warmstart model of another build is left alone, with a line saying so); and the
    toy's paths (paths)."""
    toy_paths = ensure_built()
    warm = os.path.join("runs", "warmstart", "model")
    if os.path.isdir(warm):
        built = utils.json_field(os.path.join(warm, "mrt.json"), "base_build")
        if built is not None and built == built_fingerprint(toy_paths["base"]):
            return warm, toy_paths
        utils.print0(f"{warm} was not fine-tuned from this toy build: "
                     f"starting from the toy base {toy_paths['base']}")
    return toy_paths["base"], toy_paths


# ---- Helpers of grpo.py: restart precision of a step's continuations against the ground truth ----


def restart_metrics(rows: list[dict], z0s: dict) -> dict:
    """grpo.py's metrics of one step's backtrack continuations (rollout rows, each with its problem,
    episodes and outcome) over all ranks (a collective call: every rank makes it): restart_precision
    of restart_truth against each row's z0 (z0s: {problem id: z0}) as restart_fixable,
    restart_at_first_wrong, z2_acc_z0_wrong and z0_wrong_continuations; {} when no continuation
    follows a wrong z0 of a toy problem."""
    truth = [{"truth": restart_truth(r["problem"]["problem"], z0s[r["problem"]["id"]],
                                     r["episodes"].restart_step if r["episodes"] else None),
              "outcome": r["outcome"]} for r in rows]
    prec = restart_precision([x for part in utils.all_gather(truth) for x in part])
    if not prec["n"]:
        return {}
    return dict(restart_fixable=prec["fixable"], restart_at_first_wrong=prec["at_first_wrong"],
                z2_acc_z0_wrong=prec["z2_acc_z0_wrong"], z0_wrong_continuations=prec["n"])

if __name__ == "__main__":  # the build is toy_pretrain.py's, run here as its own __main__ (it imports toy)
    import runpy

    runpy.run_path(BUILD_FILE, run_name="__main__")
