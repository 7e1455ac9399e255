"""r1_analysis.py: the episode splitter on hand-written R1-style traces, the Fig. 12 prompt,
[maj@p]_j / regret / bins / baseline on hand-made tables, a tiny real run on the toy, bad input."""

import itertools
import json
import os
import subprocess
import sys

import pytest

import evaluate
import r1_analysis
import sampling
import utils
from r1_analysis import (FIG11_PHRASES, FIG12_SUFFIX, Args, extract_thinking, group_episodes, meta_prover_prompt,
                         split_episodes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# an R1-style thinking block: paragraphs separated by blank lines, phrases opening some of them
# and appearing inside others
R1_STEPS = [
    "Okay, so I need to find the sum of the roots of x^2 - 5x + 6 = 0.",  # 0
    "By Vieta's formulas, the sum is 5. But wait is a word I use a lot; here it is mid-paragraph.",  # 1
    "Let me factor it: (x - 2)(x - 3) = 0, so the roots are 2 and 3.",  # 2
    "Wait, let me check: 2 + 3 = 5. Good.",  # 3: opens episode 2
    "Alternatively, I could complete the square.",  # 4: too close to 3, no split
    "x^2 - 5x = -6, so (x - 5/2)^2 = 1/4.",  # 5
    "So x = 5/2 +- 1/2, i.e. 2 or 3. Alternatively said, the sum is 5.",  # 6: phrase mid-paragraph
    "But let me double-check the discriminant: 25 - 24 = 1 > 0.",  # 7: opens episode 3
    "So there are two real roots.",  # 8
    "Waiting is not needed; the sum is 5.",  # 9: "Waiting" is not "Wait"
    "But hold on, the problem asks for the sum, not the product.",  # 10: opens episode 4
    "The product would be 6.",  # 11
    "So the sum is 5.",  # 12
    "Is there another way to think about this?",  # 13: would leave 2 steps after it: no split
    "No, the answer is 5.",  # 14
]
R1_THINKING = "\n\n".join(R1_STEPS)
J = "\n\n".join


# --------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------


def test_split_r1_style_trace():
    eps = split_episodes(R1_THINKING)
    assert eps == [J(R1_STEPS[0:3]), J(R1_STEPS[3:7]), J(R1_STEPS[7:10]), J(R1_STEPS[10:15])]
    assert "\n\n".join(eps) == R1_THINKING  # nothing lost, nothing reordered


def test_phrases_mid_paragraph_do_not_split():
    steps = ["First step.", "Second step.", "Third step, wait, but wait, alternatively: all inside.",
             "Fourth. Wait, hmm.", "Fifth.", "Sixth.", "Seventh."]
    assert split_episodes(J(steps)) == [J(steps)]
    # the same paragraph opened by the phrase does split
    steps[3] = "Wait, hmm."
    assert split_episodes(J(steps)) == [J(steps[:3]), J(steps[3:])]


def test_phrase_must_open_the_step_as_a_word():
    s = r1_analysis.opens_episode
    assert s("Wait, no.") and s("  Wait") and s("Wait") and s("But wait, 2 + 2 = 5?")
    assert s("Is there another way to think about this? Yes.") and s("But hold on.")
    assert not s("Waiting room") and not s("wait, lowercase") and not s("So wait") and not s("Waitress")
    assert s("Alternatively, x") and s("Alternatively")  # a step that is only the phrase
    assert s("Hmm.", phrases=["Hmm"]) and not s("Wait.", phrases=["Hmm"])


def test_three_step_minimum():
    steps = ["a", "Wait b", "c", "Wait d", "e", "f", "Wait g", "h", "i"]
    # "Wait b" is one step after the start and "Wait d" three: only the second splits;
    # "Wait g" is three after "Wait d" and leaves three steps: it splits too
    assert split_episodes(J(steps)) == [J(steps[0:3]), J(steps[3:6]), J(steps[6:9])]
    # a boundary leaving fewer than three steps after it is skipped (the last episode is long enough)
    short_tail = steps[:8]
    assert split_episodes(J(short_tail)) == [J(short_tail[0:3]), J(short_tail[3:8])]
    # min_steps=1: every phrase splits
    assert split_episodes(J(steps), min_steps=1) == [J(["a"]), J(["Wait b", "c"]), J(["Wait d", "e", "f"]),
                                                     J(["Wait g", "h", "i"])]
    # every episode has at least min_steps steps unless the whole text has fewer
    for m in (2, 3, 4):
        for ep in split_episodes(J(steps), min_steps=m):
            assert len(ep.split("\n\n")) >= m
    assert split_episodes(J(["Wait a", "Wait b"])) == [J(["Wait a", "Wait b"])]
    assert split_episodes("") == [] and split_episodes("\n\n  \n\n") == []
    with pytest.raises(ValueError):
        split_episodes("a", min_steps=0)


def test_blank_steps_are_dropped():
    text = "\n\nOne.\n\n\n\nTwo.\n\n   \n\nThree.\n\nWait, four.\n\nFive.\n\nSix.\n\n"
    assert split_episodes(text) == [J(["One.", "Two.", "Three."]), J(["Wait, four.", "Five.", "Six."])]


def test_cap_merges_the_rest_into_the_last():
    steps = ["a", "b", "c"] + [f"Wait {i}" if k == 0 else f"x{i}{k}" for i in range(4) for k in range(3)]
    full = split_episodes(J(steps))
    assert len(full) == 5
    capped = split_episodes(J(steps), max_episodes=3)
    assert capped == full[:2] + [J(full[2:])]
    assert split_episodes(J(steps), max_episodes=1) == [J(steps)]
    assert split_episodes(J(steps), max_episodes=9) == full
    with pytest.raises(ValueError):
        split_episodes(J(steps), max_episodes=0)


def test_grouping():
    eps = ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]
    assert group_episodes(eps, 3) == ["e1\n\ne2\n\ne3", "e4\n\ne5\n\ne6", "e7"]
    assert group_episodes(eps, 5) == [J(eps[:5]), J(eps[5:])]
    assert group_episodes(eps, 1) == eps and group_episodes(eps, 10) == [J(eps)] and group_episodes([], 3) == []
    assert group_episodes(eps, 2, delimiter="\n") == ["e1\ne2", "e3\ne4", "e5\ne6", "e7"]
    with pytest.raises(ValueError):
        group_episodes(eps, 0)


def test_custom_delimiter_toy_stream():
    m = utils.BACKTRACK_MARKER
    stream = ("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 127\nThe answer is \\boxed{127}"
              + evaluate.CONTINUE_CUE + " 2: 42 * 3 = 126\nThe answer is \\boxed{126}"
              + evaluate.CONTINUE_CUE + " 2: 42 * 3 = 126\nThe answer is \\boxed{126}")
    eps = split_episodes(stream, delimiter="\n")
    assert eps == ["Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 127\nThe answer is \\boxed{127}",
                   f"{m}\nStep 2: 42 * 3 = 126\nThe answer is \\boxed{{126}}",
                   f"{m}\nStep 2: 42 * 3 = 126\nThe answer is \\boxed{{126}}"]
    assert split_episodes(stream) == [stream]  # no blank line: one step, one episode
    assert group_episodes(eps, 2, "\n") == [eps[0] + "\n" + eps[1], eps[2]]


def test_extract_thinking():
    assert extract_thinking("<think>\nA\n\nB\n</think>\n\nThe answer is 5.") == (True, "A\n\nB\n")
    assert extract_thinking("  <think>A</think>x") == (True, "A")
    assert extract_thinking("A\n\nB\n</think>\nsummary") == (False, "A\n\nB\n")  # template opened it
    assert extract_thinking("<think>\ncut at the token limit") == (True, "cut at the token limit")
    assert extract_thinking("no tags") == (False, "no tags")


# --------------------------------------------------------------------------------------
# The meta-prover prompt (Fig. 12)
# --------------------------------------------------------------------------------------

FIG12 = ("Time is up.\n\nGiven the time I've spent and the approaches I've tried, I should stop thinking and "
         "formulate a final answer based on what I already have.\n</think>\n\n"
         "**Step-by-Step Explanation and Answer:**\n\n1. **")
PREFIX = J(R1_STEPS[:7])


class PlainTokenizer:
    chat_template = None


class ChatTokenizer:
    """A tiny chat template; `think` makes the generation prompt open the thinking block."""

    def __init__(self, think: bool):
        from jinja2 import Template

        self.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>" + ("<think>\n" if think else "")
                              + "{% endif %}")
        self._t = Template(self.chat_template)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert not tokenize
        return self._t.render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_fig12_suffix_text():
    assert FIG12_SUFFIX == FIG12
    assert FIG11_PHRASES == ("Wait", "But wait", "Alternatively", "Is there another way to think about this?",
                             "But let me double-check", "But hold on")


def test_prompt_without_chat_template():
    got = meta_prover_prompt(PlainTokenizer(), "What is 2+3?", PREFIX)
    assert got == "Problem: What is 2+3?\nSolution:\n" + PREFIX + "\n\n" + FIG12
    got = meta_prover_prompt(PlainTokenizer(), "What is 2+3?", PREFIX + "\n\n", think_open="<think>\n")
    assert got == "Problem: What is 2+3?\nSolution:\n<think>\n" + PREFIX + "\n\n" + FIG12
    assert meta_prover_prompt(PlainTokenizer(), "Q", "") == "Problem: Q\nSolution:\n" + FIG12


def test_prompt_with_chat_template():
    user = "<|user|>What is 2+3?\n\n" + utils.DEFAULT_INSTRUCTION + "<|end|><|assistant|>"
    got = meta_prover_prompt(ChatTokenizer(think=False), "What is 2+3?", PREFIX, think_open="<think>\n")
    assert got == user + "<think>\n" + PREFIX + "\n\n" + FIG12
    # the template already opened the thinking block: not opened twice
    got = meta_prover_prompt(ChatTokenizer(think=True), "What is 2+3?", PREFIX, think_open="<think>\n")
    assert got == user + "<think>\n" + PREFIX + "\n\n" + FIG12
    got = meta_prover_prompt(ChatTokenizer(think=True), "What is 2+3?", PREFIX)
    assert got == user + "<think>\n" + PREFIX + "\n\n" + FIG12
    got = meta_prover_prompt(ChatTokenizer(think=False), "What is 2+3?", PREFIX, instruction="")
    assert got == "<|user|>What is 2+3?<|end|><|assistant|>" + PREFIX + "\n\n" + FIG12


def test_prompt_toy_suffix():
    prefix = "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}"
    got = meta_prover_prompt(PlainTokenizer(), "Q", prefix + "\n", utils.MU_SUFFIX, sep="\n")
    assert got == "Problem: Q\nSolution:\n" + prefix + "\nTime is up. The answer is \\boxed{"
    got = meta_prover_prompt(PlainTokenizer(), "Q", "Step 1: a\nStep 2: b", "Answer: ", sep="\n")
    assert got == "Problem: Q\nSolution:\nStep 1: a\nStep 2: b\nAnswer: "


# --------------------------------------------------------------------------------------
# [maj@p]_j, regret, bins, baseline on hand-made tables
# --------------------------------------------------------------------------------------


def test_maj_values_hand_table():
    v = r1_analysis.maj_values(["5", "5", "7", None], "5", [1, 2, 4])
    assert v[1] == pytest.approx(2 / 4)
    # the 6 pairs: {5,5} 1, {5,7} x2 a tie 0.5, {5,None} x2 1, {7,None} 0
    assert v[2] == pytest.approx((1 + 2 * 0.5 + 2 * 1 + 0) / 6)
    assert v[4] == 1.0
    assert r1_analysis.maj_values(["7", "7", "5", "5"], "5", [4])[4] == 0.5  # 2-2 tie splits
    assert r1_analysis.maj_values([None, None], "5", [1, 2]) == {1: 0.0, 2: 0.0}
    assert r1_analysis.maj_values(["\\frac{1}{2}", "0.5", "3"], "0.5", [3])[3] == 1.0  # one answer, two forms
    for p in (2, 3):
        answers = ["5", "7", "7", "5", None]
        assert r1_analysis.maj_values(answers, "5", [p])[p] == pytest.approx(evaluate.maj_at_k(answers, "5", p))
    with pytest.raises(ValueError):
        r1_analysis.maj_values(["5"], "5", [2])


def test_maj_values_exact_at_the_rounding_edge():
    """Tables where a float DP (a sum of exp(log C - log C) terms) rounded past 1 or off the
    exact value (maj@2 of 5, 5, 5, None above 1, its maj@1 above 3/4). By hand: maj@1 is the
    share of correct answers; every pair or triple of 5, 5, 5, None holds a 5 and None never
    votes, so maj@2 = maj@3 = 1. Of the 6 pairs of 5, 5, None, None only {None, None} loses:
    maj@2 = 5/6. 5, 5, 5, 7: 3 pairs {5, 5} win, 3 pairs {5, 7} tie (credit 1/2), every triple
    has two 5s: maj@2 = 4.5/6 = 0.75. Each value is the float nearest the exact fraction, so
    == holds."""
    ps = [1, 2, 3, 4]
    assert r1_analysis.maj_values(["5", "5", "5", None], "5", ps) == {1: 0.75, 2: 1.0, 3: 1.0, 4: 1.0}
    assert r1_analysis.maj_values(["5", "5", None, None], "5", ps) == {1: 0.5, 2: 5 / 6, 3: 1.0, 4: 1.0}
    assert r1_analysis.maj_values(["5", "5", "5", "7"], "5", ps) == {1: 0.75, 2: 0.75, 3: 1.0, 4: 1.0}
    assert [evaluate.maj_at_k(["5", "5", "5", None], "5", k) for k in (1, 2, 3)] == [0.75, 1.0, 1.0]
    # one correct cluster of c among n answers (the rest unparsable or one wrong cluster of 1):
    # maj@1 is exactly c / n and no k leaves [0, 1]; a correct cluster that no k-subset can
    # outvote wins with certainty (exactly 1.0) once it must be drawn
    for n in range(1, 13):
        for c in range(1, n + 1):
            for counts, n_none in (([c], n - c), ([c, 1], n - c - 1)):
                if n_none < 0:
                    continue
                curve = evaluate.majority_curve(counts, [True] + [False] * (len(counts) - 1), n_none)
                assert curve[0] == c / n and 0.0 <= curve.min() and curve.max() <= 1.0, (counts, n_none)
                if len(counts) == 1:
                    assert all(curve[k - 1] == 1.0 for k in range(n - c + 1, n + 1)), (counts, n_none)


def point(prefix, ans, m1, m2):
    return {"prefix_tokens": prefix, "answer_tokens": ans, "maj": {"1": m1, "2": m2}}


def test_bin_curve_and_regret_hand_table():
    a = {"points": [point(100, 10, 0.2, 0.3), point(200, 20, 0.6, 0.7)]}
    b = {"points": [point(300, 30, 0.4, 0.5), point(400, 10, 0.4, 0.3), point(500, 10, 1.0, 1.0)]}
    c = r1_analysis.bin_curve([a, b], [1, 2])
    assert c["j"] == [1, 2, 3] and c["n"] == [2, 2, 1]
    assert c["prefix_tokens"] == pytest.approx([200, 300, 500])
    assert c["tokens"]["1"] == pytest.approx([(110 + 330) / 2, (220 + 410) / 2, 510])
    assert c["tokens"]["2"] == pytest.approx([(120 + 360) / 2, (240 + 420) / 2, 520])
    assert c["maj"]["1"] == pytest.approx([0.3, 0.5, 1.0]) and c["maj"]["2"] == pytest.approx([0.4, 0.5, 1.0])
    r = r1_analysis.regret_of(c)
    assert r["j_star"] == 1.0 and r["running"] == pytest.approx([0.7, 1.2, 1.2]) and r["total"] == pytest.approx(1.2)
    r = r1_analysis.regret_of({"maj": {"1": [0.2, 0.4], "8": [0.5, 0.6]}})  # J* = best over p and j
    assert r["j_star"] == 0.6 and r["running"] == pytest.approx([0.4, 0.6])
    r = r1_analysis.regret_of({"maj": {"1": [0.2, 0.4]}}, j_star=0.5)
    assert r["j_star_source"] == "given" and r["total"] == pytest.approx(0.3 + 0.1)
    assert r["total"] == pytest.approx(evaluate.cumulative_regret([0.2, 0.4], 0.5))


def test_bins_and_baseline():
    assert r1_analysis.auto_bins([2, 2, 3, 5], 1) == [2, 3, 5]
    assert r1_analysis.auto_bins([1, 2, 3], 5) == [1, 6, 11]
    assert r1_analysis.auto_bins(range(1, 21), 3) == [1, 16, 31, 46]  # 20 group counts: 4 ranges of 5
    assert r1_analysis.bin_labels([1, 6, 11]) == ["1-5", "6-10", "11+"]
    assert r1_analysis.bin_labels([2, 3, 5]) == ["2", "3-4", "5+"]
    assert [r1_analysis.assign_bin(e, [2, 3, 5]) for e in (1, 2, 3, 4, 5, 99)] == [None, 0, 1, 1, 2, 2]
    d = r1_analysis.direct_curve([0, 2, 4], [10, 20, 30], 4, [1, 2, 4])
    assert d["tokens"] == pytest.approx([20, 40, 80])
    assert d["pass"] == pytest.approx([(0 + 0.5 + 1) / 3, (0 + evaluate.pass_at_k(4, 2, 2) + 1) / 3, 2 / 3])


# --------------------------------------------------------------------------------------
# A tiny real run on the toy
# --------------------------------------------------------------------------------------


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_real_toy_run(toy_paths, toy_sampler, tmp_path):
    out = tmp_path / "r1"
    # the toy preset with every path given: no toy build is looked up (MRT_TOY_DIR is used as it is)
    args = Args(preset="toy", generate=True, model=toy_paths["base"], direct_model=toy_paths["base"],
                data=toy_paths["test"], problems=3, k=2, rounds=3, p=4, maj=[1, 2, 4], direct_n=4, direct_k=[1, 2, 4],
                out=str(out), seed=1)
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        report = r1_analysis.main(args)
    for name in ("summary.json", "table.md", "accuracy_tokens.png", "episodes_hist.png", "traces.jsonl",
                 "direct.jsonl", "generated_traces.jsonl", "metrics.jsonl"):
        assert (out / name).is_file(), name
    for png in ("accuracy_tokens.png", "episodes_hist.png"):
        assert open(out / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(out / "summary.json"))["analysis"] == json.loads(json.dumps(report["analysis"]))
    s = report["settings"]
    assert s["toy_preset"] and s["delimiter"] == "\n" and s["mu_suffix"] == utils.MU_SUFFIX and s["group_size"] == 1

    gen = read_jsonl(out / "generated_traces.jsonl")
    assert len(gen) == 3 * 2 and all(1 <= g["rounds"] <= 3 for g in gen)
    for g in gen:  # a stream of r rounds joins them with r - 1 cues (the model may write more itself)
        assert g["trace"].count(evaluate.CONTINUE_CUE) >= g["rounds"] - 1
    traces = read_jsonl(out / "traces.jsonl")
    a = report["analysis"]
    assert len(traces) == 6 and sum(a["histogram"].values()) == 6
    assert sum(b["traces"] for b in a["bins"].values()) + a["unbinned"] == 6
    tok = toy_sampler.tokenizer
    for t, g in zip(traces, gen):
        assert 1 <= t["episodes"] <= g["trace"].count("\nWait") + 1
        assert t["groups"] == t["episodes"] == len(t["points"])
        eps = split_episodes(g["trace"], delimiter="\n")
        assert len(eps) == t["episodes"]
        prefix = [q["prefix_tokens"] for q in t["points"]]
        assert prefix == sorted(prefix) and len(set(prefix)) == len(prefix)  # tokens grow with j
        assert prefix[-1] == len(tok("\n".join(eps), add_special_tokens=False)["input_ids"])
        ctx = [q["context_tokens"] for q in t["points"]]
        assert ctx == sorted(ctx)
        for q in t["points"]:
            assert len(q["answers"]) == 4 and q["answer_tokens"] >= 1
            assert all(0.0 <= v <= 1.0 for v in q["maj"].values())
            graded = [0.0 if x is None else utils.grade("\\boxed{" + x + "}", t["answer"]) for x in q["answers"]]
            assert q["maj"]["1"] == sum(graded) / 4  # [maj@1]_j is the mean grade, exactly
            for p in (2, 4):
                assert q["maj"][str(p)] == evaluate.maj_at_k(q["answers"], t["answer"], p)
        # regret by hand from the logged J values: J* the best [maj@p]_j of the trace, then the
        # partial sums of J* - [maj@1]_j
        star = max(v for q in t["points"] for v in q["maj"].values())
        running = list(itertools.accumulate(star - q["maj"]["1"] for q in t["points"]))
        assert t["regret"]["j_star"] == star and t["regret"]["running"] == pytest.approx(running, abs=1e-12)
        assert t["regret"]["total"] == pytest.approx(running[-1], abs=1e-12)
    for label, b in a["bins"].items():
        c = b["curve"]
        for p in ("1", "2", "4"):
            assert all(0.0 <= v <= 1.0 for v in c["maj"][p])
            assert c["tokens"][p] == sorted(c["tokens"][p]) or min(c["n"]) < max(c["n"])
        assert all(x1 < x2 < x4 for x1, x2, x4 in zip(c["tokens"]["1"], c["tokens"]["2"], c["tokens"]["4"]))
        assert b["regret"]["j_star"] == max(max(v) for v in c["maj"].values())
        bin_running = list(itertools.accumulate(b["regret"]["j_star"] - v for v in c["maj"]["1"]))
        assert b["regret"]["running"] == pytest.approx(bin_running, abs=1e-12) and len(bin_running) == len(c["j"])
        d = b["direct"]
        assert d["k"] == [1, 2, 4] and d["pass"] == sorted(d["pass"]) and all(0 <= v <= 1 for v in d["pass"])
        assert f"## {label} episodes" in (out / "table.md").read_text()
    direct = read_jsonl(out / "direct.jsonl")
    assert len(direct) == 3 * 4  # three distinct problems, four samples each
    assert a["overall"]["direct"]["pass"][0] == pytest.approx(sum(r["correct"] for r in direct) / 12)

    # the generated traces read back with --traces: same episodes, same prefixes
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        again = r1_analysis.main(Args(traces=str(out / "generated_traces.jsonl"), model=toy_paths["base"],
                                      preset="toy", direct_model="none", p=4, maj=[1, 2, 4],
                                      out=str(tmp_path / "again"), seed=1))
    back = read_jsonl(tmp_path / "again" / "traces.jsonl")
    assert [t["episodes"] for t in back] == [t["episodes"] for t in traces]
    assert [[q["prefix_tokens"] for q in t["points"]] for t in back] == [[q["prefix_tokens"] for q in t["points"]]
                                                                       for t in traces]
    assert "direct" not in again["analysis"]["overall"]


def test_torchrun_splits_problems_and_merges(toy_paths, tmp_path):
    """2 ranks: each samples and scores its share on its own engine; rank 0 writes one merged output."""
    out = tmp_path / "r1x2"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "r1_analysis.py", "--preset", "toy", "--generate", "--model", toy_paths["base"],
                        "--direct-model", toy_paths["base"], "--data", toy_paths["test"], "--problems", "3", "--k", "2", "--rounds", "2",
                        "--p", "2", "--maj", "1", "2", "--direct-n", "2", "--direct-k", "1", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    problems = [json.loads(line)["problem"] for line in open(toy_paths["test"])][:3]
    gen = read_jsonl(out / "generated_traces.jsonl")
    assert sorted(g["id"] for g in gen) == [f"{i}-{s}" for i in range(3) for s in range(2)]
    assert [g["problem"] for g in gen] == [problems[i] for i in (0, 0, 2, 2, 1, 1)]  # rank 0: 0, 2; rank 1: 1
    assert len(read_jsonl(out / "traces.jsonl")) == 6
    direct = read_jsonl(out / "direct.jsonl")
    assert sorted(r["problem"] for r in direct) == [0, 0, 1, 1, 2, 2]  # merged: indices of the distinct problems
    summary = json.load(open(out / "summary.json"))
    assert summary["analysis"]["overall"]["traces"] == 6 and sum(summary["analysis"]["histogram"].values()) == 6


def test_too_long_trace_fails_before_any_output(toy_paths, toy_sampler, tmp_path):
    data = tmp_path / "t.jsonl"
    long = "\n".join(f"Step {i}: 1 + 1 = 2" for i in range(1, 400))
    data.write_text(json.dumps({"problem": "Start with 1. Add 1. What is the result?", "answer": "2",
                                "trace": long}) + "\n")
    args = Args(traces=str(data), model=toy_paths["base"], preset="toy", direct_model="none", out=str(tmp_path / "o"))
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        with pytest.raises(utils.UserError, match=r"t.jsonl:1: too long for the meta-prover"):
            r1_analysis.main(args)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------

GOOD = json.dumps({"problem": "Start with 2. Add 3. What is the result?", "answer": "5",
                   "trace": "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}"})
BAD_INPUTS = {  # case: (trace lines, extra flags, expected part of the message)
    "missing_file": (None, [], "no such file"),
    "malformed": ([GOOD, "{not json"], [], ":2: malformed JSON"),
    "missing_field": ([GOOD, json.dumps({"problem": "x", "answer": "1"})], [], ":2: missing field 'trace'"),
    "renamed_field": ([GOOD], ["--trace-field", "output"], ":1: missing field 'output'"),
    "empty_thinking": ([GOOD, json.dumps({"problem": "x", "answer": "1", "trace": "<think>\n\n</think> 1"})], [],
                       ":2: no thinking text"),
    "bad_model": ([GOOD], [], "model path does not exist"),
    "bad_maj": ([GOOD], ["--maj", "1", "16"], "--maj"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_exit_2(case, toy_paths, tmp_path, run_script):
    lines, flags, message = BAD_INPUTS[case]
    data = tmp_path / "traces.jsonl"
    if lines:
        data.write_text("\n".join(lines) + "\n")
    model = str(tmp_path / "no-model") if case == "bad_model" else toy_paths["base"]
    out = tmp_path / "out"
    code, err = run_script("r1_analysis", ["--traces", str(data), "--model", model, "--preset", "toy",
                                           "--direct-model", "none", "--out", str(out), *flags],
                           own_process=case == "malformed")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
