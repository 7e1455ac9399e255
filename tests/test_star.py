"""Tests of star.py: the MRT filter on hand-made rollouts, continuation parsing, the presets,
a real MRT-B STaR run on the toy model (kept examples, z0 from the base, SFT loss, outputs,
weights in the engine) with short STaR and RISE runs, and bad input."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sampling  # noqa: E402
import star  # noqa: E402
import utils  # noqa: E402
from infogain import backtrack_cue, split_backtrack  # noqa: E402

MARK = utils.BACKTRACK_MARKER
# Problem: Start with 17. Add 25. Multiply by 3. Subtract 48. (answer 78); z0 slips at step 2
Z0 = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 127\nStep 3: 127 - 48 = 79\nThe answer is \\boxed{79}"
GOOD = " 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"
BAD = " 3: 127 - 48 = 80\nThe answer is \\boxed{80}"


# --------------------------------------------------------------------------------------
# The filter on hand-made (r0, rewards, correct) tables
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("r0, rewards, correct, want", [
    (0.25, [0.5, 0.75, 0.375], [True, True, True], 1),            # the argmax, correct, beats r0
    (0.0, [0.125, 0.0, 0.5, 0.25], [True, True, True, True], 2),
    (0.5, [0.5, 0.25, 0.0], [True, True, True], None),            # correct, none beats r0 (strict)
    (0.0, [0.75, 1.0], [False, False], None),                     # beat r0, all wrong
    (0.0, [1.0, 0.25, 0.5, 0.125], [False, True, True, True], 2),  # wrong argmax: the best correct one
    (0.25, [1.0, 0.125, 0.375, 0.5], [False, True, False, True], 3),
    (0.25, [0.875, 0.25, 0.125], [False, True, True], None),      # correct ones do not beat r0
    (0.0, [0.5, 0.5, 0.25], [True, True, True], 0),               # ties: the first
    (0.0, [0.25, 0.5, 0.5], [True, True, True], 1),
    (-0.5, [0.0], [True], 0),                                     # a single candidate
    (0.0, [], [], None),
])
def test_select_continuation_hand_made(r0, rewards, correct, want):
    assert star.select_continuation(r0, rewards, correct) == want


@pytest.mark.parametrize("r0, rewards, correct, min_gain, want", [
    (0.5, [0.5, 0.25, 0.0], [True, True, True], None, None),     # Alg. 1 (default): gain > 0, a tie is out
    (0.5, [0.5, 0.25, 0.0], [True, True, True], 0.0, 0),         # Fig. 4's reading: gain >= 0 keeps the tie
    (0.25, [0.25, 0.5], [True, False], 0.0, 0),
    (0.25, [0.375, 0.75, 0.5], [True, True, True], 0.5, 1),      # a higher bar: gain >= 0.5
    (0.25, [0.5, 0.625], [True, True], 0.5, None),
    (0.5, [0.25, 0.0], [True, True], -0.25, 0),                  # a negative bar admits a loss
    (0.0, [1.0], [False], -1.0, None),                           # never an incorrect continuation
])
def test_select_continuation_min_gain(r0, rewards, correct, min_gain, want):
    assert star.select_continuation(r0, rewards, correct, min_gain) == want


def test_select_continuation_checks_lengths_and_first_correct():
    with pytest.raises(ValueError):
        star.select_continuation(0.0, [0.5, 0.5], [True])
    assert star.select_first_correct([False, True, True]) == 1
    assert star.select_first_correct([False, False]) is None


def test_parse_continuation_grades_z2_only():
    ok = star.parse_continuation("mrt", Z0, GOOD, "stop", "78")
    ep = ok["episodes"]
    assert ok["correct"] and ep.z0 == Z0 and ep.restart_step == 2 and ok["completion"] == backtrack_cue(Z0) + GOOD
    assert ep.z1 == "\n" + MARK + "\nStep 2: 42 * 3 = 126" and ep.z0 + ep.z1 + ep.z2 == ok["completion"]
    assert not star.parse_continuation("mrt", Z0, GOOD, "length", "78")["correct"]  # cut at the token limit
    assert not star.parse_continuation("mrt", Z0, BAD, "stop", "78")["correct"]
    # z0's box is never credited: a correct z0 and a wrong z2 is wrong
    z0_right = Z0.replace("127", "126").replace("79", "78")
    assert not star.parse_continuation("mrt", z0_right, BAD, "stop", "78")["correct"]
    assert star.parse_continuation("mrt", z0_right, BAD, "stop", "80")["correct"]
    bad = star.parse_continuation("mrt", Z0, " two: start over", "stop", "78")
    assert bad["episodes"] is None and not bad["correct"]
    # a marker inside a line of z0: split where the cue was appended (infogain.split_continuation)
    z0_marked = Z0.replace("= 42\n", "= 42 " + MARK + "\n")
    assert split_backtrack(backtrack_cue(z0_marked) + GOOD).z0 != z0_marked
    marked = star.parse_continuation("mrt", z0_marked, GOOD, "stop", "78")
    assert marked["episodes"].z0 == z0_marked and marked["episodes"].restart_step == 2 and marked["correct"]
    # the restart line with nothing after it, or with the box and only a line break, is not a trace
    assert star.parse_continuation("mrt", Z0, " 2: 42 * 3 = 126 so \\boxed{78}", "stop", "78")["episodes"] is None
    assert star.parse_continuation("mrt", Z0, " 2: 42 * 3 = 126, 126 - 48 = 78, \\boxed{78}\n", "stop",
                                   "78")["episodes"] is None
    # rise: the restart at step 1 is forced by the cue
    rise = star.parse_continuation("rise", Z0, " 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\n"
                                               "The answer is \\boxed{78}", "stop", "78")
    assert rise["correct"] and rise["episodes"].restart_step == 1 and star.continuation_cue("rise", Z0).endswith("Step 1:")


def test_iteration_stats_keep_rates_of_both_readings_and_the_unparsed_share():
    def sample(r, gain, correct, parsed=True):
        return {"r": r, "gain": gain, "correct": correct, "parsed": parsed}

    records = [  # r0, samples: a tie only; a positive gain; a positive gain but wrong
        {"r0": 0.5, "kept": None, "example": None,
         "samples": [sample(0.5, 0.0, True), sample(0.0, -0.5, False, parsed=False)]},
        {"r0": 0.25, "kept": 0, "example": {"restart_step": 2},
         "samples": [sample(0.75, 0.5, True), sample(0.25, 0.0, True)]},
        {"r0": 0.0, "kept": None, "example": None,
         "samples": [sample(0.5, 0.5, False), sample(0.0, 0.0, False, parsed=False)]}]
    st = utils.iteration_stats(records, "mrt", star.select_continuation)
    assert st["kept_fraction"] == round(1 / 3, 4) and st["kept_fraction_gain_pos"] == round(1 / 3, 4)
    assert st["kept_fraction_gain_nonneg"] == round(2 / 3, 4)  # the tie counts under Fig. 4's reading
    assert st["unparsed_fraction"] == round(2 / 6, 4) and st["parsed_fraction"] == round(4 / 6, 4)


class FixedSampler:
    """Stands in for the engine where a test needs samples cut at the token limit on demand:
    every prompt gets `texts` with their finish reasons, in order."""

    def __init__(self, tokenizer, samples: list):
        self.tokenizer, self.samples = tokenizer, samples

    def generate(self, prompts, n=1, **kw):
        assert n == len(self.samples)
        return [[sampling.Sample(t, [1], 1, reason, None, len(p)) for t, reason in self.samples] for p in prompts]


def test_heldout_accuracy_grades_a_cut_sample_zero(toy_paths):
    tok = utils.load_tokenizer(toy_paths["base"])
    problems = [{"id": 0, "prompt": utils.build_prompt(tok, "Start with 17. Add 25. Multiply by 3. Subtract 48. "
                                                             "What is the result?"), "answer": "78"}]
    right = Z0.replace("127", "126").replace("79", "78")
    for method, text in (("mrt", GOOD), ("star", right)):
        args = star.resolve_args(star.Args(method=method, eval_samples=2))
        fake = FixedSampler(tok, [(text, "stop"), (text, "length")])
        assert star.heldout_accuracy(fake, problems, {0: Z0}, args, seed=0) == 0.5, method


def test_presets_and_bad_arguments():
    toy = star.resolve_args(star.Args())
    assert toy.preset == "toy" and toy.iterations >= 2 and toy.group_size >= 2
    paper = star.resolve_args(star.Args(model="org/model"), world=8)
    assert (paper.preset, paper.lr, paper.epochs, paper.batch_size, paper.max_length, paper.warmup_ratio,
            paper.dtype) == ("paper", 1e-6, 3, 256, 4096, 0.1, "auto")
    with pytest.raises(utils.UserError, match="method"):
        star.resolve_args(star.Args(method="ppo"))
    with pytest.raises(utils.UserError, match="batch-size"):
        star.resolve_args(star.Args(batch_size=12, micro_batch_size=8))
    with pytest.raises(utils.UserError, match="group-size"):
        star.resolve_args(star.Args(group_size=0))
    with pytest.raises(utils.UserError, match="min-gain"):
        star.resolve_args(star.Args(min_gain=1.5))
    with pytest.raises(utils.UserError, match="min-gain"):
        star.resolve_args(star.Args(method="rise", min_gain=0.0))


# --------------------------------------------------------------------------------------
# A run through star.main with scripted samples: exact kept indices, SFT, outputs
# --------------------------------------------------------------------------------------

OPS = {word: op for op, word in __import__("toy").OP_WORDS.items()}


def solve(problem: str, slip_at: int = 0):
    """Step lines and final value of a toy problem; slip_at = k makes step k's result one too high."""
    import re

    import toy

    value = int(re.search(r"Start with (\d+)\.", problem).group(1))
    lines = []
    for i, (word, arg) in enumerate(re.findall(r"(Add|Subtract|Multiply by) (\d+)\.", problem), 1):
        result = toy.apply_op(value, OPS[word], int(arg)) + (i == slip_at)
        lines.append(f"Step {i}: {value} {OPS[word]} {arg} = {result}")
        value = result
    return lines, value


class ScriptedSampler:
    """Stands in for the engine with known outcomes; SFT, grading and the files are real.

    z0 (a plain prompt): the solution with a slip at step 2 (wrong). Continuations (the cue):
    sample i restarts as in PLAN ((restart step, wrong?) per sample). mu (the forced suffix):
    the gold answer for a fraction J of its n answers, J = R0 after z0 and, after z1, the rate
    of the restart line in RATES (a problem whose start value is divisible by 3 uses HARD).
    Expected MRT filter: sample 2 (sample 0 has the top J but a wrong z2, sample 1 ties r0),
    nothing for the HARD problems; the first-correct filter (rise): sample 1."""

    R0 = 0.25
    PLAN = [(2, True), (1, False), (2, False), (3, False)]
    RATES = [1.0, 0.25, 0.75, 0.5]
    HARD = [1.0, 0.25, 0.25, 0.0]

    def __init__(self, tokenizer, cut=()):
        self.tokenizer, self.backend, self.events, self.rates, self.synced = tokenizer, "scripted", [], {}, None
        self.cut = set(cut)  # problems whose every attempt z0 is cut at the token limit

    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None,
                 logprobs=True, use_tqdm=False):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            problem = text.split("Problem: ", 1)[1].split("\nSolution:\n", 1)[0]
            rest = text.split("\nSolution:\n", 1)[1]
            if rest.endswith(utils.MU_SUFFIX):
                self.events.append("mu")
                line = rest[: -len(utils.MU_SUFFIX)].split("\n")[-1]
                rate = self.rates[(problem, line)] if MARK in rest else self.R0
                k = round(rate * n)
                texts = [f"{solve(problem)[1]}}}"] * k + ["999}"] * (n - k)
            elif rest.endswith(("\nStep", "\nStep 1:")):
                self.events.append("cont")
                texts = [self.continuation(problem, rest.endswith(" 1:"), i % 4) for i in range(n)]
            else:
                self.events.append("z0")
                assert stop == ["\n" + MARK]
                texts = [self.z0(problem)] * n
            reason = "length" if self.events[-1] == "z0" and problem in self.cut else "stop"
            out.append([sampling.Sample(t, [1], 1, reason, None, len(ids)) for t in texts])
        return out

    @staticmethod
    def z0(problem):
        lines, final = solve(problem, slip_at=2)
        return "\n".join(lines) + f"\nThe answer is \\boxed{{{final}}}"

    def continuation(self, problem, rise, i):
        step, wrong = self.PLAN[i]
        step = 1 if rise else step
        lines, final = solve(problem, slip_at=step if wrong else 0)
        rates = self.HARD if int(solve(problem)[0][0].split()[2]) % 3 == 0 else self.RATES
        self.rates.setdefault((problem, lines[step - 1]), rates[i])
        text = "\n".join(lines[step - 1:]) + f"\nThe answer is \\boxed{{{final}}}"
        return text[len("Step 1:"):] if rise else text[len("Step"):]

    def sync_weights(self, model):
        self.events.append("sync")
        self.synced = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _args(toy_paths, out, **kw):
    base = dict(model=toy_paths["base"], data=toy_paths["train"], test_data=toy_paths["test"], out=str(out), preset="toy",
                iterations=2, problems=12, group_size=4, mu_samples=4, max_tokens=128, sample_batch=8, eval_problems=4,
                eval_samples=2, lr=1e-3, epochs=4, batch_size=4, micro_batch_size=4)
    base.update(kw)
    return star.Args(**base)


def _main(args: star.Args, engine) -> dict:
    """star.main with `engine` as the ready engine of its base model (sampling.ready_engines)."""
    with sampling.ready_engines({args.base or args.model: engine}):
        return star.main(args)


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_scripted_mrt_run_keeps_exactly_the_filtered_continuations(toy_paths, tmp_path):
    from safetensors.torch import load_file

    tok = utils.load_tokenizer(toy_paths["base"])
    fake, out = ScriptedSampler(tok), tmp_path / "mrt"
    summary = _main(_args(toy_paths, out), fake)
    train = utils.read_records(toy_paths["train"])[:12]

    kept = [_jsonl(out / f"data_iter{k}.jsonl") for k in (1, 2)]
    want = [i for i, r in enumerate(train) if int(solve(r["problem"])[0][0].split()[2]) % 3]
    assert 0 < len(want) < len(train)  # both kinds of problem are there
    for k, rows in enumerate(kept, 1):
        assert [e["id"] for e in rows] == want and all(e["iteration"] == k for e in rows)
        for e in rows:
            assert e["index"] == 2 and e["r0"] == 0.25 and e["r"] == 0.75 and e["gain"] == 0.5
            assert e["rewards"] == [1.0, 0.25, 0.75, 0.5] and e["correct"] == [False, True, True, True]
            assert e["z0"] == ScriptedSampler.z0(e["problem"]) and e["restart_step"] == 2
            ep = split_backtrack(e["completion"])
            assert (ep.z0, ep.z1, ep.z2) == (e["z0"], e["z1"], e["z2"]) and utils.grade(ep.z2, e["answer"]) == 1.0
            assert utils.grade(ep.z0, e["answer"]) == 0.0 and e["prompt"] == utils.build_prompt(tok, e["problem"])

    its = _jsonl(out / "iterations.jsonl")
    n = len(want)
    assert [(r["kept"], r["accumulated"]) for r in its] == [(n, n), (n, 2 * n)]
    # both readings of the filter: the HARD problems' best correct continuations tie r0
    assert its[0]["kept_fraction_gain_pos"] == round(n / 12, 4) and its[0]["kept_fraction_gain_nonneg"] == 1.0
    assert its[0]["unparsed_fraction"] == 0.0
    assert its[0]["kept_fraction"] == round(n / 12, 4) and its[0]["gain_kept_mean"] == 0.5
    # discarded: samples 0, 1, 3 of kept problems (+0.75, 0, +0.25), all four of the others (+0.75, 0, 0, -0.25)
    assert its[0]["gain_discarded_mean"] == pytest.approx(((0.75 + 0 + 0.25) * n + 0.5 * (12 - n)) / (3 * n + 4 * (12 - n)),
                                                          abs=1e-4)
    assert its[0]["sample_accuracy"] == 0.75 and its[1]["accuracy_before"] == its[0]["accuracy_after"]

    # z0 came from the base: every z0 request before the first fine-tuned sync; each iteration
    # (and each held-out measurement) samples after the sync of the model fine-tuned before it
    events = [e for e in fake.events if e != "mu"]
    squeezed = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]
    assert squeezed == ["sync", "z0", "cont", "sync", "cont", "sync", "cont"]

    # SFT from the base on the accumulated set: loss falls, the engine got the saved weights
    log = _jsonl(out / "sft_iter2.jsonl")
    assert len(log) == its[1]["sft_steps"] == 4 * -(-2 * n // 4)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], [round(r["loss"], 3) for r in log]
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch_equal(saved[k], fake.synced[k]) for k in saved)
    card = json.load(open(out / "model" / "mrt.json"))
    assert (card["format"], card["method"], card["iteration"], card["examples"]) == ("backtrack", "mrt", 2, 2 * n)
    assert summary["examples"] == 2 * n and json.load(open(out / "summary.json"))["accuracy"] == summary["accuracy"]
    z0 = _jsonl(out / "z0.jsonl")
    assert len(z0) == 12 + 4 and all(r["z0"] == ScriptedSampler.z0(r["problem"]) for r in z0)
    assert not list(out.glob(".sft_iter*")) and not list(out.glob(".tmp-*"))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_scripted_min_gain_zero_keeps_ties_and_cut_z0_are_dropped(toy_paths, tmp_path):
    """--min-gain 0 (Fig. 4's reading, gain >= 0): the HARD problems keep their first correct
    continuation that ties r0 (sample 1). A z0 cut at the token limit in every try drops its
    problem (train and held-out), counted in summary.json and stored in z0.jsonl."""
    tok = utils.load_tokenizer(toy_paths["base"])
    train = utils.read_records(toy_paths["train"])[:12]
    test = utils.read_records(toy_paths["test"])[:4]
    fake, out = ScriptedSampler(tok, cut=[train[0]["problem"], test[0]["problem"]]), tmp_path / "mrt0"
    summary = _main(_args(toy_paths, out, iterations=1, epochs=1, min_gain=0.0), fake)
    assert summary["z0_dropped"] == {"train": 1, "test": 1}
    assert fake.events.count("z0") == 12 + 4 + 2 * (sampling.Z0_TRIES - 1)  # one try each, the cut ones' retries
    kept = _jsonl(out / "data_iter1.jsonl")
    assert [e["id"] for e in kept] == list(range(1, 12))
    hard = [e for e in kept if int(solve(e["problem"])[0][0].split()[2]) % 3 == 0]
    assert hard and all(e["index"] == 1 and e["gain"] == 0.0 for e in hard)
    (it,) = _jsonl(out / "iterations.jsonl")
    assert it["problems"] == 11 and it["kept_fraction"] == it["kept_fraction_gain_nonneg"] == 1.0
    z0 = _jsonl(out / "z0.jsonl")
    assert [(r["split"], r["id"]) for r in z0 if r["dropped"]] == [("train", 0), ("test", 0)] and len(z0) == 16


class MalformedLast(ScriptedSampler):
    """ScriptedSampler whose 4th continuation names no restart step (" three: ..."); mu reads an
    answer it sees in an unknown context as right (rate 1), as a real mu copies a visible box."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.rates = __import__("collections").defaultdict(lambda: 1.0)

    def continuation(self, problem, rise, i):
        text = super().continuation(problem, rise, i)
        return " three" + text[text.index(":"):] if i == 3 else text


def test_unparsed_continuation_has_j_zero_and_mu_is_not_asked(toy_paths):
    """No backtrack episode: J after the continuation counts as 0, so r = 0 and its logged gain
    is -r0 (infogain.backtrack_gain); mu is asked only r0 and the parsed continuations."""
    tok = utils.load_tokenizer(toy_paths["base"])
    fake = MalformedLast(tok)
    args = star.resolve_args(_args(toy_paths, "unused"))
    problems = utils.load_problems(toy_paths["train"], limit=3, tokenizer=tok)
    z0s = {p["id"]: ScriptedSampler.z0(p["problem"]) for p in problems}
    records = star.rollout_chunk(fake, sampling.MetaProver(fake, m=4), problems, z0s, args, seed=0)
    assert fake.events.count("mu") == 3 + 3 * 3  # r0 per problem, then the three parsed continuations each
    for r in records:
        last = r["samples"][3]
        assert (last["parsed"], last["correct"], last["r"], last["gain"]) == (False, False, 0.0, -0.25)
        assert r["samples"][2]["r"] in (0.75, 0.25)  # the parsed ones keep their J


def test_scripted_rise_run_keeps_the_first_correct_restart_from_step_1(toy_paths, tmp_path):
    fake, out = ScriptedSampler(utils.load_tokenizer(toy_paths["base"])), tmp_path / "rise"
    _main(_args(toy_paths, out, method="rise", iterations=1, epochs=1), fake)
    kept = _jsonl(out / "data_iter1.jsonl")
    assert [e["index"] for e in kept] == [1] * 12  # every problem, its first correct sample
    for e in kept:
        assert e["restart_step"] == 1 and e["z1"].endswith(solve(e["problem"])[0][0])
        assert utils.grade(e["z2"], e["answer"]) == 1.0 and e["completion"].startswith(backtrack_cue(e["z0"]) + " 1:")
    assert json.load(open(out / "model" / "mrt.json"))["format"] == "backtrack"


# --------------------------------------------------------------------------------------
# Real runs on the toy model (real sampling, real meta-prover, real SFT)
# --------------------------------------------------------------------------------------


@pytest.fixture
def engine(toy_sampler, toy_paths):
    """The session engine; the base weights go back into it after the test."""
    yield toy_sampler
    toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))


def test_real_mrt_run_on_the_toy_base(engine, toy_paths, tmp_path, monkeypatch):
    """MRT on the real engine: z0 are the base's own attempts (resampled with the same seed),
    r0 and r_i are J estimates, and the filter holds on every problem's sampled continuations
    (read from the real rollout_chunk's records as the run made them), kept or not. (The toy
    base was never trained on texts as long as z0 + z1 + z2, so it keeps little or nothing.)"""
    out = tmp_path / "mrt"
    args = _args(toy_paths, out, iterations=1, problems=16, group_size=2, mu_samples=4, max_tokens=96, eval_problems=8)
    chunks, rollout_chunk = [], star.rollout_chunk

    def recorded(*a, **kw):  # the real function; its records are also kept here
        chunks.append(rollout_chunk(*a, **kw))
        return chunks[-1]

    monkeypatch.setattr(star, "rollout_chunk", recorded)
    summary = _main(args, engine)
    z0 = {(r["split"], r["id"]): r["z0"] for r in _jsonl(out / "z0.jsonl")}
    resolved = star.resolve_args(args)
    train = utils.load_problems(toy_paths["train"], limit=resolved.problems, tokenizer=engine.tokenizer)
    engine.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))
    again, lost = sampling.sample_z0(engine, train, temperature=resolved.temperature, top_p=resolved.top_p,
                                     max_tokens=resolved.max_tokens, seed_parts=(resolved.seed, "z0", "train"))
    assert {**again, **lost} == {i: z for (s, i), z in z0.items() if s == "train"} and len(again) + len(lost) == 16
    assert sum(utils.grade(again[r["id"]], r["answer"]) for r in train if r["id"] in again) > 0  # real attempts, some right
    (it,) = _jsonl(out / "iterations.jsonl")
    records = sorted((r for c in chunks for r in c), key=lambda r: r["id"])
    n = len(again)  # problems with a usable z0 (the others dropped: sampling.sample_z0)
    assert len(records) == n and all(len(r["samples"]) == 2 for r in records)
    samples = [s for r in records for s in r["samples"]]
    assert it["samples"] == 2 * n and it["parsed_fraction"] > 0.5
    assert it["parsed_fraction"] == pytest.approx(sum(s["parsed"] for s in samples) / (2 * n), abs=1e-4)
    assert it["r0_mean"] == pytest.approx(sum(r["r0"] for r in records) / n, abs=1e-4)
    assert it["r_mean"] == pytest.approx(sum(s["r"] for s in samples) / (2 * n), abs=1e-4)
    mu_m = args.mu_samples  # each J is a share of mu's m answers
    assert all(round(x * mu_m) == x * mu_m for x in [r["r0"] for r in records] + [s["r"] for s in samples])
    for r in records:  # the filter (Alg. 1) on each problem's continuations, kept or not, by hand:
        # the highest r_i (the first on ties) among the correct ones with r_i > r0, else none
        rewards, correct = [s["r"] for s in r["samples"]], [s["correct"] for s in r["samples"]]
        qualify = [i for i, (x, ok) in enumerate(zip(rewards, correct)) if ok and x > r["r0"]]
        assert r["kept"] == (max(qualify, key=lambda i: (rewards[i], -i)) if qualify else None), r
        for s in r["samples"]:
            assert s["gain"] == pytest.approx(s["r"] - r["r0"])
            assert not s["correct"] or s["parsed"], s  # only a parsed continuation can be right
    kept = _jsonl(out / "data_iter1.jsonl")
    assert it["kept"] == len(kept) == sum(r["kept"] is not None for r in records)
    by_id = {r["id"]: r for r in records}
    for e in kept:
        r = by_id[e["id"]]
        assert e["index"] == r["kept"] and e["r0"] == r["r0"] and e["rewards"] == [s["r"] for s in r["samples"]]
        assert e["r"] > e["r0"] and e["index"] == star.select_continuation(e["r0"], e["rewards"], e["correct"])
        assert e["z0"] == z0[("train", e["id"])] and utils.grade(split_backtrack(e["completion"]).z2, e["answer"]) == 1.0
    assert summary["accuracy"][0] is not None and (out / "summary.json").exists()


def test_real_star_baseline_run(engine, toy_paths, tmp_path):
    """Plain STaR on the real engine: correct direct attempts kept, SFT loss falls, the
    engine samples the second iteration from the fine-tuned model."""
    out = tmp_path / "star"
    summary = _main(_args(toy_paths, out, method="star", problems=24, group_size=2, max_tokens=96,
                          eval_problems=8, epochs=3), engine)
    kept = _jsonl(out / "data_iter1.jsonl") + _jsonl(out / "data_iter2.jsonl")
    assert len(kept) >= 4 and summary["examples"] == len(kept)
    for e in kept:
        assert utils.grade(e["completion"], e["answer"]) == 1.0 and MARK not in e["completion"]
        assert e["index"] == star.select_first_correct(e["correct"]) and "z0" not in e
    log = _jsonl(out / "sft_iter2.jsonl")
    epoch_loss = [sum(r["loss"] for r in log if r["epoch"] == e) / sum(r["epoch"] == e for r in log) for e in (0, 2)]
    print("star baseline SFT loss by epoch (first, last):", epoch_loss)
    assert epoch_loss[1] < epoch_loss[0], [(r["epoch"], round(r["loss"], 3)) for r in log]
    # the engine holds the saved model at the end
    prompts = [utils.build_prompt(engine.tokenizer, r["problem"]) for r in utils.read_records(toy_paths["test"])[:4]]
    greedy = lambda: [g[0].text for g in engine.generate(prompts, temperature=0.0, max_tokens=48, logprobs=False)]  # noqa: E731
    held = greedy()
    engine.sync_weights(utils.load_model(str(out / "model"), "auto", "cpu"))
    assert greedy() == held
    assert json.load(open(out / "model" / "mrt.json"))["format"] == "direct" and not (out / "z0.jsonl").exists()
    its = _jsonl(out / "iterations.jsonl")
    assert len(its) == 2 and its[0]["kept"] == len(_jsonl(out / "data_iter1.jsonl")) and "gain_kept_mean" not in its[0]


@pytest.mark.parametrize("case", ["missing_file", "malformed", "missing_model"])
def test_bad_input_one_line_exit_2(case, toy_paths, tmp_path, run_script):
    data = tmp_path / "data.jsonl"
    if case == "malformed":
        data.write_text(json.dumps({"problem": "Start with 2. Add 3. What is the result?", "answer": "5"}) + "\n{oops\n")
    model = str(tmp_path / "nope") if case == "missing_model" else toy_paths["base"]
    if case == "missing_model":
        data = toy_paths["train"]
    code, err = run_script("star", ["--model", model, "--data", str(data), "--test-data", toy_paths["test"],
                                    "--out", str(tmp_path / "out")], own_process=case == "malformed")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert {"missing_file": "no such file", "malformed": ":2:", "missing_model": "does not exist"}[case] in err[0]
    assert not (tmp_path / "out").exists()
