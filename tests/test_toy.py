"""The toy task's pretraining documents (pure: no model)."""

import random
import re

import pytest

import toy
import utils


def test_marker_never_in_a_solution_document():
    """The base model must never see the backtrack marker after an attempt (only in notes)."""
    rng = random.Random(2)
    for i in range(2000):
        context, completion = toy.pretraining_example(toy.make_problem(random.Random(i)), rng, slip=0.2, mu_frac=0.15,
                                                      retry_frac=0.2)
        assert utils.BACKTRACK_MARKER not in context + completion
    assert utils.BACKTRACK_MARKER in toy.NOTE


def test_meta_prover_examples_score_the_answer_only():
    rng, p = random.Random(0), toy.make_problem(random.Random(7))
    for _ in range(50):
        context, completion = toy.pretraining_example(p, rng, slip=0.0, mu_frac=1.0)
        assert context.endswith(utils.MU_SUFFIX) and completion == p["answer"] + "}"


def test_retry_examples_redo_the_attempt_from_a_random_step():
    """A retry example: a full attempt and a retry line in the (loss-free) head; as the
    completion, the attempt redone from some Step k on the attempt's own value after step k-1
    (what a backtrack trace's revised attempt looks like); every k occurs; retry_frac 0 never
    makes one."""
    p = {"start": 10, "ops": [("+", 5), ("*", 2), ("-", 3)], "problem": "x", "answer": "27"}
    rng, seen = random.Random(0), set()
    for _ in range(200):
        head, completion = toy.pretraining_example(p, rng, slip=0.5, mu_frac=0.0, retry_frac=1.0)
        *attempt, line, rest = head.split("\n")
        assert line in toy.RETRY_LINES and rest == "" and attempt[-1].startswith("The answer is")
        k = int(completion.split(":")[0].removeprefix("Step "))
        value = 10 if k == 1 else int(attempt[k - 2].rsplit("= ", 1)[1])
        redo = completion.split("\n")
        assert redo[0].startswith(f"Step {k}: {value} {p['ops'][k - 1][0]} {p['ops'][k - 1][1]} = ")
        assert len(redo) == 3 - k + 2 and redo[-2].startswith("Step 3: ") and redo[-1].startswith("The answer is")
        seen.add(k)
    assert seen == {1, 2, 3}
    head, completion = toy.pretraining_example(p, random.Random(1), slip=0.0, mu_frac=0.0, retry_frac=1.0)
    assert completion.endswith("\\boxed{27}") and head.split("\n")[-3] == "The answer is \\boxed{27}"
    heads = {toy.pretraining_example(p, rng, slip=0.1, mu_frac=0.15)[0] for _ in range(200)}
    assert not any(h.endswith(line + "\n") for h in heads for line in toy.RETRY_LINES)


def load_bench(name: str):
    """The module bench/<name>.py (bench/ is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_backtrack_traces_of_bench_rl_headroom():
    """bench/rl_headroom.py's oracle traces: the restart is z0's first wrong line, infogain's
    parser splits them, the revised attempt is right; plain solutions come with probability mix."""
    from infogain import split_backtrack

    bench = load_bench("rl_headroom")

    p = {"problem": "Start with 17. Add 25. Multiply by 3. Subtract 48. What is the result?", "answer": "78",
         "start": 17, "ops": [("+", 25), ("*", 3), ("-", 48)]}
    wrong = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 125\nStep 3: 125 - 48 = 77\nThe answer is \\boxed{77}"
    right = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"
    (ctx, comp), = bench.oracle_examples([p], [wrong], None, random.Random(0), 0.0, utils.BACKTRACK_MARKER)
    assert ctx == utils.build_prompt(None, p["problem"]) + wrong
    ep = split_backtrack(wrong + comp)
    assert ep is not None and ep.restart_step == 2 and ep.z0 == wrong
    assert ep.z1.strip() == utils.BACKTRACK_MARKER + "\nStep 2: 42 * 3 = 126"  # the true line
    assert utils.grade(ep.z2, "78") == 1.0
    for seed in range(5):  # a right attempt: some restart, still the right answer
        (_, comp), = bench.oracle_examples([p], [right], None, random.Random(seed), 0.0, utils.BACKTRACK_MARKER)
        assert utils.grade(split_backtrack(right + comp).z2, "78") == 1.0
    pairs = bench.oracle_examples([p] * 200, [wrong] * 200, None, random.Random(1), 0.5, utils.BACKTRACK_MARKER)
    plain = [c for x, c in pairs if x == utils.build_prompt(None, p["problem"])]
    assert 60 < len(plain) < 140 and all(c == right for c in plain)


def test_bench_restart_steps_splits_accuracy_by_restart_step():
    """bench/restart_steps.py: rows of grpo.rollout grouped by the restart step the parser
    reads; unparsed continuations count as "none"; z0_wrong keeps only problems whose z0 is wrong."""
    from infogain import backtrack_cue, split_backtrack

    bench = load_bench("restart_steps")

    z0 = "Step 1: 2 + 3 = 5\nStep 2: 5 * 4 = 24\nThe answer is \\boxed{24}"
    conts = [(" 1: 2 + 3 = 5\nStep 2: 5 * 4 = 20\nThe answer is \\boxed{20}", 1.0, 0),
             (" 2: 5 * 4 = 20\nThe answer is \\boxed{20}", 1.0, 0),
             (" 2: 5 * 4 = 21\nThe answer is \\boxed{21}", 0.0, 0),
             (" 1: 2 + 3 = 5\nStep 2: 5 * 4 = 20\nThe answer is \\boxed{20}", 1.0, 1),
             (" lost", 0.0, 1)]
    rows = [{"problem": {"id": pid}, "episodes": split_backtrack(backtrack_cue(z0) + text), "outcome": out}
            for text, out, pid in conts]
    assert [r["episodes"] is None for r in rows] == [False, False, False, False, True]
    r = bench.by_restart_step(rows, {0: 0.0, 1: 1.0})
    assert r["steps"] == {"1": {"n": 2, "acc": 1.0}, "2": {"n": 2, "acc": 0.5}, "none": {"n": 1, "acc": 0.0}}
    assert r["all"] == 0.6 and r["z0_wrong"] == round(2 / 3, 4)


def test_bench_restart_steps_token_fields():
    """bench/restart_steps.token_fields: each token of a redone first line goes to the field its
    last character falls in (a leading space belongs to the token), later lines are "later"."""
    bench = load_bench("restart_steps")
    text = "Step 2: 15 * 2 = 30\nStep 3: 30 - 3 = 27"
    pieces = re.findall(r" ?[A-Za-z]+| ?\d|:| ?[*=+-]|\n", text)  # one digit per token, as a byte BPE may split
    assert "".join(pieces) == text
    offsets, at = [], 0
    for piece in pieces:
        offsets.append((at, at + len(piece)))
        at += len(piece)
    fields = bench.token_fields(text, offsets)
    first = [(piece, field) for piece, field in zip(pieces, fields) if field != "later"]
    assert first == [("Step", None), (" 2", "step"), (":", None), (" 1", "operand"), ("5", "operand"), (" *", "op"),
                     (" 2", "arg"), (" =", None), (" 3", "result"), ("0", "result")]
    assert fields[len(first):] == ["later"] * (len(pieces) - len(first))
    with pytest.raises(ValueError, match="step line"):
        bench.token_fields("lost", [(0, 4)])
