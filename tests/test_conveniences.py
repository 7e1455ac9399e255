"""Tests of the conveniences around the stages: a custom reward by flag (utils.make_grader) at the
grading sites and the meta-prover, gold answers from a solution's last box (--answer-from), DAPO's
overlong masking in GRPO (--mask-truncated), the checkpoint-to-transformers converter
(training.export_checkpoint), --resume's refusal of meaning-changing arguments, and star.py's
resume at an iteration boundary."""

import json
import os
import re
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpo  # noqa: E402
import infogain  # noqa: E402
import sampling  # noqa: E402
import star  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
import warmstart  # noqa: E402
from conftest import WARMSTART_SMALL  # noqa: E402

REWARDS = textwrap.dedent(r'''
    import re

    def exact(text, gold, record):
        """1 when the last box holds exactly the gold string (no math equivalence)."""
        boxes = re.findall(r"\\boxed\{([^{}]*)\}", text)
        return 1.0 if boxes and boxes[-1] == gold else 0.0

    def parity(text, gold, record):
        """1 for an even number in the last box, right or wrong; fails on a record without the
        data file's fields."""
        assert "problem" in record and "answer" in record, record
        boxes = re.findall(r"\\boxed\{(-?\d+)\}", text)
        return float(bool(boxes) and int(boxes[-1]) % 2 == 0)

    def word(text, gold, record):
        return "yes"

    def too_big(text, gold, record):
        return 2

    not_a_function = 3
''')


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "myrewards.py"
    path.write_text(REWARDS)
    return str(path)


# --------------------------------------------------------------------------------------
# --reward: the resolver and its errors
# --------------------------------------------------------------------------------------


def test_reward_by_file_and_by_module(reward_file, monkeypatch):
    grade = utils.make_grader(f"{reward_file}:exact")
    assert grade("so \\boxed{1/2}", "1/2", None) == 1.0
    assert grade("so \\boxed{0.5}", "1/2", None) == 0.0  # math-verify would call these equal
    assert utils.grade("so \\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert grade(None, "1/2") == 0.0  # no text: the empty completion
    monkeypatch.syspath_prepend(os.path.dirname(reward_file))
    assert utils.make_grader("myrewards:exact")("\\boxed{7}", "7", {"answer": "7"}) == 1.0
    assert utils.make_grader("")("\\boxed{0.5}", "\\frac{1}{2}", None) == 1.0  # default: math-verify
    assert utils.make_grader(f"{reward_file}:exact") is grade  # imported once per spec


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", r"^--reward no_such_module_xyz:fn: cannot import no_such_module_xyz "
                              r"\(ModuleNotFoundError: No module named 'no_such_module_xyz'\)$"),
    ("{f}:missing", r"^--reward {f}:missing: {f} has no 'missing'$"),
    ("{f}:not_a_function", r"^--reward {f}:not_a_function: not_a_function is not callable \(a int\)$"),
    ("/nowhere/r.py:fn", r"^--reward /nowhere/r.py:fn: no such file /nowhere/r.py$"),
    ("justaname", r"^--reward must be module:function or path/to/file.py:function, got 'justaname'$"),
])
def test_reward_that_cannot_be_used_is_one_line(spec, message, reward_file):
    spec = spec.format(f=reward_file)
    with pytest.raises(utils.UserError, match=message.format(f=re.escape(reward_file))):
        utils.make_grader(spec)


@pytest.mark.parametrize("name, shown", [("word", "'yes'"), ("too_big", "2")])
def test_reward_value_must_be_a_number_in_0_1(name, shown, reward_file):
    grade = utils.make_grader(f"{reward_file}:{name}")
    with pytest.raises(utils.UserError, match=rf"^--reward .*:{name} returned {shown}; a reward must be a number in "
                                              rf"\[0, 1\]$"):
        grade("\\boxed{1}", "1", None)
    with pytest.raises(utils.UserError, match="returned nan"):
        utils.reward_value(float("nan"), "m:f")
    assert utils.reward_value(True, "m:f") == 1.0 and utils.reward_value(0, "m:f") == 0.0


def test_sample_outcome_uses_the_reward_and_still_zeroes_a_cut_sample(reward_file):
    spec = f"{reward_file}:parity"
    record = {"problem": "p", "answer": "3"}
    assert sampling.sample_outcome("\\boxed{4}", "3", "stop", spec, record) == 1.0
    assert sampling.sample_outcome("\\boxed{3}", "3", "stop", spec, record) == 0.0
    assert sampling.sample_outcome("\\boxed{4}", "3", "length", spec, record) == 0.0
    assert sampling.sample_outcome("\\boxed{3}", "3", "stop") == 1.0  # default grader


def test_meta_prover_grades_with_the_reward(toy_sampler, toy_paths, reward_file, tmp_path):
    """J is the success rate under the task's reward: a reward that accepts everything gives
    J = 1 where the math grader gives less; one that accepts nothing gives 0."""
    always = tmp_path / "always.py"
    always.write_text("def yes(text, gold, record):\n    return 1.0\n\ndef no(text, gold, record):\n    return 0\n")
    problems = utils.load_problems(toy_paths["test"], limit=4, tokenizer=toy_sampler.tokenizer)
    contexts, golds = [p["prompt"] for p in problems], [p["answer"] for p in problems]
    j = {r: sampling.MetaProver(toy_sampler, m=4, reward=r).success_rates(contexts, golds, seed=0)
         for r in ("", f"{always}:yes", f"{always}:no")}
    assert j[f"{always}:yes"].tolist() == [1.0] * 4 and j[f"{always}:no"].tolist() == [0.0] * 4
    assert j[""].min() < 1.0, j[""]  # the real grader would not make the first check trivial


# --------------------------------------------------------------------------------------
# --answer-from: the gold answer inside a worked solution (NuminaMath style)
# --------------------------------------------------------------------------------------


NUMINA = [
    {"source": "amc", "problem": "Half of one?", "solution": "We halve: $\\boxed{\\frac{1}{2}}$ is it.",
     "messages": []},
    {"source": "olympiads", "problem": "Pairs?", "solution": "First \\boxed{3}, then fix: \\boxed{\\{1, 2\\}}"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_answer_from_takes_the_last_box_of_the_solution(tmp_path):
    path = _jsonl(tmp_path / "numina.jsonl", NUMINA)
    got = utils.load_problems(path, answer_from="solution")
    assert got == [{"id": 0, "problem": "Half of one?", "answer": "\\frac{1}{2}"},
                   {"id": 1, "problem": "Pairs?", "answer": "\\{1, 2\\}"}]
    kept = utils.load_problems(path, answer_from="solution", keep_record=True)
    assert kept[1]["record"] == NUMINA[1]  # what a custom reward is handed


@pytest.mark.parametrize("solution", ["no box at all", "cut \\boxed{12", ""])
def test_answer_from_without_a_box_names_file_and_line(tmp_path, solution):
    path = _jsonl(tmp_path / "numina.jsonl", [NUMINA[0], {"problem": "q", "solution": solution}])
    where = re.escape(str(tmp_path / "numina.jsonl"))
    with pytest.raises(utils.UserError, match=rf"^{where}:2: field 'solution' holds no complete \\boxed\{{\}} answer "
                                              rf"\(--answer-from\)$"):
        utils.load_problems(path, answer_from="solution")
    with pytest.raises(utils.UserError, match=r"numina\.jsonl:1: missing field 'sol'$"):
        utils.load_problems(path, answer_from="sol")


def test_every_stage_that_reads_problems_has_the_flags():
    import evaluate
    import r1_analysis

    for stage in (grpo, star, warmstart, evaluate, infogain, r1_analysis):
        fields = {f for f in stage.Args.__dataclass_fields__}
        assert {"reward", "answer_from"} <= fields, stage.__name__


# --------------------------------------------------------------------------------------
# --mask-truncated (DAPO's overlong filtering)
# --------------------------------------------------------------------------------------


def test_overlong_mask_and_the_loss_by_hand():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    truncated = torch.tensor([False, True, False])
    assert torch.equal(grpo.overlong_mask(mask, truncated), torch.tensor([[1.0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]))
    # on-policy (ratio 1) the dapo loss is -sum(A over trained tokens) / num_items: rows 0 and 2,
    # 3 + 4 tokens with advantages 1 and -0.5: -(3 * 1 + 4 * -0.5) / 7 = -1/7
    logp = torch.zeros(3, 4)
    adv = torch.tensor([1.0, 2.0, -0.5])
    loss, m = grpo.grpo_loss(logp, logp, None, adv, grpo.overlong_mask(mask, truncated), loss_type="dapo",
                             num_items=7)
    assert loss.item() == pytest.approx(-1 / 7) and m["tokens"].item() == 7
    loss_all, _ = grpo.grpo_loss(logp, logp, None, adv, mask, loss_type="dapo", num_items=9)
    assert loss_all.item() == pytest.approx(-(3 * 1 + 2 * 2 + 4 * -0.5) / 9)


def test_mask_truncated_reaches_policy_update(toy_paths):
    """Every completion cut: with the flag nothing is trained (zero gradient, no AdamW step
    without weight decay); without it the same batch moves the weights."""
    tok = utils.load_tokenizer(toy_paths["base"])
    ctx = utils.encode(tok, utils.build_prompt(tok, "What is 2 + 3?"))
    rows = [dict(ctx_ids=ctx, token_ids=utils.encode(tok, t)[1:], sampler_logp=None, truncated=True)
            for t in ("Step 1: 2 + 3 = 5", "Step 1: 2 + 3 = 6 and")]
    for r in rows:
        r["num_tokens"] = len(r["token_ids"])
    moved = {}
    for flag in (True, False):
        args = grpo.resolve_args(grpo.Args(variant="direct", prompts_per_step=1, group_size=2, micro_batch_size=2,
                                           mask_truncated=flag, lr=1e-2, weight_decay=0.0), 1)
        torch.manual_seed(0)
        model, _ = training.load_trainer(toy_paths["base"], "fp32", "cpu")
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        grpo.policy_update(model, None, opt, sched, rows, torch.tensor([1.0, -1.0]), args, tok.pad_token_id or 0)
        moved[flag] = any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert moved == {True: False, False: True}


# --------------------------------------------------------------------------------------
# A short real GRPO run with a custom reward: export, and --resume's refusals
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(toy_sampler, toy_paths, tmp_path_factory):
    """2 steps of direct GRPO on the toy with the parity reward, every record carrying an extra
    field (the reward sees the data file's record)."""
    root = tmp_path_factory.mktemp("reward_run")
    (root / "r.py").write_text(REWARDS)
    rows = [dict(r, source="toy") for r in utils.read_records(toy_paths["train"])[:16]]
    train = _jsonl(root / "train.jsonl", rows)
    args = grpo.Args(model=toy_paths["base"], train_data=train, test_data=toy_paths["test"], preset="toy",
                     out=str(root / "out"), eval_problems=0, variant="direct", steps=2, prompts_per_step=4,
                     group_size=4, micro_batch_size=16, lr=1e-3, seed=5,
                     reward=f"{root / 'r.py'}:parity", mask_truncated=True)
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        grpo.main(args)
    toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))
    return {"args": args, "out": root / "out"}


def test_grpo_trains_on_the_custom_reward(reward_run):
    samples = [json.loads(line) for line in open(reward_run["out"] / "samples.jsonl")]
    done = [(c["text"], c["outcome"]) for s in samples for c in s["completions"]]
    last = [re.findall(r"\\boxed\{(-?\d+)\}", t)[-1:] for t, _ in done]
    even = [float(bool(b) and int(b[0]) % 2 == 0) for b in last]
    assert done and all(o in (e, 0.0) for (_, o), e in zip(done, even))  # 0 also when cut at --max-tokens
    assert any(o == 1.0 for _, o in done)
    math = [utils.grade(c["text"], s["gold"]) for s in samples for c in s["completions"]]
    assert [o for _, o in done] != math, "the math grader would give the same outcomes: the test proves nothing"
    assert len(open(reward_run["out"] / "metrics.jsonl").readlines()) == 2


def test_export_of_the_checkpoint_equals_the_runs_model(reward_run, toy_paths, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    card = training.export_checkpoint(str(reward_run["out"] / "checkpoint"), toy_paths["base"], str(out))
    a, b = load_file(out / "model.safetensors"), load_file(reward_run["out"] / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(os.path.join(toy_paths["base"], "model.safetensors"))
    assert not all(torch.equal(a[k], v) for k, v in base.items())  # the run trained: the comparison means something
    assert card["step"] == 2 and card["format"] == "direct" and card["args"]["reward"].endswith(":parity")
    assert json.load(open(out / "mrt.json")) == card
    assert os.path.exists(out / "tokenizer.json") or os.path.exists(out / "tokenizer_config.json")


def test_export_cli_errors(run_script, tmp_path, toy_paths):
    code, err = run_script("training", ["export", "--checkpoint", str(tmp_path), "--base", toy_paths["base"],
                                        "--out", str(tmp_path / "x")], own_process=True)
    assert code == 2 and err[-1] == f"error: {tmp_path}: no complete checkpoint" and not (tmp_path / "x").exists()


def test_grpo_resume_refuses_other_arguments(reward_run):
    import dataclasses

    args = reward_run["args"]
    with pytest.raises(utils.UserError, match=r"^--resume: .*checkpoint was written with other arguments: "
                                              r"--group-size 8 \(checkpoint: 4\), --lr 0\.002 \(checkpoint: 0\.001\); "
                                              r"give the checkpoint's values or a new --out$"):
        grpo.main(dataclasses.replace(args, resume=True, lr=2e-3, group_size=8))
    with pytest.raises(utils.UserError, match=r"--steps 1 is below the checkpoint's step 2"):
        grpo.main(dataclasses.replace(args, resume=True, steps=1))
    with pytest.raises(utils.UserError, match=r"--answer-from 'solution' \(checkpoint: ''\)"):
        grpo.main(dataclasses.replace(args, resume=True, answer_from="solution"))
    # a raised --steps and a changed --out-side setting pass the check
    ok = grpo.resolve_args(dataclasses.replace(args, resume=True, steps=5, save_every=1, report_to="none"), 1)
    ok = dataclasses.replace(ok, instruction=utils.stage_instruction(ok.instruction, ok.model))
    assert training.check_resume_args(str(reward_run["out"] / "checkpoint"), ok, grpo.RESUME_FREE)["step"] == 2


def test_resume_mismatch_by_hand():
    saved = {"model": "a", "lr": 1e-3, "out": "x", "steps": 4}
    assert utils.resume_mismatch(saved, {"model": "b", "lr": 1e-3, "out": "y", "steps": 9, "new": 1},
                                    free=("out", "steps")) == ["--model 'b' (checkpoint: 'a')"]


def test_warmstart_resume_refuses_other_arguments(toy_warmstart, toy_paths):
    args = warmstart.Args(model=toy_paths["base"], data=toy_paths["train"], out=toy_warmstart["dir"], resume=True,
                          **dict(WARMSTART_SMALL, lr=5e-4, beam_width=3, epochs=7))  # more epochs: allowed
    with pytest.raises(utils.UserError, match=r"^--resume: .*checkpoint was written with other arguments: "
                                              r"--beam-width 3 \(checkpoint: 2\), --lr 0\.0005 \(checkpoint: 0\.001\); "):
        warmstart.main(args)


# --------------------------------------------------------------------------------------
# star.py --resume at an iteration boundary
# --------------------------------------------------------------------------------------


def test_star_resume_after_an_iteration_equals_the_whole_run(toy_sampler, toy_paths, tmp_path, capsys):
    """STaR at its smallest real size: 2 iterations in one go vs 1 iteration, then --resume with
    --iterations 2 (the first iteration skipped, its model reloaded). Same data, model, log. Then
    a kill between iteration 2's SFT and its log line (model/ is iteration 2's, the log ends at
    1): the resume redoes iteration 1's SFT and ends the same again."""
    from safetensors.torch import load_file

    cfg = dict(model=toy_paths["base"], data=toy_paths["train"], test_data=toy_paths["test"], preset="toy",
               method="star", problems=24, group_size=2, max_tokens=96, eval_problems=8, eval_samples=2, epochs=3,
               batch_size=4, micro_batch_size=4, lr=1e-3, seed=2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    timeless = lambda p: [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}  # noqa: E731
                          for line in open(p)]

    def same_as_whole(b):
        assert a["examples"] > 0 and a["examples"] == b["examples"] and a["accuracy"] == b["accuracy"]
        for k in (1, 2):
            assert open(whole / f"data_iter{k}.jsonl").read() == open(cut / f"data_iter{k}.jsonl").read()
        assert timeless(whole / "iterations.jsonl") == timeless(cut / "iterations.jsonl")
        wa, wb = load_file(whole / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)

    try:
        with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
            a = star.main(star.Args(out=str(whole), iterations=2, **cfg))
            star.main(star.Args(out=str(cut), iterations=1, **cfg))
            with pytest.raises(utils.UserError,
                               match=r"--resume: .* other arguments: --lr 0\.002 \(checkpoint: 0\.001\)"):
                star.main(star.Args(out=str(cut), iterations=2, resume=True, **dict(cfg, lr=2e-3)))
            toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))  # as a fresh process holds
            capsys.readouterr()
            same_as_whole(star.main(star.Args(out=str(cut), iterations=2, resume=True, **cfg)))
            assert f"resumed {cut} after iteration 1" in capsys.readouterr().out

            lines = open(cut / "iterations.jsonl").readlines()
            (cut / "iterations.jsonl").write_text(lines[0])
            history, kept = utils.finished_iterations(str(cut))
            assert len(history) == 1 and len(kept) == len(open(cut / "data_iter1.jsonl").readlines())
            same_as_whole(star.main(star.Args(out=str(cut), iterations=2, resume=True, **cfg)))
    finally:
        toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))
