"""Unit tests of the shared modules (utils.py, training.py, sampling.py) that need no
engine: answer extraction and grading (timeouts on and off the main thread), validated
reading and atomic writing, the metrics logger, the command line, bad-input handling,
padding, log-probabilities and prompts."""

from __future__ import annotations

import ast
import json
import multiprocessing as mp
import os
import re
import runpy
import stat
import subprocess
import sys
import threading
import time
import dataclasses
import importlib.util
from dataclasses import dataclass, field

import pytest
import torch

import sampling
import training
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHOLOGICAL = "\\boxed{9^{9^{9^{9}}}}"  # math-verify/sympy work on this for minutes without a timeout


# --------------------------------------------------------------------------------------
# extract_boxed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("The answer is \\boxed{42}", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                      # nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # two levels
    ("first \\boxed{1} then \\boxed{2}", "2"),                      # several: the last
    ("\\fbox{7}", "7"),
    ("\\boxed {x}", "x"),                                           # space before the brace
    ("\\boxed{ 5 }", "5"),
    ("\\boxed{}", ""),
    ("\\boxed{1} and then \\boxed{2", None),     # unterminated last box: not the earlier one
    ("\\boxed{\\frac{1}{2}", None),             # unbalanced
    ("no box at all", None),
    ("", None),
    (None, None),
    ("\\boxed{a}}", "a"),                        # extra closing brace after a complete box
])
def test_extract_boxed(text, want):
    assert utils.extract_boxed(text) == want


# --------------------------------------------------------------------------------------
# grade
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, gold, want", [
    ("so \\boxed{42}", "42", 1.0),
    ("\\boxed{43}", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac34}", "\\dfrac{3}{4}", 1.0),
    ("\\boxed{2+2\\sqrt3}", "2\\sqrt{3}+2", 1.0),
    ("\\boxed{2+3\\sqrt3}", "2\\sqrt{3}+2", 0.0),
    ("\\boxed{3}", "x=3", 1.0),
    ("\\boxed{10}", "10\\%", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),
    ("\\boxed{Paris}", "Paris", 1.0),          # non-math: exact match
    ("\\boxed{\\text{Paris}}", "Paris", 1.0),
    ("\\boxed{London}", "Paris", 0.0),
    ("The answer is 42.", "42", 0.0),          # no box: no credit
    ("\\boxed{1} wait \\boxed{42", "42", 0.0),  # unterminated last box: no credit from the first
    ("\\boxed{}}{{\\frac{", "42", 0.0),         # garbage
    ("\\boxed{\\sqrt{}^^_}", "42", 0.0),
    (None, "42", 0.0),
])
def test_grade(text, gold, want):
    assert utils.grade(text, gold) == want


def test_grade_toy_answers():
    """The toy task's own format goes through the same grader."""
    assert utils.grade("Step 1: 17 + 25 = 42\nThe answer is \\boxed{42}", 42) == 1.0
    assert utils.grade("Step 1: 17 + 25 = 41\nThe answer is \\boxed{41}", "42") == 0.0


@pytest.mark.parametrize("gold", ["", "   ", None, "\\frac{1}{", "{42", "\\"])
def test_grade_bad_gold_is_reported_never_rewarded(gold, capsys):
    utils._GOLD_WARNED.discard("" if gold is None else gold.strip())
    assert utils.grade("\\boxed{42}", gold) == 0.0
    assert utils.grade("\\boxed{\\frac{1}{}", gold) == 0.0
    err = capsys.readouterr().err
    assert "warning: gold answer" in err and "does not parse" in err


def _in_thread(fn, *args, limit=60.0):
    """Run fn(*args) on a daemon thread and return (result, seconds); fail (rather than
    hang) if it has not finished after `limit` seconds."""
    out = {}

    def target():
        t0 = time.time()
        out["result"] = fn(*args)
        out["seconds"] = time.time() - t0

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), f"{fn.__name__}{args} still running after {limit} s"
    return out["result"], out["seconds"]


@pytest.fixture
def fresh_grading_pool():
    """Shut down the off-main-thread grading worker, so the next call starts a new one."""
    with utils._GRADE_POOL_LOCK:
        if utils._GRADE_POOL is not None:
            utils._GRADE_POOL.shutdown()
            utils._GRADE_POOL = None


def test_grade_off_main_thread(fresh_grading_pool):
    # The worker's start-up (a spawned process importing math-verify: seconds) must not count
    # against the timeout: a true answer graded with a short timeout is still right.
    assert _in_thread(utils.grade, "\\boxed{\\frac{1}{2}}", "0.5", 0.5)[0] == 1.0
    assert _in_thread(utils.grade, "\\boxed{0.4}", "0.5")[0] == 0.0
    assert _in_thread(utils.grade, "\\boxed{2+2\\sqrt3}", "2\\sqrt{3}+2")[0] == 1.0


def test_grade_timeout_off_main_thread():
    # Without a working timeout this comparison runs for minutes and the thread is still
    # alive when _in_thread gives up: the test fails instead of passing slowly.
    result, seconds = _in_thread(utils.grade, PATHOLOGICAL, "1", 1.0)
    assert result == 0.0 and seconds < 30
    # the killed worker is replaced: grading goes on
    assert _in_thread(utils.grade, "\\boxed{\\frac{1}{2}}", "0.5")[0] == 1.0


def test_grade_timeout_does_not_cost_other_threads():
    """A thread's slow comparison must not make a concurrent thread's right answer wrong."""
    results = {}

    def slow():
        results["slow"] = utils.grade(PATHOLOGICAL, "1", timeout=1.0)

    def fast():
        results["fast"] = utils.grade("\\boxed{\\frac{1}{2}}", "0.5", timeout=1.0)

    threads = [threading.Thread(target=slow, daemon=True), threading.Thread(target=fast, daemon=True)]
    threads[0].start()
    time.sleep(0.3)
    threads[1].start()
    for th in threads:
        th.join(60)
    assert results == {"slow": 0.0, "fast": 1.0}


def _grade_in_worker(args):
    text, gold, timeout = args
    t0 = time.time()
    return utils.grade(text, gold, timeout=timeout), time.time() - t0


def test_grade_timeout_in_worker_process():
    """In a worker process (its main thread) math-verify's own SIGALRM timeout applies."""
    with mp.get_context("spawn").Pool(1) as pool:
        res = pool.map_async(_grade_in_worker, [(PATHOLOGICAL, "1", 1.0), ("\\boxed{0.5}", "\\frac12", 5.0)])
        (slow, slow_s), (ok, _) = res.get(timeout=90)
    assert slow == 0.0 and slow_s < 30
    assert ok == 1.0


# --------------------------------------------------------------------------------------
# read_records
# --------------------------------------------------------------------------------------


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_read_records_ok(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"problem": "p1", "answer": "1"}\n\n  \n{"problem": "p2", "answer": 2, "x": 0}\n')
    assert utils.read_records(p, ["problem", "answer"]) == [
        {"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": 2, "x": 0}]


def test_read_records_rename(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"question": "q", "solution": "s"}\n')
    rows = utils.read_records(p, ["problem", "solution"], rename={"question": "problem"})
    assert rows == [{"problem": "q", "solution": "s"}]
    bad = _write(tmp_path / "e.jsonl", '{"question": "q", "solution": "s"}\n{"solution": "t"}\n')
    with pytest.raises(utils.UserError, match=r"e.jsonl:2: missing field 'question'"):  # the file's own name
        utils.read_records(bad, ["problem"], rename={"question": "problem"})


@pytest.mark.parametrize("content, where, what", [
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n', 2, "malformed JSON"),
    ('{"problem": "a", "answer": "1"}\n\n{"problem": "b"}\n', 3, "missing field 'answer'"),
    ('{"problem": "a", "answer": null}\n', 1, "missing field 'answer'"),
    ('["problem", "answer"]\n', 1, "expected a JSON object"),
    ('{"problem": "a", "answer": "1"}\n"just a string"\n', 2, "expected a JSON object"),
])
def test_read_records_errors_name_file_and_line(tmp_path, content, where, what):
    p = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(utils.UserError) as e:
        utils.read_records(p, ["problem", "answer"])
    msg = str(e.value)
    assert msg.startswith(f"{p}:{where}: ") and what in msg and "\n" not in msg


def test_read_records_missing_field_message(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"problem": "a"}\n')
    with pytest.raises(utils.UserError, match=r"d\.jsonl:1: missing field 'x'$"):
        utils.read_records(p, ["problem", "x"])


def test_read_records_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(utils.UserError) as e:
        utils.read_records(str(p), ["problem", "answer"])
    assert str(e.value) == f"{p}:2: not UTF-8"


def test_read_records_with_lines(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    assert utils.read_records(p, ["a"], with_lines=True) == [(1, {"a": 1}), (3, {"a": 2})]


def test_load_problems(tmp_path, toy_paths):
    p = _write(tmp_path / "d.jsonl", '{"q": "What is 1+1?", "a": " 2 "}\n\n{"q": "And 2+2?", "a": 4}\n{"q": "x", "a": 5}\n')
    got = utils.load_problems(p, "q", "a", limit=2)
    assert got == [{"id": 0, "problem": "What is 1+1?", "answer": "2"}, {"id": 1, "problem": "And 2+2?", "answer": "4"}]
    tok = utils.load_tokenizer(toy_paths["base"])
    with_prompts = utils.load_problems(p, "q", "a", tokenizer=tok)
    assert [r["prompt"] for r in with_prompts] == [utils.build_prompt(tok, r["problem"]) for r in with_prompts]
    short = min(len(utils.encode(tok, r["prompt"])) for r in with_prompts)
    kept = utils.load_problems(p, "q", "a", tokenizer=tok, max_prompt_tokens=short)
    assert kept and all(len(utils.encode(tok, r["prompt"])) <= short for r in kept) and len(kept) < 3
    with pytest.raises(utils.UserError, match=r"no problem's prompt fits in 1 tokens; raise --max-x$"):
        utils.load_problems(p, "q", "a", tokenizer=tok, max_prompt_tokens=1, too_long="raise --max-x")


@pytest.mark.parametrize("content, message", [
    ("", "{p}: holds no problems"),
    ("\n  \n", "{p}: holds no problems"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "{"}\n', "{p}:2: unparsable answer '{{'"),
    ('{"problem": "a", "answer": ""}\n', "{p}:1: unparsable answer ''"),
    ('{"problem": "a"}\n', "{p}:1: missing field 'answer'"),
])
def test_load_problems_bad_input(tmp_path, content, message):
    p = _write(tmp_path / "d.jsonl", content)
    with pytest.raises(utils.UserError) as e:
        utils.load_problems(p)
    assert str(e.value) == message.format(p=p)


def test_derive_seed():
    a = utils.derive_seed(0, "z0", "train", 1)
    assert a == utils.derive_seed(0, "z0", "train", 1) and 0 <= a < 2**31
    others = {utils.derive_seed(s, *parts) for s in (0, 1) for parts in (("z0", "train", 0), ("z0", "train", 1),
                                                                       ("z0", "test", 0), ("rollout", 0, 0))}
    assert len(others) == 8  # distinct seeds and parts give distinct seeds


def test_lr_lambda():
    f = training.lr_lambda(warmup=2, total=6)
    assert [round(f(s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    assert [training.lr_lambda(1, 4, "constant")(s) for s in range(4)] == [1.0, 1.0, 1.0, 1.0]


def test_model_format(tmp_path):
    assert utils.model_format(str(tmp_path)) == "direct"  # no card: a base or hub model
    (tmp_path / "mrt.json").write_text('{"format": "backtrack"}')
    assert utils.model_format(str(tmp_path)) == "backtrack"
    (tmp_path / "mrt.json").write_text('{"format": "tree"}')
    with pytest.raises(utils.UserError, match="format must be 'backtrack' or 'direct'"):
        utils.model_format(str(tmp_path))
    (tmp_path / "mrt.json").write_text('{"format": ')
    with pytest.raises(utils.UserError, match="malformed model card"):
        utils.model_format(str(tmp_path))


def test_hub_dataset_names():
    assert utils.hub_dataset("AI-MO/NuminaMath-CoT") == ("AI-MO/NuminaMath-CoT", "train")
    assert utils.hub_dataset("HuggingFaceH4/MATH-500:test") == ("HuggingFaceH4/MATH-500", "test")
    for local in ("tests/missing.jsonl", "data/train.jsonl", "x.parquet", "org/name.jsonl", "a/b/c"):
        assert utils.hub_dataset(local) is None, local


def test_hub_dataset_without_the_datasets_package_is_one_line():
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here")
    with pytest.raises(utils.UserError) as e:
        utils.read_records("AI-MO/NuminaMath-CoT:train")
    assert str(e.value) == ("AI-MO/NuminaMath-CoT:train: no such file, and reading it as a hub dataset needs the "
                            "datasets package (pip install datasets)")


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "trackio", "mlflow"])
def test_report_to_is_optional(tmp_path, backend):
    """Off by default (nothing imported); a backend that is not installed is a one-line error."""
    log = utils.JsonlLogger(str(tmp_path / "m.jsonl"))
    log.log({"step": 1, "loss": 0.5})
    assert log.tracker is None and (tmp_path / "m.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    package = "tensorboard" if backend == "tensorboard" else backend
    if backend != "mlflow" and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(utils.UserError) as e:
        utils.JsonlLogger(str(tmp_path / "n.jsonl"), report_to=backend)
    want = ("--report-to must be one of none, tensorboard, wandb, trackio, got 'mlflow'" if backend == "mlflow"
            else f"--report-to {backend} needs the {package} package (pip install {package})")
    assert str(e.value) == want


def test_read_records_missing_file(tmp_path):
    with pytest.raises(utils.UserError, match="no such file"):
        utils.read_records(str(tmp_path / "nope.jsonl"))


# --------------------------------------------------------------------------------------
# Atomic writes and the metrics logger
# --------------------------------------------------------------------------------------


def _rows_then_fail():
    yield {"a": 1}
    yield {"a": 2}
    raise RuntimeError("killed halfway")


def test_write_jsonl_and_json(tmp_path):
    p = str(tmp_path / "sub" / "out.jsonl")
    utils.write_jsonl(p, [{"a": 1}, {"b": "é"}])
    assert [json.loads(l) for l in open(p, encoding="utf-8")] == [{"a": 1}, {"b": "é"}]
    umask = utils._umask()
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    q = str(tmp_path / "o.json")
    utils.write_json(q, {"x": [1, 2]})
    assert json.load(open(q)) == {"x": [1, 2]}


def test_write_jsonl_leaves_nothing_when_it_fails(tmp_path):
    p = str(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError):
        utils.write_jsonl(p, _rows_then_fail())
    assert os.listdir(tmp_path) == []
    utils.write_jsonl(p, [{"old": True}])
    with pytest.raises(RuntimeError):
        utils.write_jsonl(p, _rows_then_fail())
    assert open(p).read() == '{"old": true}\n'  # the previous complete file stands
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_path(tmp_path):
    p = str(tmp_path / "model.bin")
    with pytest.raises(ValueError):
        with utils.atomic_path(p) as tmp:
            open(tmp, "w").write("half")
            raise ValueError("boom")
    assert os.listdir(tmp_path) == []
    with utils.atomic_path(p) as tmp:
        assert tmp != p and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").write("whole")
    assert open(p).read() == "whole" and os.listdir(tmp_path) == ["model.bin"]


def test_atomic_dir(tmp_path):
    d = str(tmp_path / "model")
    os.makedirs(d)
    _write(os.path.join(d, "old.txt"), "old")
    with pytest.raises(ValueError):
        with utils.atomic_dir(d) as tmp:
            _write(os.path.join(tmp, "new.txt"), "half")
            raise ValueError("boom")
    assert os.listdir(d) == ["old.txt"] and os.listdir(tmp_path) == ["model"]
    with utils.atomic_dir(d) as tmp:
        _write(os.path.join(tmp, "new.txt"), "new")
    assert os.listdir(d) == ["new.txt"] and os.listdir(tmp_path) == ["model"]  # replaced, no leftovers
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~utils._umask()


def test_jsonl_logger_resume(tmp_path):
    p = str(tmp_path / "metrics.jsonl")
    log = utils.JsonlLogger(p)
    for step in range(6):
        log.log({"step": step, "loss": 1.0 / (step + 1)})
    with open(p, "a") as f:
        f.write('{"step": 6, "lo')  # the run was killed in the middle of a line
    log = utils.JsonlLogger(p, resume_step=3)
    assert [json.loads(l)["step"] for l in open(p)] == [0, 1, 2, 3]
    log.log({"step": 4})
    assert [json.loads(l)["step"] for l in open(p)] == [0, 1, 2, 3, 4]
    utils.JsonlLogger(p)  # a fresh run starts an empty log
    assert open(p).read() == ""
    utils.JsonlLogger(None).log({"step": 0})  # no path: logs nowhere


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


@dataclass
class Args:
    lr: float = 1e-3
    """learning rate of the policy"""
    steps: int = 10
    """optimizer steps"""
    name: str = "run"
    """run name"""
    eager: bool = False
    """start vLLM without compilation"""
    shuffle: bool = True
    """shuffle the data"""
    ks: list[int] = field(default_factory=lambda: [1, 8])
    """k values of pass@k"""
    limit: int | None = None
    """use at most this many problems"""


def test_parse_args_defaults():
    assert utils.parse_args(Args, []) == Args()


def test_parse_args_values():
    a = utils.parse_args(Args, ["--lr", "3e-4", "--steps", "5", "--name", "x", "--eager", "--shuffle", "false",
                                "--ks", "1", "4", "16", "--limit", "7"])
    assert a == Args(lr=3e-4, steps=5, name="x", eager=True, shuffle=False, ks=[1, 4, 16], limit=7)
    assert utils.parse_args(Args, ["--eager", "true"]).eager is True
    assert utils.parse_args(Args, ["--no-shuffle"]).shuffle is False
    assert utils.parse_args(Args, ["--eager"]).limit is None
    assert utils.parse_args(Args, ["--limit", "3"]).limit == 3
    assert isinstance(utils.parse_args(Args, ["--steps", "5"]).steps, int)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--eager", "maybe"], "--eager"),
    (["--nope", "1"], "unrecognized arguments: --nope 1"),
])
def test_parse_args_rejects(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        utils.parse_args(Args, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: the usage, then one error line
    assert "error:" in err and message in err and "lambda" not in err


SCRIPTS = ("toy", "warmstart", "star", "grpo", "infogain", "evaluate", "r1_analysis", "study")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help(name, capsys, monkeypatch):
    """`python <script>.py --help` prints every flag (a stray % in a help text used to crash it).
    The script's `__main__` block runs in this process (runpy), imports already done."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage:"), out[-2000:]
    module = __import__(name)
    for f in dataclasses.fields(module.Args):
        assert f"--{f.name.replace('_', '-')}" in out, f.name


def test_one_vocabulary_across_scripts():
    """A flag that means the same thing has the same name in every script."""
    fields = {name: {f.name for f in dataclasses.fields(__import__(name).Args)} for name in SCRIPTS}
    readers = [n for n in SCRIPTS if "problem_field" in fields[n]]
    assert sorted(readers) == sorted(["warmstart", "star", "grpo", "infogain", "evaluate", "r1_analysis"])
    for name in SCRIPTS:
        assert not fields[name] & {"problem_key", "answer_key", "limit", "max_completion_length", "m"}, name
        # torchrun's argparse matches option prefixes anywhere on its command line: a script flag that
        # is a prefix of a torchrun option (--n: --nnodes, --nproc-per-node, ...) breaks `torchrun x.py --n 3`
        torchrun = ("nnodes", "nproc-per-node", "node-rank", "no-python", "numa-binding", "rdzv-backend", "standalone",
                    "max-restarts", "monitor-interval", "start-method", "role", "module", "run-path", "log-dir",
                    "redirects", "tee", "local-ranks-filter", "master-addr", "master-port", "local-addr")
        for f in fields[name]:
            flag = f.replace("_", "-")
            assert not any(t.startswith(flag) for t in torchrun), (name, flag)
        if "problem_field" in fields[name]:
            assert "answer_field" in fields[name]


def test_parse_args_help_from_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        utils.parse_args(Args, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--lr LR learning rate of the policy (default: 0.001)", "k values of pass@k (default: [1, 8])",
                 "use at most this many problems (default: None)", "--eager [EAGER] start vLLM without compilation"):
        assert text in out


@dataclass
class Shared:
    width: int = 4
    """width of the shared group"""
    depth: int = 2
    """depth of the shared group"""


@dataclass
class Stage(Shared):
    steps: int = 1
    """steps of this stage"""
    depth: int | None = None
    """depth, redeclared by the stage"""


def test_parse_args_inherited_group_after_own_flags(capsys):
    """A stage's own flags come first in --help, then its bases' with their docstrings; a field the stage
    declares again keeps its inherited position in the dataclass but takes the stage's default and help."""
    assert utils.parse_args(Stage, ["--width", "8"]) == Stage(width=8)
    with pytest.raises(SystemExit):
        utils.parse_args(Stage, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    own, redeclared, inherited = (out.index(t) for t in ("steps of this stage (default: 1)",
                                                         "depth, redeclared by the stage (default: None)",
                                                         "width of the shared group (default: 4)"))
    assert own < inherited and redeclared < inherited and "depth of the shared group" not in out


def test_check_flags_names_the_flag():
    a = Stage(width=0, depth=3)
    utils.check_flags(a, choices={"depth": (2, 3)}, at_least={"steps": 1})
    with pytest.raises(utils.UserError, match=r"^--depth must be one of \(1, 2\), got 3$"):
        utils.check_flags(a, choices={"depth": (1, 2)})
    with pytest.raises(utils.UserError, match=r"^--width must be at least 1 \(a reason\), got 0$"):
        utils.check_flags(a, at_least={"steps": 1, "width": 1}, why={"width": " (a reason)"})


def test_parse_args_class_defined_in_a_function(capsys):
    @dataclass
    class Local:
        seed: int = 0
        """random seed"""

    assert utils.parse_args(Local, ["--seed", "3"]).seed == 3
    with pytest.raises(SystemExit):
        utils.parse_args(Local, ["--help"])
    assert "random seed (default: 0)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing half-written
# --------------------------------------------------------------------------------------


def test_missing_model_path_is_a_user_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for load in (utils.load_model, utils.load_tokenizer, sampling.Sampler,
                 lambda p: sampling.Sampler(p, backend="hf")):
        with pytest.raises(utils.UserError) as e:
            load(missing)
        assert str(e.value) == f"model path does not exist: {missing}"
    with pytest.raises(utils.UserError, match="not a model folder"):
        utils.load_model(str(tmp_path))  # a folder, but no checkpoint in it
    # a relative path under an existing local folder is not mistaken for a hub name
    with pytest.raises(utils.UserError, match="does not exist"):
        utils.load_tokenizer(os.path.relpath(missing))


def _run_snippet(code: str, tmp_path):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_cli_bad_jsonl_exits_2_with_one_line(tmp_path):
    data = _write(tmp_path / "data.jsonl", '{"problem": "p", "answer": "1"}\n{"problem": "q"}\n')
    out = str(tmp_path / "out.jsonl")
    code = f"""
import sampling
import training
import utils

def main(data, out):
    rows = utils.read_records(data, ["problem", "answer"])
    utils.write_jsonl(out, rows)

if __name__ == "__main__":
    utils.run_main(main, {data!r}, {out!r})
"""
    r = _run_snippet(code, tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {data}:2: missing field 'answer'"]
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["data.jsonl"]


def test_cli_error_mid_write_leaves_no_file(tmp_path):
    out = str(tmp_path / "out.jsonl")
    code = f"""
import sampling
import training
import utils

def rows():
    yield {{"a": 1}}
    raise utils.UserError("item 2: unparsable answer")

if __name__ == "__main__":
    utils.run_main(utils.write_jsonl, {out!r}, rows())
"""
    r = _run_snippet(code, tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: item 2: unparsable answer"]
    assert os.listdir(tmp_path) == []


def test_cli_missing_model_exits_2(tmp_path):
    missing = str(tmp_path / "nope")
    code = f"import sampling\nimport utils\nif __name__ == '__main__':\n    utils.run_main(sampling.Sampler, {missing!r})\n"
    r = _run_snippet(code, tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: model path does not exist: {missing}"]


# --------------------------------------------------------------------------------------
# Padding, log-probabilities, prompts
# --------------------------------------------------------------------------------------


def test_pad_sequences():
    ids, mask = training.pad_sequences([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = training.pad_sequences([[5, 6, 7], [8]], pad_id=9, left=True)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long and mask.dtype == torch.long


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_by_hand(tiny_model, temperature):
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50, (9,)).tolist(), torch.randint(0, 50, (5,)).tolist()]
    ctx, comp = [s[:3] for s in seqs], [s[3:] for s in seqs]  # contexts of 3, completions of 6 and 2
    with torch.no_grad():
        lp, mask, ent = training.completion_logprobs(tiny_model, ctx, comp, pad_id=0, temperature=temperature,
                                                     with_entropy=True)
    assert lp.shape == ent.shape == mask.shape == (2, 6)
    assert mask.tolist() == [[1.0] * 6, [1.0, 1.0, 0, 0, 0, 0]]
    for b, s in enumerate(seqs):
        with torch.no_grad():  # each sequence alone, no padding
            logits = tiny_model(torch.tensor([s])).logits[0].double() / temperature  # (T, V)
        for t in range(len(s) - 3):
            z = logits[t + 2]  # predicts s[t + 3], completion token t
            logp = z - torch.logsumexp(z, 0)
            assert abs(lp[b, t].item() - logp[s[t + 3]].item()) < 1e-5
            assert abs(ent[b, t].item() - (-(logp.exp() * logp).sum()).item()) < 1e-5


def test_build_prompt_plain_and_chat(toy_paths):
    tok = utils.load_tokenizer(toy_paths["base"])
    assert not tok.chat_template
    assert utils.build_prompt(tok, "Start with 3. Add 4.") == "Problem: Start with 3. Add 4.\nSolution:\n"
    assert utils.build_prompt(None, "P") == "Problem: P\nSolution:\n"
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert utils.build_prompt(tok, "What is 2+2?") == (
        f"<|user|>What is 2+2?\n\n{utils.DEFAULT_INSTRUCTION}\n<|assistant|>")
    assert utils.build_prompt(tok, "What is 2+2?", instruction="") == "<|user|>What is 2+2?\n<|assistant|>"


H100 = "NVIDIA H100 80GB HBM3, 570.124.06\n"  # a line of `nvidia-smi --query-gpu=name,driver_version ...`


def _never():
    raise AssertionError("probe called")


def test_gpu_visibility_stops_when_nvidia_smi_lists_gpus_torch_does_not(monkeypatch):
    monkeypatch.delenv("MRT_ALLOW_CPU", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(utils.UserError) as e:  # a CUDA 13 torch under a 570 driver
        utils.check_gpu_visibility(lambda: H100 * 8, lambda: (0, "13.0"))
    assert str(e.value) == (
        "nvidia-smi lists 8 GPU(s) (driver 570.124.06) but torch sees none; torch is a CUDA 13.0 build, which "
        "needs driver >= 580: update the driver, or install torch and vLLM built for its CUDA "
        "(requirements-gpu.txt names the pins); MRT_ALLOW_CPU=1 runs on the CPU anyway")
    assert e.value.every_rank
    with pytest.raises(utils.UserError, match=r"^nvidia-smi lists 1 GPU\(s\) \(driver 570.124.06\) but torch sees "
                                              r"none; torch is a CPU build: remove \.venv and run bash install\.sh"):
        utils.check_gpu_visibility(lambda: H100, lambda: (0, None))
    with pytest.raises(utils.UserError, match=r"CUDA 14\.1 build: update the driver"):  # no known minimum
        utils.check_gpu_visibility(lambda: H100, lambda: (0, "14.1"))
    monkeypatch.setenv("MRT_ALLOW_CPU", "0")  # 0 is not a yes
    with pytest.raises(utils.UserError):
        utils.check_gpu_visibility(lambda: H100, lambda: (0, "13.0"))
    # torch sees them, or nvidia-smi lists none (no GPU; command missing or failing): nothing to say
    utils.check_gpu_visibility(lambda: H100, lambda: (1, "13.0"))
    utils.check_gpu_visibility(lambda: "", _never)
    utils.check_gpu_visibility(lambda: "\n", _never)
    # a CPU run on purpose: nothing is probed
    monkeypatch.setenv("MRT_ALLOW_CPU", "1")
    utils.check_gpu_visibility(_never, _never)
    monkeypatch.delenv("MRT_ALLOW_CPU")
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        utils.check_gpu_visibility(_never, _never)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
def test_has_cuda_runs_the_visibility_check(tmp_path):
    """has_cuda() with the real probes on this CPU torch: an `nvidia-smi` on PATH that lists a GPU stops
    a script (under run_main: one line, exit 2); one that fails, or MRT_ALLOW_CPU=1, gives the CPU."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\n[ "$*" = "--query-gpu=name,driver_version --format=csv,noheader" ] '
                   f'&& printf "{H100.strip()}\\n" && exit 0\nexit 7\n')
    smi.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("MRT_ALLOW_CPU", "CUDA_VISIBLE_DEVICES", "RANK")}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    code = "import utils; print(utils.run_main(utils.has_cuda))"

    def run(**extra):
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    r = run()
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.splitlines() == [
        "error: nvidia-smi lists 1 GPU(s) (driver 570.124.06) but torch sees none; torch is a CPU build: remove "
        ".venv and run bash install.sh again (it then takes requirements-gpu.txt); MRT_ALLOW_CPU=1 runs on the "
        "CPU anyway"]
    r = run(MRT_ALLOW_CPU="1")
    assert (r.returncode, r.stdout) == (0, "False\n"), r.stderr
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    r = run()
    assert (r.returncode, r.stdout) == (0, "False\n"), r.stderr


# --------------------------------------------------------------------------------------
# The GPU path, decided here with the backend, device count or engine mocked
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, want", [("nccl", "cuda:1"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_collective_device_follows_the_backend(backend, want, monkeypatch):
    """NCCL takes only CUDA tensors (this rank's device); gloo, and a mixed group's CPU side, the CPU."""
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert utils.collective_device() == torch.device(want)


COLLECTIVE = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|all_gather|all_gather_into_tensor|all_gather_single|reduce_scatter"
                        r"|reduce_scatter_tensor|broadcast|reduce|send|recv|isend|irecv|scatter|gather|all_to_all)\(")


def test_every_tensor_collective_goes_through_utils():
    """A guard: outside utils.py's helpers (which put the tensor on the group's device), no
    script calls a torch.distributed tensor collective itself."""
    files = [f for f in os.listdir(ROOT) if f.endswith(".py")] + \
        [os.path.join("bench", f) for f in os.listdir(os.path.join(ROOT, "bench")) if f.endswith(".py")] + \
        [os.path.join("tests", "fsdp_step.py")]
    found = []
    for f in files:
        for i, line in enumerate(open(os.path.join(ROOT, f)), 1):
            if COLLECTIVE.search(line):
                found.append((f, i, line.strip()))
    helpers = {"all_reduce", "broadcast_", "all_gather_into", "send", "recv_"}
    tree = ast.parse(open(os.path.join(ROOT, "utils.py")).read())
    spans = [(n.lineno, n.end_lineno) for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in helpers]
    outside = [(f, i, s) for f, i, s in found if f != "utils.py" or not any(a <= i <= b for a, b in spans)]
    assert outside == [], outside
    assert len(found) == 5  # the five helpers themselves


@pytest.mark.parametrize("cuda", [True, False])
def test_init_distributed_sets_a_long_timeout_and_the_device(cuda, monkeypatch):
    """Under torchrun: nccl bound to this rank's GPU (device_id, set_device first) or gloo,
    each with a timeout of hours (NCCL's default of 10 minutes would end ranks that wait for
    others' sampling or for rank 0's read of a large model)."""
    calls = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(utils, "has_cuda", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.setdefault("init", (backend, kw)))
    rank, world, device = utils.init_distributed()
    backend, kw = calls["init"]
    assert kw["timeout"].total_seconds() >= 3600 * utils.DIST_TIMEOUT_HOURS >= 3600
    if cuda:
        assert backend == "nccl" and kw["device_id"] == torch.device("cuda", 1) and calls["set_device"] == 1
        assert device == "cuda:1"
    else:
        assert backend == "gloo" and "device_id" not in kw and "set_device" not in calls and device == "cpu"


def test_dtype_auto_is_fp16_on_a_gpu_without_bf16(monkeypatch, capsys):
    monkeypatch.setattr(utils, "_SAID", set())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert utils.torch_dtype("auto", "cuda:0") is torch.bfloat16
    assert utils.torch_dtype("auto", "cpu") is torch.float32
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100, T4
    assert utils.torch_dtype("auto", "cuda:0") is torch.float16
    assert utils.torch_dtype("auto", "cuda:0") is torch.float16
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "float16" in out[0] and "bfloat16" in out[0]  # said once
    assert utils.torch_dtype("bf16", "cuda:0") is torch.bfloat16  # what the user asks for stands


def test_engine_memory_share_splits_the_default_over_the_engines(monkeypatch):
    assert utils.engine_memory_share(0.0, 1) == 0.85
    assert utils.engine_memory_share(0.0, 2) == 0.425
    assert utils.engine_memory_share(0.0, 3) == 0.2833
    assert utils.engine_memory_share(0.4, 3) == 0.4  # the user's share stands
    with pytest.raises(utils.UserError, match="gpu-memory-utilization"):
        utils.engine_memory_share(1.5, 1)
    import evaluate

    runs = {"a": "m1", "b": "m2", "c": "m1"}
    assert evaluate.engines_held(runs, None, world=1) == 1  # a plain run frees each engine first
    assert evaluate.engines_held(runs, None, world=8) == 2  # under torchrun every model's engine stays up
    assert evaluate.engines_held(runs, {"m1": object()}, world=8) == 1  # a ready engine is not built
    monkeypatch.setattr(utils, "is_distributed", lambda: True)
    engines = sampling.EnginePool({"model": 10, "mu": 20, "direct": 30}, seed=0)  # r1_analysis.py's engines
    assert engines.share == 0.2833
    assert sampling.EnginePool({"model": 10, "mu": 20}, seed=0, gpu_memory_utilization=0.5).share == 0.5
    with sampling.ready_engines({"mu": object()}):  # a ready engine is not built
        assert sampling.EnginePool({"model": 10, "mu": 20, "direct": 30}, seed=0).share == 0.425
    monkeypatch.setattr(utils, "is_distributed", lambda: False)
    assert sampling.EnginePool({"model": 10, "mu": 20}, seed=0).share == 0.85


def test_engine_start_hint_never_says_raise_when_the_gpu_is_full():
    full = ("Free memory on device cuda:0 (30.1/79.2 GiB) on startup is less than desired GPU memory utilization "
            "(0.85, 67.3 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.")
    hint = sampling.engine_start_hint(full, 4096)
    assert "lower --gpu-memory-utilization" in hint and "raise" not in hint
    kv = ("To serve at least one request with the model's max seq len (1048576), 4.0 GiB KV cache is needed, which "
          "is larger than the available KV cache memory (1.0 GiB).")
    hint = sampling.engine_start_hint(kv, 1048576)
    assert "--max-*" in hint and "1048576" in hint and "raise" in hint


def test_run_main_names_the_rank(monkeypatch, capsys):
    """Under torchrun an error one rank may meet alone (an engine that cannot start on its GPU)
    names that rank; one every rank meets alike is said by rank 0 only."""
    def fail(every):
        raise utils.UserError("engine could not start", every_rank=every)

    monkeypatch.setattr(utils, "is_distributed", lambda: True)
    monkeypatch.setattr(utils, "rank", lambda: 3)
    for every, want in ((False, ["error: rank 3: engine could not start"]), (True, [])):
        with pytest.raises(SystemExit) as e:
            utils.run_main(fail, every)
        assert e.value.code == 2 and capsys.readouterr().err.splitlines() == want
    monkeypatch.setattr(utils, "rank", lambda: 0)
    with pytest.raises(SystemExit):
        utils.run_main(fail, True)
    assert capsys.readouterr().err.splitlines() == ["error: engine could not start"]


def test_stage_instruction_from_the_models_card(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    assert utils.stage_instruction(None, str(model)) == utils.DEFAULT_INSTRUCTION  # no card: a base or hub model
    assert utils.stage_instruction(None, "org/name") == utils.DEFAULT_INSTRUCTION
    (model / "mrt.json").write_text(json.dumps({"stage": "warmstart", "args": {"seed": 0}}))
    assert utils.stage_instruction(None, str(model)) == utils.DEFAULT_INSTRUCTION  # a card without one
    capsys.readouterr()
    own = "Solve it. Label every step as Step k: and box the answer."
    (model / "mrt.json").write_text(json.dumps({"stage": "warmstart", "args": {"instruction": own}}))
    assert utils.stage_instruction(None, str(model)) == own
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and own in out[0] and "mrt.json" in out[0]
    assert utils.stage_instruction("", str(model)) == ""  # given (even empty): it stands
    assert utils.stage_instruction("Other.", str(model)) == "Other."
    assert utils.build_prompt(None, "P", None) == "Problem: P\nSolution:\n"


@pytest.mark.parametrize("name", ["warmstart", "star", "grpo", "infogain", "evaluate", "r1_analysis"])
def test_every_stage_takes_instruction_defaulting_to_the_models_card(name):
    field_ = {f.name: f for f in dataclasses.fields(__import__(name).Args)}["instruction"]
    assert field_.default is None  # None: utils.stage_instruction decides
    assert "utils.stage_instruction(" in open(os.path.join(ROOT, f"{name}.py")).read()


def test_gpu_plan_hides_gpus_from_the_cpu_suite():
    import conftest

    plain = conftest.gpu_plan({}, "cpu")
    assert plain == {"gpu_tests": False, "hide": True, "engine_skip": None, "sampler": None}
    assert conftest.gpu_plan({}, None)["engine_skip"] is None  # no vLLM: transformers samples on CPU
    cuda_build = conftest.gpu_plan({"MRT_TEST_GPUS": "0"}, "cuda")  # a GPU machine's install, CPU suite
    assert "CPU build" in cuda_build["engine_skip"] and cuda_build["sampler"] == "hf"
    assert conftest.gpu_plan({"MRT_TEST_GPUS": "1"}, "cuda") == {"gpu_tests": True, "hide": False, "engine_skip": None,
                                                                 "sampler": None}
    gpu = pytest.mark.gpu(2).mark
    assert conftest.gpu_skip(None, False, 0) is None  # a CPU test in a CPU session
    assert conftest.gpu_skip(gpu, False, 8) is not None  # GPU tests run only when asked for
    assert "2 GPU" in conftest.gpu_skip(gpu, True, 1) and conftest.gpu_skip(gpu, True, 2) is None
    assert conftest.gpu_skip(None, True, 2) is not None  # asked for GPU tests: the CPU ones skip
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


@pytest.mark.gpu(1)
def test_tensor_collectives_on_a_real_nccl_group(tmp_path):
    """torchrun --nproc_per_node 1 on one GPU: an NCCL group of one. Every helper takes a CPU
    tensor (as grpo.py's token count is) and gives back a CPU tensor."""
    code = ("import torch, utils\n"
            "utils.init_distributed()\n"
            "assert torch.distributed.get_backend() == 'nccl'\n"
            "n = utils.all_reduce(torch.tensor(5.0))\n"
            "assert n.device.type == 'cpu' and n.item() == 5.0\n"
            "t = torch.zeros(3)\n"
            "utils.broadcast_(t, src=0)\n"
            "print('ok', utils.collective_device())\n")
    script = tmp_path / "nccl_one.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        str(script)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "ok cuda:0" in r.stdout, r.stderr[-3000:]
