"""Tests of infogain.py: episode splitting, the gain math, the J estimator (unbiased, one
request per context), the real toy meta-prover, and the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import infogain
import sampling
import toy
import utils
from infogain import Episodes, episode_gains, information_gain, join_backtrack, restart_prefix, split_backtrack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = utils.BACKTRACK_MARKER
Z0 = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 127\nStep 3: 127 - 48 = 79\nThe answer is \\boxed{79}"
Z1 = "\n" + MARK + "\nStep 2: 42 * 3 = 126"
Z2 = "\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"


# --------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------


def test_split_canonical_trace_and_round_trip():
    text = Z0 + Z1 + Z2
    ep = split_backtrack(text)
    assert ep == Episodes(Z0, Z1, Z2, 2)
    assert join_backtrack(ep) == text
    assert utils.grade(ep.z2, "78") == 1.0 and utils.grade(ep.z0, "78") == 0.0


def test_split_edge_cases():
    assert split_backtrack(Z0) is None  # no marker
    assert split_backtrack(Z0 + "\n" + MARK + "\nLet me think again.") is None  # marker without Step
    assert split_backtrack(Z0 + "\n" + MARK + "\nStep two: 42 * 3") is None  # no number
    assert split_backtrack(Z0 + "\n" + MARK + "\nStep 0: 17 + 25 = 42") is None  # steps count from 1
    # restart at step 1: the revised attempt shares nothing with z0
    ep = split_backtrack(Z0 + "\n" + MARK + "\nStep 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126")
    assert ep.restart_step == 1 and ep.z1.endswith("Step 1: 17 + 25 = 42") and ep.z2 == "\nStep 2: 42 * 3 = 126"
    assert restart_prefix(ep.z0, 1) == ""
    # double-digit steps
    assert split_backtrack(Z0 + "\n" + MARK + "\nStep 12: x\nStep 13: y").restart_step == 12


def test_split_needs_a_line_break_after_the_restart_line():
    # the text ends on its restart line (cut there, or its box written there): not a trace, so
    # z1 never holds the answer with an empty z2 (the box would earn gain, the outcome 0)
    assert split_backtrack(Z0 + Z1) is None
    assert split_backtrack(Z0 + Z1 + " = 78, so \\boxed{78}") is None
    assert split_backtrack(Z0 + "\n" + MARK + "\nStep 12: x") is None


def test_restart_line_holds_one_step_and_no_box_and_z2_holds_a_step_or_a_box():
    """A restart line holds one step and no box; a z2 with neither a step line nor a box is no
    revised attempt: such texts do not parse, so z1 never earns gain for the answer."""
    # the box on the restart line, then only a line break (z1 would hold the answer, z2 = "\n")
    boxed = infogain.backtrack_cue(Z0) + " 2: 42 * 3 = 126, 126 - 48 = 78, \\boxed{78}\n"
    assert split_backtrack(boxed) is None
    assert split_backtrack(Z0 + Z1 + ", \\boxed{78}\nThe answer is \\boxed{78}") is None  # a box there, whatever follows
    assert split_backtrack(Z0 + Z1 + ", \\fbox{78}" + Z2) is None
    assert split_backtrack(Z0 + Z1 + " Step 3: 126 - 48 = 78" + Z2) is None  # two steps on the restart line
    # a z2 of only line breaks or of text with no step and no box
    for z2 in ("\n", "\r\n", "\n\n", "\nso it goes", "\n126 - 48 = 78"):
        assert split_backtrack(Z0 + Z1 + z2) is None, z2
    # a z2 with a step line (unfinished: graded 0) or with only the answer line (restart at the last step) parses
    ep = split_backtrack(Z0 + Z1 + "\nStep 3: 126 - 48 = 78")
    assert (ep.z1, ep.z2, ep.restart_step) == (Z1, "\nStep 3: 126 - 48 = 78", 2) and utils.grade(ep.z2, "78") == 0.0
    last = "\n" + MARK + "\nStep 3: 126 - 48 = 78"
    ep = split_backtrack(Z0 + last + "\nThe answer is \\boxed{78}")
    assert (ep.z1, ep.z2, ep.restart_step) == (last, "\nThe answer is \\boxed{78}", 3)
    ep = split_backtrack(Z0 + Z1 + "\r\nThe answer is \\boxed{78}")
    assert ep.z1 == Z1 + "\r" and ep.z2 == "\nThe answer is \\boxed{78}"


def test_split_continuation_splits_at_the_cue():
    cue = infogain.backtrack_cue(Z0)
    assert infogain.split_continuation(Z0, cue + " 2: 42 * 3 = 126" + Z2) == Episodes(Z0, Z1, Z2, 2)
    assert infogain.split_continuation(Z0, cue + " two: 42 * 3 = 126" + Z2) is None
    # a marker inside a line of z0, with a step line after it: split_backtrack splits z0 itself,
    # split_continuation splits where the cue was appended, at len(z0)
    z0 = "Step 1: 17 + 25 = 42 " + MARK + "\nStep 2: 42 * 3 = 127\nThe answer is \\boxed{127}"
    text = infogain.backtrack_cue(z0) + " 2: 42 * 3 = 126" + Z2
    assert split_backtrack(text).z0 == "Step 1: 17 + 25 = 42"
    assert infogain.split_continuation(z0, text) == Episodes(z0, Z1, Z2, 2)
    # the cue's own rules still hold after the split point
    assert infogain.split_continuation(z0, infogain.backtrack_cue(z0) + " 2: 42 * 3 = 126\n") is None
    assert infogain.split_continuation(z0, infogain.backtrack_cue(z0) + " lost") is None
    # a completion that does not start with z0 was not sampled after its cue
    assert infogain.split_continuation(Z0, infogain.backtrack_cue(z0) + " 2: 42 * 3 = 126" + Z2) is None


def test_split_whitespace_variants_round_trip():
    crlf = Z0.replace("\n", "\r\n") + "\r\n" + MARK + "\r\nStep 3 : 126 - 48 = 78\r\nThe answer is \\boxed{78}"
    ep = split_backtrack(crlf)
    assert ep.restart_step == 3 and ep.z0 == Z0.replace("\n", "\r\n")
    assert ep.z1 == "\r\n" + MARK + "\r\nStep 3 : 126 - 48 = 78\r" and join_backtrack(ep) == crlf
    spaced = Z0 + "  \n\n" + MARK + "  \n  Step  2:  42 * 3 = 126" + Z2
    ep = split_backtrack(spaced)
    assert ep.z0 == Z0 and ep.z1.startswith("  \n\n" + MARK) and ep.restart_step == 2 and join_backtrack(ep) == spaced
    # the sampled form: the context ends with "\nStep" and the policy writes " k: ..."
    sampled = infogain.backtrack_cue(Z0) + " 2: 42 * 3 = 126" + Z2
    assert split_backtrack(sampled) == Episodes(Z0, Z1, Z2, 2)


def test_split_several_markers_splits_at_first():
    second = "\n" + MARK + "\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"
    first_z2 = "\nStep 3: 126 - 48 = 77\nThe answer is \\boxed{77}"
    text = Z0 + Z1 + first_z2 + second
    ep = split_backtrack(text)
    assert (ep.z0, ep.z1, ep.restart_step) == (Z0, Z1, 2) and ep.z2 == first_z2 + second
    assert join_backtrack(ep) == text
    # first marker without a restart step: not a backtrack trace, even if a later one has one
    assert split_backtrack(Z0 + "\n" + MARK + "\nHmm." + second) is None


def test_restart_prefix():
    assert restart_prefix(Z0, 1) == ""
    assert restart_prefix(Z0, 2) == "Step 1: 17 + 25 = 42\n"
    assert restart_prefix(Z0, 3) == "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 127\n"
    assert restart_prefix(Z0, 4) is None  # z0 has three steps
    assert restart_prefix("Step 1: a\nStep 10: b", 1) == ""  # "Step 10" is not "Step 1"
    assert restart_prefix("Step 1: a\nStep 10: b", 10) == "Step 1: a\n"
    # the shared prefix plus the restart line is the revised attempt's start (Fig. 4)
    ep = split_backtrack(Z0 + Z1 + Z2)
    revised = restart_prefix(ep.z0, ep.restart_step) + ep.z1.split("\n")[-1] + ep.z2
    assert revised == toy.render_solution(*toy.solution_steps(17, [("+", 25), ("*", 3), ("-", 48)]))


# --------------------------------------------------------------------------------------
# Information gain math
# --------------------------------------------------------------------------------------


def test_information_gain_and_episode_gains():
    assert information_gain(0.75, 0.25) == 0.5 and isinstance(information_gain(0.75, 0.25), float)
    np.testing.assert_allclose(information_gain([0.5, 0.0], [0.25, 0.5]), [0.25, -0.5])
    assert episode_gains([0.0, 0.125, 0.5, 1.0]) == [0.125, 0.375, 0.5]
    assert episode_gains([0.5]) == []
    # gains telescope: their sum is the last J minus the first
    j = [0.25, 0.0, 0.625, 0.875]
    assert sum(episode_gains(j)) == pytest.approx(j[-1] - j[0])
    per_trace = episode_gains([np.array([0.0, 0.5]), np.array([0.5, 0.5])])
    np.testing.assert_allclose(per_trace[0], [0.5, 0.0])


def test_summarize_means_and_a_model_with_no_traces():
    scored = [{"J": [0.0, 0.25, 0.75, 1.0], "backtrack_gain": 0.5, "z0_correct": 0.0, "z2_correct": 1.0, "valid_restart": True},
              {"J": [0.5, 0.5, 0.25, 0.0], "backtrack_gain": -0.25, "z0_correct": 0.0, "z2_correct": 0.0, "valid_restart": False}]
    s = infogain.summarize(scored, 3)
    assert s["traces"] == 2 and s["skipped"] == 3
    assert s["gain_mean"] == {"z0": 0.125, "z1": 0.125, "z2": 0.0}
    assert s["backtrack_gain_mean_z2_correct"] == 0.5 and s["backtrack_gain_mean_z2_wrong"] == -0.25
    assert s["z2_accuracy"] == 0.5 and s["valid_restart_frac"] == 0.5 and s["backtrack_gain_positive_frac"] == 0.5
    # a model whose samples held no backtrack trace is reported, with no means, not an error
    empty = infogain.summarize([], 7)
    assert empty["traces"] == 0 and empty["skipped"] == 7
    assert empty["gain_mean"]["z1"] is None and empty["z2_accuracy"] is None and empty["backtrack_gain_stderr"] is None


def test_grade_cached_matches_grade():
    cases = [("\\boxed{\\frac{1}{2}}", "0.5"), ("x \\boxed{3} y", "3"), ("no box", "3"), ("\\boxed{x=3}", "3"),
             ("\\boxed{4}", "3"), ("\\boxed{3", "3"), (utils.MU_SUFFIX + "12}", "12"), ("\\boxed{\\text{ 7 }}", "7")]
    for text, gold in cases * 2:  # the second round is served from the cache
        assert sampling.grade_cached(text, gold) == utils.grade(text, gold), (text, gold)


def test_mu_context_newline_rule():
    assert sampling.mu_context("Solution:\n", utils.MU_SUFFIX) == "Solution:" + utils.MU_SUFFIX
    assert sampling.mu_context("= 42", utils.MU_SUFFIX) == "= 42" + utils.MU_SUFFIX
    assert sampling.mu_context("= 42\n", " Final answer: \\boxed{") == "= 42\n Final answer: \\boxed{"
    assert sampling.mu_context("= 42\n", "") == "= 42\n"


# --------------------------------------------------------------------------------------
# The estimator on a fake mu with known success rates (the issue asks for this one fake)
# --------------------------------------------------------------------------------------


class BernoulliSampler:
    """Stands in for sampling.Sampler: each answer to a prompt is the gold answer with a known
    probability p(context), else a wrong one. Records every generate call."""

    def __init__(self, tokenizer, rates: dict, gold: str, seed: int = 0):
        self.tokenizer, self.rates, self.gold = tokenizer, rates, gold
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None, logprobs=True,
                 use_tqdm=False):
        self.calls.append((len(prompts), n))
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p, skip_special_tokens=True) if not isinstance(p, str) else p
            assert text.endswith(utils.MU_SUFFIX)
            rate = self.rates[text[: -len(utils.MU_SUFFIX)]]
            ok = self.rng.random(n) < rate
            out.append([sampling.Sample(f"{self.gold if c else '1000'}}}", [], 1, "stop", None, 0) for c in ok])
        return out


def test_estimator_is_unbiased_and_shares_prefill(toy_paths):
    tok = utils.load_tokenizer(toy_paths["base"])
    rates = {"Problem: a\nSolution:": 0.125, "Problem: b\nSolution:\nStep 1: 3 + 4 = 7": 0.6, "Problem: c": 0.9}
    contexts = ["Problem: a\nSolution:\n", "Problem: b\nSolution:\nStep 1: 3 + 4 = 7", "Problem: c"]
    sampler = BernoulliSampler(tok, rates, gold="7")
    m, reps = 8, 400
    mu = sampling.MetaProver(sampler, m=m)
    est = np.stack([mu.success_rates(contexts, ["7"] * 3) for _ in range(reps)])  # (reps, 3)
    p = np.array([0.125, 0.6, 0.9])
    stderr = np.sqrt(p * (1 - p) / (m * reps))
    assert np.all(np.abs(est.mean(0) - p) < 4 * stderr), (est.mean(0), p)
    assert np.all(est.var(0, ddof=1) > 0)  # a real estimate, not the known rate handed back
    # the m answers of a context come from one request with n=m (one prefill)
    assert sampler.calls == [(3, m)] * reps
    # gains from these estimates are unbiased too: E[J(b) - J(a)] = 0.6 - 0.125
    gain = information_gain(est[:, 1], est[:, 0])
    assert abs(gain.mean() - 0.475) < 4 * np.sqrt((stderr[0] ** 2 + stderr[1] ** 2))


# --------------------------------------------------------------------------------------
# The real toy meta-prover
# --------------------------------------------------------------------------------------


MISS_RATE = 1e-4
"""The chance that a meta-prover that ignores its context passes one paired comparison below."""


def _gap_threshold(n_pairs: int) -> float:
    """Hoeffding's bound for a mean of n_pairs independent mean-0 differences in [-1, 1]:
    P(mean >= t) <= exp(-n_pairs t^2 / 2), so t = sqrt(2 ln(1 / MISS_RATE) / n_pairs)."""
    return math.sqrt(2 * math.log(1 / MISS_RATE) / n_pairs)


def _assert_gap(a: np.ndarray, b: np.ndarray, what: str):
    """a, b: (problems, m) 0/1 answers of mu on the same problems under two contexts."""
    t = _gap_threshold(a.size)
    assert (a - b).mean() > t, f"{what}: J {a.mean():.3f} vs {b.mean():.3f}, gap must exceed {t:.3f}"


def _shifted_chain(start: int, ops: list, final: int):
    """Step lines of the same operations from a nearby start (every step right for that start,
    every value in the toy's range), whose result differs from the true one; None if none."""
    for delta in (1, -1, 2, -2, 3, -3):
        lines, value = toy.solution_steps(start + delta, ops)
        values = [start + delta] + [int(line.rsplit("=", 1)[1]) for line in lines]
        if value != final and all(0 <= v <= toy.MAX_VALUE for v in values):
            return lines
    return None


def test_toy_meta_prover_reads_the_context(toy_paths, toy_sampler):
    """J(mu | c) from the real toy model reads the context: higher after all the solution's
    steps than after the prompt alone or after a wrong chain of steps, and after the full
    solution than after the prompt; a rollout mu (empty suffix) finishes a solution whose steps
    are written far more often than one it must write from the prompt.

    The margins are derived, not fitted to one build (each machine kind builds another toy).
    Every comparison is paired: the same n problems and m answers per context, answer s of
    problem i under context a against answer s under context b. If mu ignored what follows the
    prompt, both contexts would give it the same answer distribution per problem, so the
    N = n m differences would be independent (each answer its own random stream), in [-1, 1]
    and of mean 0, and Hoeffding's inequality gives P(mean difference >= t) <= exp(-N t^2 / 2).
    Each assertion asks mean difference > t = sqrt(2 ln(1 / MISS_RATE) / N): a mu that ignores
    its context passes one with probability below MISS_RATE on any toy. The same bound on the
    other side: a toy whose true gap is at least 2 t fails one with probability below
    MISS_RATE. With n = 128 forced answers of m = 8, t is about 0.134; the rollout's 64
    problems of m = 4 give about 0.27.

    The wrong context is the same operations from a shifted start (each step right for its own
    operand), not only a wrong last result: a mu that recomputes the last step instead of
    copying its written result answers the wrong chain's value too, so the comparison separates
    reading the steps from ignoring them whichever habit a build learned."""
    records = utils.read_records(toy_paths["test"], ["problem", "answer"])
    ctx = {"prompt": [], "steps": [], "wrong_chain": [], "full": []}
    golds = []
    for r in records:
        start, ops = _parse_problem(r["problem"])
        lines, final = toy.solution_steps(start, ops)
        assert str(final) == r["answer"]
        wrong = _shifted_chain(start, ops, final)
        if wrong is None:
            continue
        prompt = utils.build_prompt(toy_sampler.tokenizer, r["problem"])
        ctx["prompt"].append(prompt)
        ctx["steps"].append(prompt + "\n".join(lines))
        ctx["wrong_chain"].append(prompt + "\n".join(wrong))
        ctx["full"].append(prompt + toy.render_solution(lines, final))
        golds.append(r["answer"])
        if len(golds) == 128:
            break
    assert len(golds) == 128
    mu = sampling.MetaProver(toy_sampler, m=8)
    C = {k: mu.correct(c, golds, seed=0) for k, c in ctx.items()}  # each (128, 8) of 0/1
    assert C["steps"].shape == (128, 8) and set(np.unique(C["steps"])) <= {0.0, 1.0}
    _assert_gap(C["steps"], C["prompt"], "the steps carry information")
    _assert_gap(C["steps"], C["wrong_chain"], "mu answers from the steps written")
    _assert_gap(C["full"], C["prompt"], "the full solution carries information")
    # an empty suffix: mu completes the solution (a rollout value); after all the steps it
    # only has to write the answer line, from the prompt it cannot finish in 24 tokens
    roll = sampling.MetaProver(toy_sampler, suffix="", m=4, max_tokens=24)
    _assert_gap(roll.correct(ctx["steps"][:64], golds[:64], seed=0),
                roll.correct(ctx["prompt"][:64], golds[:64], seed=0), "a rollout finishes written steps")


def _parse_problem(text: str):
    words = {v: k for k, v in toy.OP_WORDS.items()}
    parts = [s.strip() for s in text.replace(" What is the result?", "").split(".") if s.strip()]
    start = int(parts[0].split()[-1])
    ops = [(words[s.rsplit(" ", 1)[0]], int(s.rsplit(" ", 1)[1])) for s in parts[1:]]
    return start, ops


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, "infogain.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_bad_input(tmp_path, toy_paths, run_script):
    good = {"problem": "Start with 2. Add 3. What is the result?", "answer": "5", "completion": "Step 1: 2 + 3 = 5\n"
            "The answer is \\boxed{6}\n" + MARK + "\nStep 1: 2 + 3 = 5\nThe answer is \\boxed{5}"}
    cases = {
        "missing.jsonl": (None, "no such file"),
        "malformed.jsonl": (json.dumps(good) + "\n\n{oops\n", "malformed.jsonl:3: malformed JSON"),
        "nofield.jsonl": (json.dumps({k: v for k, v in good.items() if k != "answer"}) + "\n", "nofield.jsonl:1: missing field 'answer'"),
        "nomarker.jsonl": (json.dumps(good) + "\n" + json.dumps({**good, "completion": "Step 1: 2 + 3 = 5"}) + "\n",
                           "nomarker.jsonl:2: not a backtrack trace"),
    }
    for name, (content, msg) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        # bad input fails before an engine starts
        code, err = run_script("infogain", ["--model", toy_paths["base"], "--traces", str(path), "--out",
                                            str(tmp_path / "out")], own_process=name == "malformed.jsonl")
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (name, err)
        assert not (tmp_path / "out").exists()
    code, err = run_script("infogain", ["--model", str(tmp_path / "nope"), "--traces", str(tmp_path / "nomarker.jsonl")])
    assert code == 2 and len(err) == 1 and "model path does not exist" in err[0], err


def test_cli_scores_a_traces_file(tmp_path, toy_paths):
    records = utils.read_records(toy_paths["test"], ["problem", "answer"])[:3]
    rows = []
    for i, r in enumerate(records):
        start, ops = _parse_problem(r["problem"])
        lines, final = toy.solution_steps(start, ops)
        w = next(v for v in (1, 2, 3) if v not in (int(lines[1].rsplit("= ", 1)[1]), final))  # a wrong step 2 and answer
        bad = lines[:1] + [lines[1].rsplit("=", 1)[0] + f"= {w}"]
        z0 = toy.render_solution(bad, w)
        rows.append({"qid": f"q{i}", "question": r["problem"], "answer": r["answer"],
                     "completion": z0 + "\n" + MARK + "\n" + toy.render_solution(lines[1:], final)})
    rows.append({"qid": "x", "question": records[0]["problem"], "answer": records[0]["answer"], "completion": "no marker"})
    rows.append({**rows[0], "qid": "long", "completion": rows[0]["completion"] + "\nStep 9: 1 + 1 = 2" * 400})
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = _cli(["--model", f"toy={toy_paths['base']}", "--traces", str(traces), "--out", str(out), "--mu-samples", "4",
              "--problem-field", "question", "--id-field", "qid", "--skip-invalid"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    gains = utils.read_records(str(out / "gains.jsonl"))
    assert [g["id"] for g in gains] == ["q0", "q1", "q2"] and all(g["model"] == "toy" for g in gains)
    for g in gains:
        assert g["restart_step"] == 2 and g["valid_restart"] and g["z2_correct"] == 1.0 and g["z0_correct"] == 0.0
        assert len(g["J"]) == 4 and all(0 <= j <= 1 and j * 4 == int(j * 4) for j in g["J"])
        assert g["gains"] == pytest.approx(episode_gains(g["J"])) and g["backtrack_gain"] == g["gains"][1]
        # ground truth: z0 slipped at step 2, the trace restarts there
        assert (g["first_wrong"], g["restart_class"], g["can_fix"]) == (2, "at", True)
    summary = json.loads((out / "summary.json").read_text())["models"]["toy"]
    assert summary["traces"] == 3 and summary["skipped"] == 2 and summary["z2_accuracy"] == 1.0
    assert set(summary["J_mean"]) == {"x", "x_z0", "x_z0_z1", "x_z0_z1_z2"}
    disc = summary["discrimination"]
    assert disc["traces"] == 3 and disc["groups"]["at"]["n"] == 3 and disc["fixable"] == 3 and disc["auc"] is None
    png = (out / "infogain_hist.png").read_bytes()
    assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"



def test_main_uses_a_ready_engine(tmp_path, toy_paths, toy_sampler):
    """main builds no engine for a model path in sampling.READY: it scores with the ready one and
    leaves it open (the session's engine still samples afterwards)."""
    r = utils.read_records(toy_paths["test"], ["problem", "answer"])[0]
    start, ops = _parse_problem(r["problem"])
    lines, final = toy.solution_steps(start, ops)
    row = {"problem": r["problem"], "answer": r["answer"],
           "completion": toy.render_solution(lines, final) + "\n" + MARK + "\n" + toy.render_solution(lines, final)}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    args = infogain.Args(model=[f"toy={toy_paths['base']}"], traces=[str(tmp_path / "t.jsonl")], mu_samples=2,
                         out=str(tmp_path / "out"))
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        report = infogain.main(args)
    assert toy_paths["base"] not in sampling.READY
    assert report["models"]["toy"]["traces"] == 1 and (tmp_path / "out" / "gains.jsonl").exists()
    assert len(toy_sampler.generate([utils.encode(toy_sampler.tokenizer, "Step 1:")], max_tokens=2, seed=0)[0]) == 1

# --------------------------------------------------------------------------------------
# The rollout meta-prover (--mu-mode rollout) on the real toy
# --------------------------------------------------------------------------------------


def test_rollout_meta_prover_on_the_toy(toy_paths, toy_sampler):
    """mu continues the context and its last boxed answer is graded: a context that holds a
    right full solution scores high, a wrong one low (mu's answer is the box already there
    unless it revises it), and the bare prompt scores about the base's pass@1 at the same
    length (a Monte-Carlo value of the prompt). After a wrong z0, a restart that redoes the
    first wrong step right scores above one that restarts after it."""
    records = utils.read_records(toy_paths["test"], ["problem", "answer"])[:32]
    tok = toy_sampler.tokenizer
    ctx = {"prompt": [], "full": [], "wrong_full": [], "fix": [], "after": []}
    golds = []
    for r in records:
        start, ops = toy.parse_problem(r["problem"])
        lines, final = toy.solution_steps(start, ops)
        prompt = utils.build_prompt(tok, r["problem"])
        # z0 slips at step 1 by +10, the chain follows it
        v1 = toy.apply_op(start, *ops[0]) + 10
        rest, bad_final = toy.solution_steps(v1, ops[1:], first=2)
        bad_lines = [f"Step 1: {start} {ops[0][0]} {ops[0][1]} = {v1}"] + rest
        z0 = toy.render_solution(bad_lines, bad_final)
        assert toy.first_wrong_step(z0, start, ops) == 1
        cue = "\n" + utils.BACKTRACK_MARKER + "\n"
        ctx["prompt"].append(prompt)
        ctx["full"].append(prompt + toy.render_solution(lines, final))
        ctx["wrong_full"].append(prompt + z0)
        ctx["fix"].append(prompt + z0 + cue + lines[0])  # restart at f = 1, redone right
        ctx["after"].append(prompt + z0 + cue + bad_lines[1])  # restart at step 2, on z0's wrong value
        golds.append(r["answer"])
    mu = sampling.MetaProver(toy_sampler, m=8, mode="rollout", rollout_tokens=160)
    J = {k: mu.success_rates(c, golds, seed=utils.derive_seed(0, "rollout-test", k)) for k, c in ctx.items()}
    assert J["full"].mean() > 0.9 and J["wrong_full"].mean() < 0.1, J
    # 256 mu samples each: the binomial noise of the difference is about 0.02-0.04; how far apart
    # the two are is the toy's skill after the cue, which varies by build (docs/toy.md: the toy's
    # quality is a draw of float noise), so the margin is the noise, not a skill level
    assert J["fix"].mean() > J["after"].mean() + 0.04, J
    outs = toy_sampler.generate([utils.encode(tok, p) for p in ctx["prompt"]], n=8, temperature=1.0, max_tokens=160,
                                seed=utils.derive_seed(0, "pass@1"), logprobs=False)
    pass1 = np.mean([[utils.grade(s.text, g) for s in group] for group, g in zip(outs, golds)])
    # same quantity, independent samples: 256 each, the binomial noise of the difference is about 0.04
    assert abs(J["prompt"].mean() - pass1) < 0.15, (J["prompt"].mean(), pass1)
    assert mu.seconds > 0


# --------------------------------------------------------------------------------------
# The rollout meta-prover grades the last episode; gains of unparsed continuations; the
# truncation rule; z0's guards
# --------------------------------------------------------------------------------------


class ScriptedMu:
    """Stands in for mu's engine where a test needs mu to write one known text (the real toy
    cannot be made to write nothing, or a given answer, on demand): every sample of every
    prompt is `text`, ended by itself. Records the prompts it was asked."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer, self.text, self.prompts = tokenizer, text, []

    def generate(self, prompts, n=1, **kw):
        self.prompts += [self.tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
        return [[sampling.Sample(self.text, [], 0, "stop", None, len(p))] * n for p in prompts]


RIGHT_Z0 = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"
PROBLEM = "Start with 17. Add 25. Multiply by 3. Subtract 48. What is the result?"


def test_rollout_meta_prover_grades_only_the_last_episode(toy_paths):
    """After a backtrack episode, mu's rollout is graded on what follows the last marker (the
    rule of the GRPO outcome and utils.last_episode); before any backtrack on the whole text.
    A right z0 and a mu that writes nothing within its budget: J before z1 = 1 (z0's box),
    J after z1 = 0 (the answer z1 abandons is not credited), after a right z2 1, a wrong z2 0."""
    tok = utils.load_tokenizer(toy_paths["base"])
    x = utils.build_prompt(tok, PROBLEM)
    right = Episodes(RIGHT_Z0, Z1, Z2, 2)
    wrong = Episodes(RIGHT_Z0, "\n" + MARK + "\nStep 3: 126 - 48 = 77", "\nThe answer is \\boxed{77}", 3)
    silent = ScriptedMu(tok, "")
    mu = sampling.MetaProver(silent, m=4, mode="rollout", rollout_tokens=8)
    J = infogain.trace_values(mu, [x, x], [right, wrong], ["78", "78"])  # (2, 4)
    assert J.tolist() == [[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    assert silent.prompts[:4] == infogain.episode_contexts(x, right)  # rollout mode appends no suffix
    # mu writes the answer after the restart line: that box counts; after its own second
    # backtrack only what follows its marker counts
    answers = sampling.MetaProver(ScriptedMu(tok, "\nThe answer is \\boxed{78}"), m=2, mode="rollout")
    assert answers.success_rates([x + RIGHT_Z0 + Z1, x + RIGHT_Z0], ["78", "77"]).tolist() == [1.0, 0.0]
    again = sampling.MetaProver(ScriptedMu(tok, "\n" + MARK + "\nStep 3: 126 - 48 = 79"), m=2, mode="rollout")
    assert again.success_rates([x + RIGHT_Z0 + Z1 + Z2, x + RIGHT_Z0], ["78", "78"]).tolist() == [0.0, 0.0]
    # the forced mode is unchanged: suffix + completion graded, the context never
    forced = sampling.MetaProver(ScriptedMu(tok, "78}"), m=2)
    assert forced.success_rates([x + RIGHT_Z0 + Z1, x], ["78", "78"]).tolist() == [1.0, 1.0]
    assert sampling.MetaProver(ScriptedMu(tok, ""), m=2).success_rates([x + RIGHT_Z0], ["78"]).tolist() == [0.0]


def test_backtrack_gain_of_a_continuation_with_no_episode():
    """No backtrack episode (the continuation does not parse): J after it counts as 0, so its
    gain is -J(mu | x, z0), at most any parsed continuation's gain from the same z0."""
    assert infogain.backtrack_gain(0.25, 0.75) == 0.5 and infogain.backtrack_gain(0.25, None) == -0.25
    assert infogain.backtrack_gain(0.0, None) == 0.0 and infogain.backtrack_gain(1.0, None) == -1.0
    grid = [k / 8 for k in range(9)]
    assert all(infogain.backtrack_gain(b, None) <= infogain.backtrack_gain(b, a) for b in grid for a in grid)


def test_sample_outcome_a_truncated_sample_scores_zero():
    boxed = "Step 3: 126 - 48 = 78\nThe answer is \\boxed{78}"
    assert sampling.sample_outcome(boxed, "78", "stop") == 1.0
    assert sampling.sample_outcome(boxed, "78", "length") == 0.0  # cut at the token limit, box or not
    assert sampling.sample_outcome(boxed, "77", "stop") == 0.0 and sampling.sample_outcome(None, "78", "stop") == 0.0


class AttemptScript:
    """Stands in for the engine where a test needs attempts that are cut or box-less on demand:
    the k-th request for a prompt gets script[prompt][k] = (text, finish_reason). Records
    (prompt, seed) per request."""

    def __init__(self, tokenizer, script: dict):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, n=1, seed=None, **kw):
        out = []
        for ids in prompts:
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            k = sum(p == prompt for p, _ in self.calls)
            self.calls.append((prompt, seed))
            text, reason = self.script[prompt][k]
            out.append([sampling.Sample(text, [1], 1, reason, None, len(ids))] * n)
        return out


def test_sample_z0_resamples_cut_or_boxless_attempts_then_drops(toy_paths):
    tok = utils.load_tokenizer(toy_paths["base"])
    good = "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}"
    probs = [{"id": i, "prompt": utils.build_prompt(tok, f"Start with {i}. Add 3. What is the result?")} for i in (4, 7, 9)]
    script = {probs[0]["prompt"]: [(good, "stop")],
              probs[1]["prompt"]: [("Step 1: 2 + 3", "length"), ("Step 1: 2 + 3 = 5", "stop"), (good + "\n\n", "stop")],
              probs[2]["prompt"]: [(good, "length")] * 3 + [("Step 1: 2 +", "length")]}
    sampler = AttemptScript(tok, script)
    kept, dropped = sampling.sample_z0(sampler, probs, temperature=1.0, max_tokens=32, seed_parts=(0, "z0"), tries=4)
    assert kept == {4: good, 7: good} and dropped == {9: "Step 1: 2 +"}
    asked = [p for p, _ in sampler.calls]
    assert [asked.count(p["prompt"]) for p in probs] == [1, 3, 4]  # resampled until usable, at most `tries` in all
    seeds = [s for p, s in sampler.calls if p == probs[2]["prompt"]]
    assert len(set(seeds)) == 4 and seeds[0] == utils.derive_seed(0, "z0", 0)  # a new seed per try; the first as before
    assert sampling.usable_z0(sampling.Sample(good, [1], 1, "stop", None, 0))
    assert not sampling.usable_z0(sampling.Sample(good, [1], 1, "length", None, 0))
    assert not sampling.usable_z0(sampling.Sample("Step 1: 2 + 3 = 5\nThe answer is \\boxed{5", [1], 1, "stop", None, 0))


def test_sample_z0_on_the_toy_keeps_only_finished_boxed_attempts(toy_paths, toy_sampler):
    problems = utils.load_problems(toy_paths["test"], limit=16, tokenizer=toy_sampler.tokenizer)
    kept, dropped = sampling.sample_z0(toy_sampler, problems, temperature=1.0, max_tokens=4, seed_parts=(0, "z0"))
    assert kept == {} and sorted(dropped) == [p["id"] for p in problems]  # 4 tokens: every try is cut
    kept, dropped = sampling.sample_z0(toy_sampler, problems, temperature=1.0, max_tokens=160, seed_parts=(0, "z0"))
    assert len(kept) + len(dropped) == 16 and len(kept) >= 12
    assert all(utils.extract_boxed(z) is not None and z == z.rstrip() for z in kept.values())


# --------------------------------------------------------------------------------------
# The forced answer's box, the stop at its closing brace, the estimator's standard error
# --------------------------------------------------------------------------------------


def test_first_box_and_a_suffix_that_opens_one():
    assert sampling.first_box("\\boxed{42} then \\boxed{7}") == "42"
    assert sampling.first_box("x \\boxed{ \\frac{1}{2} } y") == "\\frac{1}{2}"
    assert sampling.first_box("\\fbox{3}") == "3"
    assert sampling.first_box("\\boxed{4") is None and sampling.first_box("no box") is None
    assert sampling.first_box("\\boxed{3 \\boxed{4}") is None  # the first box never closes
    assert sampling.opens_box(utils.MU_SUFFIX) and sampling.opens_box("Answer: \\boxed{ ")
    assert not sampling.opens_box("") and not sampling.opens_box("\\boxed{1} done")


def test_forced_answer_is_the_box_the_suffix_opens(toy_paths):
    """What mu writes after closing the suffix's box is not its answer: a second box does not
    replace the first, an unclosed second box does not void it. A suffix that opens no box
    keeps the last complete box of the completion (warmstart's value estimate)."""
    tok = utils.load_tokenizer(toy_paths["base"])
    x = utils.build_prompt(tok, PROBLEM)
    assert sampling.MetaProver(ScriptedMu(tok, "42} so \\boxed{78}"), m=2).success_rates([x], ["78"]).tolist() == [0.0]
    assert sampling.MetaProver(ScriptedMu(tok, "78} or \\boxed{4"), m=2).success_rates([x], ["78"]).tolist() == [1.0]
    assert utils.grade(utils.MU_SUFFIX + "78} or \\boxed{4", "78") == 0.0  # the last-box rule it replaces
    rollout = sampling.MetaProver(ScriptedMu(tok, "\\boxed{42} so \\boxed{78}"), suffix="", m=2)
    assert not rollout.boxed and rollout.success_rates([x], ["78"]).tolist() == [1.0]


class BraceMu:
    """A scripted mu that writes `pieces` one stop at a time: its first answer is pieces[0]
    and each continuation of it (a prompt that ends with the ids written so far) the next
    piece, each stopped at a "}" (finish "stop"). Records (prompt count, n, max_tokens, stop)."""

    def __init__(self, tokenizer, pieces: list[str]):
        self.tokenizer, self.pieces, self.calls = tokenizer, pieces, []
        self.ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]

    def generate(self, prompts, n=1, max_tokens=16, stop=None, **kw):
        self.calls.append((len(prompts), n, max_tokens, stop))
        out = []
        for p in prompts:
            k = next((k for k in range(len(self.ids), 0, -1) if p[len(p) - sum(map(len, self.ids[:k])):]
                      == [t for ids in self.ids[:k] for t in ids]), 0)
            ids = self.ids[k]
            out.append([sampling.Sample(self.pieces[k][:-1], ids, len(ids), "stop", None, len(p))] * n)
        return out


def test_stop_at_box_continues_an_answer_whose_box_is_still_open(toy_paths):
    """The stop at "}" ends each answer at its first closing brace; the answer is decoded from
    its ids (vLLM leaves the stop string out of the text), and one whose box is still open (a
    nested brace) goes on from its own ids with what is left of max_tokens, until it closes."""
    tok = utils.load_tokenizer(toy_paths["base"])
    mu = BraceMu(tok, ["\\frac{1}", "{2}", "}"])
    prover = sampling.MetaProver(mu, m=2, max_tokens=16)
    assert prover.answers(["Problem: x"], seed=3) == [[utils.MU_SUFFIX + "\\frac{1}{2}}"] * 2]
    used = [len(i) for i in mu.ids]
    assert mu.calls[0] == (1, 2, 16, ["}"])
    assert mu.calls[1:] == [(1, 1, 16 - used[0], ["}"])] * 2 + [(1, 1, 16 - used[0] - used[1], ["}"])] * 2
    assert prover.tokens == 2 * sum(used)
    assert prover.correct(["Problem: x"], ["\\frac{1}{2}"], seed=3).tolist() == [[1.0, 1.0]]
    # no stop: one call, the text as written, the same first-box grade
    free = sampling.MetaProver(BraceMu(tok, ["\\frac{1}{2}} and more"]), m=2, stop_at_box=False)
    assert free.correct(["Problem: x"], ["\\frac{1}{2}"], seed=3).tolist() == [[1.0, 1.0]]
    assert free.sampler.calls == [(1, 2, 16, None)]


def test_stop_at_box_changes_no_grade_on_the_toy(toy_paths, toy_sampler):
    """The toy's answers are integers (no nested brace): with a fixed seed, the forced mu
    with the stop gives the same grades as without it, on fewer tokens."""
    records = utils.read_records(toy_paths["test"], ["problem", "answer"])[:24]
    contexts, golds = [], []
    for r in records:
        start, ops = _parse_problem(r["problem"])
        lines, _ = toy.solution_steps(start, ops)
        prompt = utils.build_prompt(toy_sampler.tokenizer, r["problem"])
        contexts += [prompt, prompt + "\n".join(lines[:2]), prompt + "\n".join(lines)]
        golds += [r["answer"]] * 3
    stop, free = sampling.MetaProver(toy_sampler, m=8), sampling.MetaProver(toy_sampler, m=8, stop_at_box=False)
    a, b = stop.correct(contexts, golds, seed=5), free.correct(contexts, golds, seed=5)  # (72, 8) each
    assert np.array_equal(a, b) and 0 < a.mean() < 1
    assert stop.tokens < free.tokens


def test_gain_standard_error():
    assert infogain.gain_standard_error(0.5, 0.5, 4) == pytest.approx(np.sqrt(0.5 / 4))
    assert infogain.gain_standard_error(0.5, 0.5, 4, ref_m=2) == pytest.approx(0.5)  # x 2 / (2 - 1)
    se = infogain.gain_standard_error(np.array([0.0, 0.25]), np.array([1.0, 0.75]), 16)
    assert se.tolist() == pytest.approx([0.0, np.sqrt(0.375 / 16)])
