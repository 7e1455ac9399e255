"""The benchmarks under bench/ still start and still drive the stages with flags the stages
accept. Nothing runs the benches themselves (minutes each, some need trl or root), so a
renamed flag used to surface only at the next measurement; here every bench's --help runs,
and each bench that drives a stage builds that stage's arguments through its own function
(grpo_args, grpo_argv, toy_args), which these tests call and resolve. No engine starts."""

from __future__ import annotations

import glob
import importlib.util
import os
import runpy
import sys

import pytest

import grpo
import toy
import toy_pretrain  # noqa: E402
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHES = sorted(glob.glob(os.path.join(ROOT, "bench", "*.py")))


def load(name: str):
    """bench/<name>.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(path: str, argv: list[str], monkeypatch) -> int:
    """The exit status of `python <path> argv` run in this process (its `__main__` block)."""
    monkeypatch.setattr(sys, "argv", [path, *argv])
    env = dict(os.environ)
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:  # a bench may set defaults such as OMP_NUM_THREADS for its own children
        os.environ.clear()
        os.environ.update(env)
    return 0


def test_every_bench_is_found():
    names = {os.path.basename(p) for p in BENCHES}
    assert {"grpo_vs_trl.py", "restart_steps.py", "rl_headroom.py", "memory.py"} <= names


@pytest.mark.parametrize("path", BENCHES, ids=os.path.basename)
def test_help(path, monkeypatch, capsys):
    """Each bench's imports still resolve and its command line still builds."""
    assert run_bench(path, ["--help"], monkeypatch) == 0
    assert "usage:" in capsys.readouterr().out


def test_grpo_vs_trl_grpo_args():
    bench = load("grpo_vs_trl")
    a = bench.parser().parse_args(["--model", "m", "--data", "d.jsonl", "--work", "w", "--length", "96",
                                   "--prompts", "4", "--group", "6", "--micro", "8"])
    args = grpo.resolve_args(bench.grpo_args(a), 1)
    assert (args.variant, args.model, args.train_data, args.out) == ("direct", "m", "d.jsonl", os.path.join("w", "grpo"))
    assert (args.prompts_per_step, args.group_size, args.micro_batch_size) == (4, 6, 8)
    assert (args.max_tokens, args.beta, args.warmup_ratio, args.eval_problems) == (96, 0.0, 0.0, 0)


def test_grpo_vs_trl_defaults_resolve():
    """The bench's default sizes are a valid grpo.py run (micro-batch divides the batch)."""
    bench = load("grpo_vs_trl")
    a = bench.parser().parse_args(["--model", "m", "--data", "d.jsonl"])
    args = grpo.resolve_args(bench.grpo_args(a), 1)
    assert args.prompts_per_step * args.group_size == a.prompts * a.group
    assert args.max_tokens == a.length


def test_grpo_vs_trl_bad_micro_batch(monkeypatch, capsys):
    code = run_bench(os.path.join(ROOT, "bench", "grpo_vs_trl.py"), ["--micro", "5"], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--micro 5 must divide" in err[-1]


def test_grpo_vs_trl_toy_args():
    bench = load("grpo_vs_trl")
    args = bench.toy_args("runs/toy-bench")
    recipe = toy_pretrain.recipe(args)
    assert (args.out, args.eval_samples, recipe["steps"]) == ("runs/toy-bench", 0, 20)
    assert recipe["hidden"] > toy_pretrain.recipe(toy.Args())["hidden"]  # the bench preset is the larger model


def test_grpo_vs_trl_trl_config():
    """TRL's side, where trl is installed (bench/requirements.txt; not a project requirement)."""
    trl = pytest.importorskip("trl")
    bench = load("grpo_vs_trl")
    a = bench.parser().parse_args(["--model", "m", "--data", "d.jsonl"])
    cfg = trl.GRPOConfig(**bench.trl_config_kwargs(a))
    assert cfg.max_completion_length == a.length and cfg.num_generations == a.group


def test_restart_steps_grpo_args():
    bench = load("restart_steps")
    args = bench.grpo_args("some/model", 3)
    assert (args.model, args.group_size, args.variant, args.alpha) == ("some/model", 3, "outcome", 0.0)
    for name in ("max_prompt_length", "max_tokens", "temperature"):  # read by the bench after resolving
        assert getattr(args, name) is not None and getattr(args, name) > 0, name


def test_rl_headroom_grpo_argv():
    bench = load("rl_headroom")
    argv = bench.grpo_argv("outcome", "m", {"train": "tr.jsonl", "test": "te.jsonl"}, "o", 3)
    args = grpo.resolve_args(utils.parse_args(grpo.Args, argv), 1)
    assert (args.preset, args.variant, args.model, args.out, args.seed) == ("toy", "outcome", "m", "o", 3)
    assert (args.train_data, args.test_data) == ("tr.jsonl", "te.jsonl")


def test_rl_headroom_bad_starts(monkeypatch, capsys):
    code = run_bench(os.path.join(ROOT, "bench", "rl_headroom.py"), ["--starts", "base,nope"], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--starts takes base and/or oracle" in err[-1]



def test_restart_steps_bad_input(tmp_path, monkeypatch, capsys):
    """A missing model folder, or --samples 1 (no GRPO group), is one error line and exit 2,
    before anything is built or loaded."""
    path = os.path.join(ROOT, "bench", "restart_steps.py")
    assert run_bench(path, [str(tmp_path / "none")], monkeypatch) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: restart_steps: no such model folder: {tmp_path / 'none'}"]
    assert run_bench(path, [str(tmp_path), "--samples", "1"], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --group-size must be at least 2")


def test_bonus_cost_grpo_args():
    """The three arms resolve to the same run but for the bonus: outcome-only, forced mu,
    rollout mu; the realistic size runs at paper lengths."""
    bench = load("bonus_cost")
    a = bench.parser().parse_args(["--work", "w", "--steps", "4", "--mu-samples", "4"])
    data = {"train": "tr.jsonl", "test": "te.jsonl"}
    arms = {arm: grpo.resolve_args(bench.grpo_args(a, arm, "m", data, 1), 1) for arm in bench.ARMS}
    assert [(x.variant, x.alpha, x.mu_mode) for x in arms.values()] == [
        ("outcome", 0.0, "forced"), ("mrt", 1.0, "forced"), ("mrt", 1.0, "rollout")]
    for arm, x in arms.items():
        assert (x.model, x.train_data, x.out) == ("m", "tr.jsonl", os.path.join("w", "toy", f"{arm}-1"))
        assert (x.steps, x.mu_samples) == (4, 4)
        assert (x.prompts_per_step, x.group_size, x.max_tokens, x.eval_problems, x.seed) == (16, 8, 128, 0, 0)
    real = bench.grpo_args(bench.parser().parse_args(["--size", "realistic"]), "rollout", "m", data)
    real = grpo.resolve_args(real, 1)
    assert (real.preset, real.max_tokens, real.mu_rollout_tokens, real.group_size) == ("paper", 1024, 1024, 4)
