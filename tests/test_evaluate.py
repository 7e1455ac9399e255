"""evaluate.py: pass@k / maj@k against exact combinatorics, the curve metrics on hand-made
tables, a real short run on the toy base in both modes, bad input."""

import itertools
import json
import os
import random
import subprocess
import sys
from fractions import Fraction
from math import comb

import pytest

import evaluate
import sampling
import utils
from evaluate import (Args, cluster_answers, cumulative_regret, curve_auc, maj_at_k, majority_curve, pass_at_k,
                      token_efficiency)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                exact = sum(max(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_large_n_is_exact_and_stable():
    n = 1000
    prev = 0.0
    for c, k in [(1, 1), (1, 999), (3, 10), (10, 500), (500, 2), (999, 1), (0, 50)]:
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    for k in range(1, n + 1, 37):  # monotone in k, inside [0, 1]
        p = pass_at_k(n, 5, k)
        assert prev <= p <= 1.0
        prev = p
    assert pass_at_k(n, 1, n) == 1.0


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# --------------------------------------------------------------------------------------
# maj@k
# --------------------------------------------------------------------------------------


def brute_majority(labels, correct_labels, k):
    """Average over every k-subset of the vote's credit (ties split, None never votes)."""
    total, subsets = Fraction(0), 0
    for sub in itertools.combinations(labels, k):
        subsets += 1
        votes = {}
        for label in sub:
            if label is not None:
                votes[label] = votes.get(label, 0) + 1
        if votes:
            top = max(votes.values())
            tied = [label for label, v in votes.items() if v == top]
            total += Fraction(sum(label in correct_labels for label in tied), len(tied))
    return float(total / subsets)


# hand-made vote tables: (answers, gold, hand labels of grader-equal groups)
FORMS = {"\\frac{1}{2}": "half", "0.5": "half", "\\dfrac{1}{2}": "half", "\\frac{3}{4}": "3/4", "0.75": "3/4",
         "2": "2", "7": "7", "x": "x"}
TABLES = [
    (["7", "7", "2", "2", "2", None, "7"], "7", FORMS),  # 3-3 tie at k=7, None never votes
    (["7", "2", None, None], "7", FORMS),  # ties between singletons
    ([None, None, "7"], "7", FORMS),
    ([None, None, None], "7", FORMS),  # nothing parses: 0
    (["\\frac{1}{2}", "0.5", "\\frac{3}{4}", "0.75", "0.75", "2", None], "0.5", FORMS),  # equivalent forms are one answer
    (["\\dfrac{1}{2}", "\\frac{3}{4}", "0.75", "x", "x", "0.5"], "1/2", FORMS),
    (["2", "7", "x", "0.75"], "5", FORMS),  # no correct answer
]


@pytest.mark.parametrize("answers,gold,labels", TABLES)
def test_maj_at_k_equals_subset_enumeration(answers, gold, labels):
    hand = [None if a is None else labels[a] for a in answers]
    correct = {labels[a] for a in answers if a is not None and utils.grade("\\boxed{" + a + "}", gold) == 1.0}
    for k in range(1, len(answers) + 1):
        assert maj_at_k(answers, gold, k) == pytest.approx(brute_majority(hand, correct, k), abs=1e-12)


def test_grader_equal_forms_are_one_cluster():
    sizes, correct, n_none = cluster_answers(["\\frac{1}{2}", "0.5", "\\frac{3}{4}", "0.75", "0.75", "2", None], "0.5")
    assert (sorted(sizes), n_none) == ([1, 2, 3], 1)
    assert correct[sizes.index(2)] and not correct[sizes.index(3)]
    # two equivalent wrong forms outvote one correct answer: 2 votes against 1
    assert maj_at_k(["\\frac{3}{4}", "0.75", "0.5"], "0.5", 3) == 0.0
    assert maj_at_k(["3", "4"], "3", 2) == 0.5  # tie splits the credit


def test_majority_curve_random_tables_against_enumeration():
    rng = random.Random(0)
    for _ in range(60):
        counts = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
        correct = [rng.random() < 0.5 for _ in counts]
        n_none = rng.randint(0, 2)
        labels = [j for j, c in enumerate(counts) for _ in range(c)] + [None] * n_none
        curve = majority_curve(counts, correct, n_none)
        truth = {j for j, ok in enumerate(correct) if ok}
        for k in range(1, len(labels) + 1):
            assert curve[k - 1] == pytest.approx(brute_majority(labels, truth, k), abs=1e-12)


def test_maj_at_k_order_independent_and_checked():
    answers = ["\\frac{1}{2}", "0.75", "0.5", "\\frac{3}{4}", "2", None, "2", "0.75"]
    expected = [maj_at_k(answers, "0.5", k) for k in range(1, 9)]
    rng = random.Random(1)
    for _ in range(5):
        shuffled = answers[:]
        rng.shuffle(shuffled)
        assert [maj_at_k(shuffled, "0.5", k) for k in range(1, 9)] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        maj_at_k(answers, "0.5", 9)
    with pytest.raises(ValueError):
        maj_at_k(answers, "0.5", 0)


def test_maj_curve_is_fast_for_n64():
    # 64 answers in 12 clusters: the whole k = 1..64 curve, checked at its ends
    counts = [20, 10, 8, 6, 5, 4, 3, 2, 1, 1, 1, 1]
    curve = majority_curve(counts, [True] + [False] * 11, 2)
    assert curve[0] == pytest.approx(20 / 64)
    assert curve[-1] == 1.0 and len(curve) == 64


# --------------------------------------------------------------------------------------
# Regret, token efficiency, AUC
# --------------------------------------------------------------------------------------


def test_cumulative_regret_hand_table():
    j = [0.2, 0.5, 0.5, 0.8]
    assert cumulative_regret(j) == pytest.approx(0.6 + 0.3 + 0.3 + 0.0)  # J* = best observed
    assert cumulative_regret(j, j_star=1.0) == pytest.approx(0.8 + 0.5 + 0.5 + 0.2)
    assert cumulative_regret(j, j_star=1.0, running=True) == pytest.approx([0.8, 1.3, 1.8, 2.0])
    with pytest.raises(ValueError):
        cumulative_regret([])


def test_token_efficiency_hand_table():
    a = ([100, 200, 300], [0.2, 0.5, 0.6])
    b = ([100, 200, 300, 400], [0.1, 0.3, 0.5, 0.5])
    e = token_efficiency(a, b)  # B peaks at 0.5 first at 300 tokens; A reaches 0.5 at 200
    assert (e["target"], e["tokens_b"], e["tokens_a"]) == (0.5, 300, 200)
    assert e["ratio"] == pytest.approx(1.5) and e["saving"] == pytest.approx(1 / 3)
    b2 = ([150, 400], [0.2, 0.4])  # interpolation: A crosses 0.4 between 100 (0.2) and 200 (0.5)
    assert token_efficiency(a, b2)["tokens_a"] == pytest.approx(100 + 100 * 2 / 3)
    assert token_efficiency(a, b2)["saving"] == pytest.approx(1 - (100 + 100 * 2 / 3) / 400)
    e = token_efficiency(b, a)  # B never reaches A's 0.6
    assert e["tokens_a"] is None and e["saving"] is None


def test_curve_auc_hand_table():
    assert curve_auc([0, 10, 20], [0, 1, 1]) == pytest.approx(5 + 10)
    assert curve_auc([0, 10, 20], [0, 1, 1], 5, 15) == pytest.approx(3.75 + 5)
    with pytest.raises(ValueError):
        curve_auc([0, 10, 20], [0, 1, 1], 5, 25)


def test_graded_answer_is_the_last_episodes():
    m = utils.BACKTRACK_MARKER
    z0 = "Step 1: 2 + 3 = 5\nStep 2: 5 * 2 = 10\nThe answer is \\boxed{10}"
    fixed = z0 + "\n" + m + "\nStep 2: 5 * 2 = 11\nThe answer is \\boxed{11}"
    assert sampling.graded(fixed, "11") == {"answer": "11", "correct": 1.0, "backtracks": 1}
    assert sampling.graded(fixed, "10")["correct"] == 0.0  # z0's box is never credited
    unfinished = z0 + "\n" + m + "\nStep 2: 5 * 2 = 11"
    assert sampling.graded(unfinished, "10") == {"answer": None, "correct": 0.0, "backtracks": 1}
    twice = fixed + "\n" + m + "\nStep 1: 2 + 3 = 5\nThe answer is \\boxed{10}"
    assert sampling.graded(twice, "10")["correct"] == 1.0 and sampling.final_answer(twice) == "10"
    assert sampling.graded(z0, "10") == {"answer": "10", "correct": 1.0, "backtracks": 0}  # direct trace


# --------------------------------------------------------------------------------------
# A real short run on the toy base: both modes, outputs consistent, window truncates
# --------------------------------------------------------------------------------------


class NoSampling:
    def generate(self, *a, **k):
        raise AssertionError("reused outputs must not be sampled again")


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_real_run_both_modes(toy_paths, toy_sampler, tmp_path):
    W = 16
    args = Args(models=[f"base={toy_paths['base']}"], data=toy_paths["test"], problems=4, samples=3, max_tokens=96,
                window=W, out=str(tmp_path / "eval"), seed=3)
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        report = evaluate.main(args)
    out = tmp_path / "eval"
    for name in ("curves.json", "table.md", "accuracy_tokens.png", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert open(out / "accuracy_tokens.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| base | direct |" in (out / "table.md").read_text()
    curves = json.load(open(out / "curves.json"))["runs"]["base"]["modes"]

    par = read_jsonl(out / "samples" / "base.parallel.jsonl")
    assert len(par) == 4 * 3
    c = curves["parallel"]
    assert c["pass"][0] == pytest.approx(sum(r["correct"] for r in par) / len(par))
    assert c["maj"][0] == pytest.approx(c["pass"][0])  # maj@1 is pass@1
    assert c["tokens"] == pytest.approx([k * sum(r["gen_tokens"] for r in par) / len(par) for k in (1, 2, 3)])
    for r in par:  # graded by the real grader on the completion
        assert r["correct"] == utils.grade(r["text"], r["gold"]) and r["gen_tokens"] >= 1
    for p in range(4):
        rows = [r for r in par if r["problem"] == p]
        assert sum(r["correct"] for r in rows) / 3 == pytest.approx(pass_at_k(3, sum(int(r["correct"]) for r in rows), 1))

    lin = read_jsonl(out / "samples" / "base.linearized.jsonl")
    assert len(lin) == 4 * 3
    c = curves["linearized"]
    first = [r for r in lin if r["round"] == 1]
    assert c["pass"][0] == pytest.approx(sum(r["correct"] for r in first) / 4)
    assert c["tokens"][-1] == pytest.approx(sum(r["gen_tokens"] for r in lin) / 4)  # cumulative generated
    cue = len(toy_sampler.tokenizer(evaluate.CONTINUE_CUE, add_special_tokens=False)["input_ids"])
    prompt = {r["problem"]: r["context_tokens"] for r in first}
    for r in lin:
        if r["round"] > 1:
            assert r["window_tokens"] <= W
            assert r["context_tokens"] == prompt[r["problem"]] + r["window_tokens"] + cue
    assert all(r["window_tokens"] == W for r in lin if r["round"] == 3)  # the window really truncates
    chains = [sorted((r for r in lin if r["problem"] == p), key=lambda r: r["round"]) for p in range(4)]
    for k in (1, 2, 3):  # pass@k / maj@k over the first k rounds, from the saved answers
        assert c["pass"][k - 1] == pytest.approx(sum(max(r["correct"] for r in ch[:k]) for ch in chains) / 4)
        maj = [maj_at_k([r["answer"] for r in ch[:k]], ch[0]["gold"], k) for ch in chains]
        assert c["maj"][k - 1] == pytest.approx(sum(maj) / 4)

    # a second call with the same settings reuses the per-sample files (resume)
    with sampling.ready_engines({toy_paths["base"]: NoSampling()}):
        again = evaluate.main(args)
    assert again["runs"] == report["runs"]

    # torchrun with 2 ranks: each rank samples its share of the problems on its own engine and
    # rank 0 writes the merged rows. Problems are seeded by their index, so the samples are the
    # single process's. (The engines here use the default block size, the session engine 32.)
    # A second model ("again", the same weights) checks that the rows of a later engine are
    # merged too (closing an engine used to end torchrun's group: its rows were rank 0's alone).
    two = tmp_path / "eval2"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "evaluate.py", "--models", f"base={toy_paths['base']}", f"again={toy_paths['base']}",
                        "--data", toy_paths["test"],
                        "--problems", "4", "--samples", "3", "--max-tokens", "96", "--window", str(W), "--seed", "3",
                        "--out", str(two)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for mode in ("parallel", "linearized"):
        one_rows, two_rows = (read_jsonl(d / "samples" / f"base.{mode}.jsonl") for d in (out, two))
        key = "sample" if mode == "parallel" else "round"
        assert [(r["problem"], r[key]) for r in two_rows] == [(r["problem"], r[key]) for r in one_rows]
        assert [r["text"] for r in two_rows] == [r["text"] for r in one_rows], mode
        again = read_jsonl(two / "samples" / f"again.{mode}.jsonl")
        assert [r["text"] for r in again] == [r["text"] for r in one_rows], mode
    assert json.load(open(two / "curves.json"))["runs"]["base"] == report["runs"]["base"]


# --------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------


GOOD = json.dumps({"problem": "Start with 2. Add 3. What is the result?", "answer": "5"})
BAD_INPUTS = {  # case: (data lines, extra flags, expected part of the message)
    "missing_file": (None, [], "no such file"),
    "malformed": ([GOOD, "{not json"], [], ":2: malformed JSON"),
    "missing_field": ([GOOD, '{"problem": "x"}'], [], ":2: missing field 'answer'"),
    "renamed_field": ([GOOD], ["--answer-field", "solution"], ":1: missing field 'solution'"),
    "bad_answer": ([GOOD, json.dumps({"problem": "x", "answer": "{"})], [], "unparsable answer"),
    "bad_model": ([GOOD], [], "model path does not exist"),
    "bad_mode": ([GOOD], ["--modes", "serial"], "--modes"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2(case, toy_paths, tmp_path, run_script):
    lines, flags, message = BAD_INPUTS[case]
    data = tmp_path / "data.jsonl"
    if lines:
        data.write_text("\n".join(lines) + "\n")
    model = str(tmp_path / "no-model") if case == "bad_model" else toy_paths["base"]
    out = tmp_path / "out"
    code, err = run_script("evaluate", ["--models", f"m={model}", "--data", str(data), "--out", str(out), *flags],
                           own_process=case == "malformed")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
