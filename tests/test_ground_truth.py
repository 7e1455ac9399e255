"""toy.py's ground truth of attempts and restarts, on hand-made traces (no model)."""

import os
import random

import pytest

import sampling
import toy

PROBLEM = "Start with 17. Add 25. Multiply by 3. Subtract 48. What is the result?"
RIGHT = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"


def test_parse_problem():
    assert toy.parse_problem(PROBLEM) == (17, [("+", 25), ("*", 3), ("-", 48)])
    assert toy.parse_problem("Problem: " + PROBLEM + "\nSolution:\n") == (17, [("+", 25), ("*", 3), ("-", 48)])
    assert toy.parse_problem("What is 2 + 2?") is None
    rng = random.Random(3)
    for _ in range(50):  # round trip through make_problem's text
        p = toy.make_problem(rng)
        assert toy.parse_problem(p["problem"]) == (p["start"], [tuple(o) for o in p["ops"]])


@pytest.mark.parametrize("attempt, expected", [
    (RIGHT, None),
    ("Step 1: 17 + 25 = 43\nStep 2: 43 * 3 = 129\nStep 3: 129 - 48 = 81\nThe answer is \\boxed{81}", 1),
    # step 2's result slips; step 3 follows from it (consistent, but the chain is wrong from 2)
    ("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 136\nStep 3: 136 - 48 = 88\nThe answer is \\boxed{88}", 2),
    # operand of step 3 does not follow from the line above (right value, though: still right)
    ("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 127 - 48 = 79\nThe answer is \\boxed{79}", 3),
    # wrong operation copied
    ("Step 1: 17 + 25 = 42\nStep 2: 42 * 4 = 168\nStep 3: 168 - 48 = 120\nThe answer is \\boxed{120}", 2),
    # step numbers out of order
    ("Step 1: 17 + 25 = 42\nStep 3: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}", 2),
    # truncated: the first missing step is the wrong one
    ("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126", 3),
    ("", 1),
    # garbled line
    ("Step 1: 17 + 25 = 42\nStep 2: 42 times 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}", 2),
    # every step right, wrong or missing box, or an extra step: the answer line (len(ops) + 1)
    ("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{77}", 4),
    ("Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is 78", 4),
    (RIGHT.replace("\nThe answer", "\nStep 4: 78 + 1 = 79\nThe answer"), 4),
])
def test_first_wrong_step(attempt, expected):
    start, ops = toy.parse_problem(PROBLEM)
    assert toy.first_wrong_step(attempt, start, ops) == expected


def test_first_wrong_step_matches_the_slip_generator():
    """solution_steps with slips: the first slipped step is the first wrong one."""
    rng = random.Random(0)
    seen = set()
    for _ in range(300):
        p = toy.make_problem(rng)
        lines, final = toy.solution_steps(p["start"], p["ops"], rng, slip=0.3)
        clean, _ = toy.solution_steps(p["start"], p["ops"])
        slipped = [i for i, (a, b) in enumerate(zip(lines, clean), 1) if a != b]
        got = toy.first_wrong_step(toy.render_solution(lines, final), p["start"], p["ops"])
        assert got == (slipped[0] if slipped else None)
        seen.add(got)
    assert None in seen and 1 in seen and 3 in seen


def test_restart_class_and_fix():
    assert [toy.restart_class(2, k, 3) for k in (1, 2, 3)] == ["before", "at", "after"]
    assert [toy.restart_can_fix(2, k, 3) for k in (1, 2, 3)] == [True, True, False]
    assert toy.restart_class(None, 2, 3) == "z0-correct" and toy.restart_can_fix(None, 2, 3) is None
    assert toy.restart_class(2, 4, 3) == "beyond" and toy.restart_can_fix(2, 4, 3) is False
    assert toy.restart_class(2, 0, 3) == "beyond" and toy.restart_can_fix(2, 0, 3) is False
    # steps right, answer line wrong: any restart within the steps can fix it
    assert [toy.restart_can_fix(4, k, 3) for k in (1, 2, 3)] == [True, True, True]
    assert [toy.restart_class(4, k, 3) for k in (1, 3)] == ["before", "before"]


def test_restart_truth_and_precision():
    z0_wrong = RIGHT.replace("42 * 3 = 126\nStep 3: 126 - 48 = 78", "42 * 3 = 136\nStep 3: 136 - 48 = 88").replace("{78}", "{88}")
    t = toy.restart_truth(PROBLEM, z0_wrong, 1)
    assert t == {"first_wrong": 2, "class": "before", "can_fix": True}
    assert toy.restart_truth(PROBLEM, z0_wrong, 2)["class"] == "at"
    assert toy.restart_truth(PROBLEM, z0_wrong, 3) == {"first_wrong": 2, "class": "after", "can_fix": False}
    assert toy.restart_truth(PROBLEM, z0_wrong, None) == {"first_wrong": 2, "class": "none", "can_fix": False}
    assert toy.restart_truth(PROBLEM, RIGHT, 2) == {"first_wrong": None, "class": "z0-correct", "can_fix": None}
    assert toy.restart_truth("What is 2 + 2?", RIGHT, 1) is None
    items = [{"truth": toy.restart_truth(PROBLEM, z0_wrong, k), "outcome": o} for k, o in ((1, 1), (2, 1), (3, 0), (3, 0))]
    items += [{"truth": toy.restart_truth(PROBLEM, RIGHT, 1), "outcome": 1}, {"truth": None, "outcome": 1}]
    assert toy.restart_precision(items) == {"n": 4, "fixable": 0.5, "at_first_wrong": 0.25, "z2_acc_z0_wrong": 0.5}
    assert toy.restart_precision(items[4:]) == {"n": 0, "fixable": None, "at_first_wrong": None, "z2_acc_z0_wrong": None}


# --------------------------------------------------------------------------------------
# Discrimination of the information gain (infogain.auc, infogain.discrimination)
# --------------------------------------------------------------------------------------


def test_auc_hand_cases_with_ties():
    import infogain

    assert infogain.auc([1.0, 2.0], [0.0, -1.0]) == 1.0
    assert infogain.auc([0.0], [1.0]) == 0.0
    assert infogain.auc([0.5, 0.5], [0.5]) == 0.5  # all tied
    # pairs: (1 vs 0) win, (1 vs 1) tie, (0 vs 0) tie, (0 vs 1) loss: (1 + .5 + .5) / 4
    assert infogain.auc([1, 0], [0, 1]) == 0.5
    # 3 x 2 pairs: 0.25 beats -1 and ties 0.25 -> 1.5; 0 beats -1 -> 1; -1 ties -1 -> .5: 3 / 6
    assert infogain.auc([0.25, 0.0, -1.0], [-1.0, 0.25]) == 0.5
    assert infogain.auc([], [1.0]) is None and infogain.auc([1.0], []) is None


def _row(cls, can_fix, gain, z2):
    return {"restart_class": cls, "can_fix": can_fix, "backtrack_gain": gain, "z2_correct": z2}


def test_discrimination_groups_and_auc():
    import infogain

    rows = [_row("before", True, 0.5, 1.0), _row("before", True, -0.25, 0.0), _row("at", True, 0.0, 1.0),
            _row("after", False, 0.0, 0.0), _row("after", False, -0.5, 0.0), _row("beyond", False, -1.0, 0.0),
            _row("z0-correct", None, -1.0, 1.0), _row("z0-correct", None, 0.0, 1.0),
            _row(None, None, 0.75, 1.0)]  # not a toy problem: left out
    d = infogain.discrimination(rows)
    assert d["traces"] == 8 and d["fixable"] == 3 and d["unfixable"] == 3
    assert d["groups"]["before"] == {"n": 2, "gain_mean": 0.125, "positive_share": 0.5, "z2_accuracy": 0.5}
    assert d["groups"]["at"] == {"n": 1, "gain_mean": 0.0, "positive_share": 0.0, "z2_accuracy": 1.0}
    assert d["groups"]["after"] == {"n": 2, "gain_mean": -0.25, "positive_share": 0.0, "z2_accuracy": 0.0}
    assert d["groups"]["beyond"]["n"] == 1 and d["groups"]["z0-correct"]["gain_mean"] == -0.5
    # fixable gains [.5, -.25, 0] vs unfixable [0, -.5, -1]: wins 3 + 2 + 2, ties 1 (0 vs 0): 7.5 / 9
    assert d["auc"] == round(7.5 / 9, 4)
    assert infogain.discrimination([_row(None, None, 0.5, 1.0)]) is None
    # no unfixable restart: groups still reported, AUC undefined
    assert infogain.discrimination(rows[:3])["auc"] is None
    assert infogain.discrimination(rows[:3])["groups"]["after"] == {"n": 0, "gain_mean": None, "positive_share": None,
                                                                    "z2_accuracy": None}


def test_mu_mode_flags_are_checked():
    import grpo
    import infogain
    import star
    import utils

    with pytest.raises(utils.UserError, match="mu-mode"):
        grpo.resolve_args(grpo.Args(mu_mode="oracle"), 1)
    with pytest.raises(utils.UserError, match="mu-rollout-tokens"):
        grpo.resolve_args(grpo.Args(mu_rollout_tokens=0), 1)
    with pytest.raises(utils.UserError, match="mu-mode"):
        star.resolve_args(star.Args(mu_mode="oracle"))
    with pytest.raises(utils.UserError, match="mu-rollout-tokens"):
        star.resolve_args(star.Args(mu_rollout_tokens=0))
    with pytest.raises(utils.UserError, match="mu-mode"):
        infogain.main(infogain.Args(mu_mode="oracle"))
    with pytest.raises(ValueError, match="mode"):
        sampling.MetaProver(None, mode="oracle")
    mu = sampling.MetaProver(None, max_tokens=16, mode="rollout", rollout_tokens=96)
    assert mu.max_tokens == 96 and mu.suffix == ""
    assert sampling.MetaProver(None, max_tokens=16, rollout_tokens=96).max_tokens == 16


# --------------------------------------------------------------------------------------
# study.py: the "Backtracking against ground truth" section on made-up outputs
# --------------------------------------------------------------------------------------


def _disc(before, at, after, right, auc, traces=10):
    g = lambda gain, pos, n, acc: {"n": n, "gain_mean": gain, "positive_share": pos, "z2_accuracy": acc}  # noqa: E731
    return {"traces": traces, "fixable": 4, "unfixable": 3, "auc": auc,
            "groups": {"before": g(*before), "at": g(*at), "after": g(*after), "beyond": g(None, None, 0, None),
                       "z0-correct": g(*right)}}


def test_truth_section_tables_and_figures(tmp_path):
    import json

    import study

    settings = {"problems": 8, "continuations": 2, "mu_samples": 4, "mu_max_tokens": 16, "mu_rollout_tokens": 128}
    for seed, shift in ((0, 0.0), (1, 0.1)):
        d = tmp_path / f"seed{seed}" / "truth"
        for mu, auc in (("forced", 0.5), ("rollout", 0.8)):
            (d / mu).mkdir(parents=True)
            models = {"base": {"discrimination": _disc((0.25 + shift, 0.5, 2, 0.5), (0.5, 1.0, 2, 1.0), (-0.5, 0.0, 3, 0.0),
                                                       (-1.0, 0.0, 3, 1.0), auc + shift)},
                      "warmstart": {"discrimination": None}}
            (d / mu / "summary.json").write_text(json.dumps({"settings": settings, "models": models}))
        for name, fix in (("mrt-forced", 0.4), ("mrt-rollout", 0.6), ("outcome", 0.5)):
            g = d / "grpo" / name
            g.mkdir(parents=True)
            (g / "eval.json").write_text(json.dumps({"start": 0.3, "end": 0.4 + shift}))
            rows = [{"step": i + 1, "restart_fixable": fix + 0.01 * i, "restart_at_first_wrong": 0.2, "z2_acc_z0_wrong": 0.3,
                     "completion_len_mean": 50.0, "time_mu": 1.0 if name.startswith("mrt") else 0.0, "time_step": 4.0}
                    for i in range(8)]
            rows[3].pop("restart_fixable")  # a step without a wrong z0
            (g / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seed_dirs = {s: str(tmp_path / f"seed{s}") for s in (0, 1)}
    fig = tmp_path / "fig"
    fig.mkdir()
    lines = study.truth_section(seed_dirs, str(fig), lambda p: p)
    text = "\n".join(lines)
    assert "## Backtracking against ground truth" in text
    forced = next(x for x in lines if x.startswith("| base | forced |"))
    rollout = next(x for x in lines if x.startswith("| base | rollout |"))
    # gain before: mean of 0.25 and 0.35 = +0.300 ± 0.071; positive share 50%; AUC 0.5 / 0.6 -> 0.550
    assert "| +0.300 ± 0.071 / 50 ± 0 |" in forced and forced.endswith("| 0.550 ± 0.071 |")
    assert rollout.endswith("| 0.850 ± 0.071 |")
    assert "| warmstart |" not in text  # no ground truth for it: no row
    assert "| base | 2 ± 0 (50 ± 0) | 2 ± 0 (100 ± 0) | 3 ± 0 (0 ± 0) | 3 ± 0 (100 ± 0) |" in text
    # fixable, first quarter (steps 1-2) and last quarter (7-8): 0.405 and 0.465 for mrt-forced
    row = next(x for x in lines if x.startswith("| grpo-mrt-forced |"))
    assert "| 30.0 ± 0.0 | 45.0 ± 7.1 | 40.5 ± 0.0 / 46.5 ± 0.0 | 20.0 ± 0.0 / 20.0 ± 0.0 |" in row
    assert row.endswith("| 50 ± 0 | 25% ± 0% |")
    assert next(x for x in lines if x.startswith("| grpo-outcome |")).endswith("| 0% ± 0% |")
    for png in ("truth_gain_by_class.png", "truth_restart_precision.png"):
        data = (fig / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert study.truth_section({0: str(tmp_path / "none")}, str(fig), lambda p: p) == []


def test_truth_stages_inputs(tmp_path):
    import study

    seed_dir = tmp_path / "seed0"
    plan = {st.name: st for st in study.stages(str(seed_dir), 0, study.SIZES["quick"], "base")}
    assert plan["truth-forced"].after == ("warmstart",) and plan["truth-rollout"].after == ("truth-forced",)
    assert set(plan["truth-eval"].after) == {"truth-grpo-mrt-forced", "truth-grpo-mrt-rollout", "truth-grpo-outcome"}
    assert "truth-forced" not in plan["evaluate"].after
    forced = plan["truth-forced"].cmd()
    assert "base=base" in forced and not any(x.startswith("warmstart=") for x in forced)  # no warmstart model yet
    assert forced[forced.index("--mu-mode") + 1] == "forced"
    os.makedirs(seed_dir / "warmstart" / "backtrack" / "model")
    (seed_dir / "warmstart" / "backtrack" / "model" / "config.json").write_text("{}")
    assert any(x.startswith("warmstart=") for x in plan["truth-forced"].cmd())
    os.makedirs(seed_dir / "truth" / "forced")
    (seed_dir / "truth" / "forced" / "traces_base.jsonl").write_text('{"id": 0}\n')
    (seed_dir / "truth" / "forced" / "traces_warmstart.jsonl").write_text("")  # sampled no trace: left out
    roll = plan["truth-rollout"].cmd()
    assert roll[roll.index("--mu-mode") + 1] == "rollout" and "base=base" in roll
    assert not any(x.startswith("warmstart=") for x in roll)
    assert roll[roll.index("--traces") + 1].endswith("traces_base.jsonl")
    grpo_cmd = plan["truth-grpo-mrt-rollout"].cmd
    assert grpo_cmd[grpo_cmd.index("--model") + 1] == "base" and "rollout" in grpo_cmd


# --------------------------------------------------------------------------------------
# grpo.py with the rollout meta-prover: restart precision and mu's time in metrics.jsonl
# --------------------------------------------------------------------------------------


@pytest.fixture
def engine(toy_sampler, toy_paths):
    """The session engine; the base weights go back into it after the test."""
    import utils

    yield toy_sampler
    toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))


def test_grpo_rollout_mu_logs_restart_precision(engine, toy_paths, tmp_path, monkeypatch):
    """grpo.py MRT-B with the rollout meta-prover on the real engine: each step's restart
    precision in metrics.jsonl equals the one recomputed by hand from that step's continuations
    (read from the real rollout as the run made them) and the run's z0.jsonl: the first wrong
    step f of each z0 (toy.first_wrong_step), the restart step k each continuation names."""
    import json

    import grpo

    steps, rollout = [], grpo.rollout

    def recorded(*a, **kw):  # the real function; its rows are also kept here
        steps.append(rollout(*a, **kw))
        return steps[-1]

    monkeypatch.setattr(grpo, "rollout", recorded)
    G = 2
    args = grpo.Args(model=toy_paths["base"], train_data=toy_paths["train"], test_data=toy_paths["test"], preset="toy",
                     out=str(tmp_path), eval_problems=0, variant="mrt", mu_mode="rollout", mu_rollout_tokens=64,
                     mu_samples=2, steps=2, prompts_per_step=8, group_size=G, micro_batch_size=16)
    with sampling.ready_engines({toy_paths["base"]: engine}):
        grpo.main(args)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2 and len(steps) == 2 and all(len(s) == 8 * G for s in steps)
    assert all(0 < r["time_mu"] < r["time_sample"] for r in rows)
    z0 = {x["id"]: x["z0"] for x in map(json.loads, open(tmp_path / "z0.jsonl")) if x["split"] == "train"}
    wrong_in_all = 0
    for r, conts in zip(rows, steps):
        wrong = []  # (f, k, number of operations, outcome) of each continuation after a wrong z0
        for c in conts:
            start, ops = toy.parse_problem(c["problem"]["problem"])
            f = toy.first_wrong_step(z0[c["problem"]["id"]], start, ops)
            if f is not None:
                wrong.append((f, c["episodes"].restart_step if c["episodes"] else None, len(ops), c["outcome"]))
        wrong_in_all += len(wrong)
        if not wrong:
            assert "restart_fixable" not in r, r
            continue
        share = lambda xs: sum(xs) / len(wrong)  # noqa: E731
        assert r["z0_wrong_continuations"] == len(wrong) and len(wrong) % G == 0  # whole groups share a z0
        # fixable: the restart keeps only right steps (k <= f) and names a step of the problem
        assert r["restart_fixable"] == pytest.approx(share([k is not None and 1 <= k <= n and k <= f
                                                            for f, k, n, _ in wrong]), abs=1e-4)
        assert r["restart_at_first_wrong"] == pytest.approx(share([k == f for f, k, _, _ in wrong]), abs=1e-4)
        assert r["z2_acc_z0_wrong"] == pytest.approx(share([o for _, _, _, o in wrong]), abs=1e-4)
    assert wrong_in_all > 0  # 8 toy problems a step: some z0 is wrong (base pass@1 is far below 1)
    card = json.load(open(tmp_path / "model" / "mrt.json"))
    assert card["args"]["mu_mode"] == "rollout" and card["args"]["mu_rollout_tokens"] == 64


def test_star_rollout_mu_is_wired(engine, toy_paths, tmp_path, monkeypatch):
    """star.py --mu-mode rollout on the real engine: r = J(mu | q, z0, z1) comes from mu
    continuing the revised attempt (8 mu samples each, so every J is a multiple of 1/8), the
    iteration's means are those of the run's own 16 r0 and 32 r_i (read from the real
    rollout_chunk as the run made them), and some of mu's 256 samples after z1 end right. (The
    bound is 0, not a measured rate: the toy's quality, and this rate with it, differs between
    the machines that build it.)"""
    import json

    import star

    chunks, rollout_chunk = [], star.rollout_chunk

    def recorded(*a, **kw):  # the real function; its records are also kept here
        chunks.append(rollout_chunk(*a, **kw))
        return chunks[-1]

    monkeypatch.setattr(star, "rollout_chunk", recorded)
    args = star.Args(model=toy_paths["base"], data=toy_paths["train"], test_data=toy_paths["test"], out=str(tmp_path),
                     preset="toy", method="mrt", iterations=1, problems=16, group_size=2, mu_samples=8, max_tokens=128,
                     sample_batch=16, eval_problems=0, mu_mode="rollout", mu_rollout_tokens=128, epochs=1, batch_size=4,
                     micro_batch_size=4)
    with sampling.ready_engines({toy_paths["base"]: engine}):
        summary = star.main(args)
    (it,) = [json.loads(x) for x in open(tmp_path / "iterations.jsonl")]
    assert summary["args"]["mu_mode"] == "rollout" and it["samples"] == 32
    records = [r for c in chunks for r in c]
    r0 = [r["r0"] for r in records]
    ri = [s["r"] for r in records for s in r["samples"]]
    assert len(r0) == 16 and len(ri) == 32
    assert all(x * 8 == round(x * 8) for x in r0 + ri), (r0, ri)
    assert it["r0_mean"] == pytest.approx(sum(r0) / 16, abs=1e-4)
    assert it["r_mean"] == pytest.approx(sum(ri) / 32, abs=1e-4)
    assert sum(ri) > 0, it  # some of the 256 mu samples after z1 end right
