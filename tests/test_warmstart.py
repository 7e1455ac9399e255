"""Tests of warmstart.py: trace construction from a search tree (Backtrack, RISE, rejection)
on hand-made trees, the SFT masks, and real runs on the toy model: beam search against
single samples, a full search -> traces -> SFT run whose traces parse back, and how often the
warmstarted model writes the backtrack format on its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WARMSTART_SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sampling  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
import warmstart  # noqa: E402
from infogain import restart_prefix, split_backtrack  # noqa: E402
from warmstart import Node  # noqa: E402

# --------------------------------------------------------------------------------------
# Traces from a hand-made tree
# --------------------------------------------------------------------------------------

# Problem: Start with 2. Add 3. Multiply by 4. Subtract 5. (answer 15)
S1, S1_BAD = "Step 1: 2 + 3 = 5\n", "Step 1: 2 + 3 = 6\n"
S2, S2_BAD = "Step 2: 5 * 4 = 20\n", "Step 2: 5 * 4 = 24\n"
S3 = "Step 3: 20 - 5 = 15\nThe answer is \\boxed{15}"
S3_BAD = "Step 3: 24 - 5 = 19\nThe answer is \\boxed{19}"


def tree() -> list[Node]:
    """root(0.4) -> S1(0.8) -> S2(0.9) -> S3 correct
                             -> S2_BAD(0.0) -> S3_BAD wrong
                -> S1_BAD(0.0) -> ... wrong leaf"""
    n = [Node(0, -1, 0, "", 0.4, kept=True),
         Node(1, 0, 1, S1, 0.8, kept=True),
         Node(2, 0, 1, S1_BAD, 0.0, kept=True),
         Node(3, 1, 2, S1 + S2, 0.9, kept=True),
         Node(4, 1, 2, S1 + S2_BAD, 0.0, kept=True),
         Node(5, 3, 3, S1 + S2 + S3, 1.0, complete=True, correct=True, kept=True),
         Node(6, 4, 3, S1 + S2_BAD + "Step 3: 24 - 5 = 19\nThe answer is \\boxed{19}", 0.0, complete=True, kept=True),
         Node(7, 2, 2, S1_BAD + "Step 2: 6 * 4 = 24\nStep 3: 24 - 5 = 19\nThe answer is \\boxed{19}", 0.0,
              complete=True, kept=True)]
    return n


def record(attempts=()):
    return {"problem": "Start with 2. Add 3. Multiply by 4. Subtract 5. What is the result?", "answer": "15",
            "nodes": [vars(x) for x in tree()], "attempts": list(attempts)}


def test_best_restart_picks_highest_value_node_on_the_attempts_path():
    nodes = tree()
    # z0 slipped at step 2: the best node on its path with a correct branch is S1 (value 0.8),
    # the restart redoes step 2
    u, leaf = warmstart.best_restart(nodes[6].text, nodes, "\n")
    assert (u.id, leaf.id) == (1, 5)
    # z0 slipped at step 1: only the root is on its path; restart at step 1
    u, leaf = warmstart.best_restart(nodes[7].text, nodes, "\n")
    assert (u.id, leaf.id) == (0, 5)
    # the correct leaf itself has no restart (its next step never differs from itself)
    assert warmstart.best_restart(nodes[5].text, nodes, "\n") is None


def test_best_restart_ties_go_to_the_deepest_node():
    # a second correct branch from the root (step 1 written another way), so that both the
    # root and S1 are restart candidates for the attempt that slipped at step 2
    alt = "Step 1: 3 + 2 = 5\n"
    nodes = tree() + [Node(8, 0, 1, alt, 0.7, kept=True),
                      Node(9, 8, 3, alt + S2 + S3, 1.0, complete=True, correct=True, kept=True)]
    u, _ = warmstart.best_restart(nodes[6].text, nodes, "\n")
    assert u.id == 1  # 0.8 beats the root's 0.4
    nodes[1].value = nodes[0].value  # root and S1 tie
    u, _ = warmstart.best_restart(nodes[6].text, nodes, "\n")
    assert u.id == 1
    nodes[0].value = 0.95  # the root now beats S1: restart from the start
    u, _ = warmstart.best_restart(nodes[6].text, nodes, "\n")
    assert u.id == 0


def test_backtrack_traces_parse_back_and_share_the_prefix():
    traces = warmstart.build_traces(record(), "backtrack", 5, "\n", seed=0)
    assert len(traces) == 2  # two distinct wrong leaves, both get a restart
    by_step = {t["restart_step"]: t for t in traces}
    assert set(by_step) == {1, 2}
    for t in traces:
        ep = split_backtrack(t["completion"])
        assert ep is not None and (ep.z0, ep.z1, ep.z2) == (t["z0"], t["z1"], t["z2"])
        assert ep.z0 + ep.z1 + ep.z2 == t["completion"]
        assert utils.grade(ep.z2, "15") == 1.0 and utils.grade(ep.z0, "15") == 0.0
        assert t["z1"].startswith("\n" + utils.BACKTRACK_MARKER + "\nStep")
        # the restart shares z0's prefix up to step k: steps 1..k-1 of z0 stand
        k = t["restart_step"]
        prefix = restart_prefix(t["z0"], k)
        assert prefix is not None and (S1 + S2 + S3).startswith(prefix)
    assert by_step[2]["restart_value"] == 0.8 and by_step[2]["prefix_values"] == [0.4, 0.8, 0.0]
    assert by_step[2]["z1"] == "\n" + utils.BACKTRACK_MARKER + "\nStep 2: 5 * 4 = 20"
    assert by_step[2]["z2"] == "\n" + S3


def test_wrong_plain_attempts_are_z0_candidates_and_k_caps_the_count():
    wrong = {"text": S1 + S2_BAD + "Step 3: 24 - 5 = 18\nThe answer is \\boxed{18}", "correct": False, "complete": True}
    unfinished = {"text": S1 + "Step 2:", "correct": False, "complete": False}
    traces = warmstart.build_traces(record([wrong, unfinished]), "backtrack", 10, "\n", seed=0)
    assert len(traces) == 3 and sum(t["source"] == "attempt" for t in traces) == 1
    assert all("Step 2:" != t["z0"][-7:] for t in traces)  # an unfinished attempt is never z0
    assert len(warmstart.build_traces(record([wrong]), "backtrack", 1, "\n", seed=0)) == 1


def test_rise_restarts_from_step_1_and_rejection_keeps_correct_solutions():
    rise = warmstart.build_traces(record(), "rise", 5, "\n", seed=0)
    assert len(rise) == 2
    for t in rise:
        assert t["restart_step"] == 1 and t["z1"].endswith("Step 1: 2 + 3 = 5")
        assert utils.grade(t["z2"], "15") == 1.0
    correct_attempt = {"text": S1 + S2 + "Step 3: 20 - 5 = 15\nThe answer is \\boxed{15}", "correct": True, "complete": True}
    rej = warmstart.build_traces(record([correct_attempt]), "rejection", 5, "\n", seed=0)
    assert [t["completion"] for t in rej] == [S1 + S2 + S3]  # the duplicate correct solution counts once
    assert "z0" not in rej[0]


def test_a_restart_that_would_not_parse_back_is_skipped():
    """A correct leaf whose restarted step holds the box on its own line (a real model's style)
    joins into a completion with no z2 line: that pair is skipped, never an assertion error."""
    one_line = "Step 3: 20 - 5 = 15, so the answer is \\boxed{15}"
    nodes = [Node(0, -1, 0, "", 0.4, kept=True), Node(1, 0, 1, S1, 0.8, kept=True),
             Node(2, 1, 2, S1 + S2, 0.9, kept=True),
             Node(3, 2, 3, S1 + S2 + one_line, 1.0, complete=True, correct=True, kept=True),
             Node(4, 2, 3, S1 + S2 + "Step 3: 20 - 5 = 16\nThe answer is \\boxed{16}", 0.0, complete=True, kept=True)]
    rec = {**record(), "nodes": [vars(x) for x in nodes]}
    assert warmstart.best_restart(nodes[4].text, nodes, "\n") is not None  # the pair exists ...
    assert warmstart.build_traces(rec, "backtrack", 5, "\n", seed=0) == []  # ... but makes no trace


def test_no_correct_leaf_gives_no_trace():
    rec = record()
    rec["nodes"] = [n for n in rec["nodes"] if not n["correct"]]
    for scheme in warmstart.SCHEMES:
        assert warmstart.build_traces(rec, scheme, 5, "\n", seed=0) == []


def test_direct_mixin_adds_correct_solutions_of_the_same_search():
    other = {"text": S1 + S2 + "Step 3: 20 - 5 = 15\nThe answer is \\boxed{15}.", "correct": True, "complete": True}
    rec = record([other])
    assert warmstart.direct_mixin(rec, 3, 0.0, "\n", seed=0) == []
    every = warmstart.direct_mixin(rec, 5, 1.0, "\n", seed=0)  # 5 asked, 2 distinct correct solutions exist
    assert sorted(t["completion"] for t in every) == sorted([S1 + S2 + S3, other["text"]])
    assert all(t["kind"] == "direct" and "z0" not in t for t in every)
    counts = [len(warmstart.direct_mixin(rec, 1, 0.5, "\n", seed=s)) for s in range(400)]
    assert 0.4 < sum(counts) / 400 < 0.6  # one trace brings one solution with probability 0.5

# --------------------------------------------------------------------------------------
# SFT: only completion tokens carry loss (EOS included, pad == EOS safe)
# --------------------------------------------------------------------------------------


def test_sft_batch_masks_the_prompt_and_keeps_eos():
    eos = 2
    examples = [([1, 5, 6, 7, 8, eos], 3), ([1, 5, 9, eos], 2)]  # (ids, prompt length)
    ids, attn, loss_mask = training.sft_batch(examples, pad_id=eos)  # pad == eos
    assert ids.tolist() == [[1, 5, 6, 7, 8, eos], [1, 5, 9, eos, eos, eos]]
    # targets are ids[:, 1:]; a target at position t+1 carries loss iff plen <= t+1 < len
    assert loss_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert attn.tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]


def test_completion_loss_ignores_prompt_logits():
    torch.manual_seed(0)
    ids, _, loss_mask = training.sft_batch([([1, 4, 5, 6, 2], 3)], pad_id=0)
    logits = torch.randn(1, 4, 8, requires_grad=True)
    training.completion_nll_sum(logits, ids[:, 1:], loss_mask).backward()
    g = logits.grad.abs().sum(-1)[0]  # (T-1,)
    assert g[:2].tolist() == [0.0, 0.0] and (g[2:] > 0).all()


def test_completion_nll_sum_equals_cross_entropy():
    """The chunked loss (training.sampled_logprobs) is the masked cross-entropy sum, value and
    gradient, in place or not; logits may run one position past the targets."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)  # (B, T, V): T - 1 = 5 targets
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float)
    ref = logits[:, :-1].clone().requires_grad_(True)
    want = (torch.nn.functional.cross_entropy(ref.reshape(-1, 11), targets.reshape(-1), reduction="none").view(2, 5)
            * mask).sum()
    want.backward()
    for inplace in (False, True):
        x = (logits * 1.0).requires_grad_(True)
        y = x * 1.0  # inplace writes the gradient into this non-leaf, as into a model's logits
        got = training.completion_nll_sum(y, targets, mask, inplace=inplace)
        got.backward()
        assert torch.allclose(got, want, atol=1e-5), inplace
        assert torch.allclose(x.grad[:, :-1], ref.grad, atol=1e-6) and x.grad[:, -1].abs().max() == 0, inplace


def test_sft_example_moves_z0_into_the_prompt():
    t = {"prompt": "P\n", "z0": "A", "completion": "A\nB"}
    assert training.sft_example(t, z0_loss=False) == ("P\nA", "\nB")
    assert training.sft_example(t, z0_loss=True) == ("P\n", "A\nB")
    assert training.sft_example({"prompt": "P\n", "completion": "C"}, z0_loss=False) == ("P\n", "C")


def test_sft_loss_target_names_what_each_scheme_trains_on():
    # Fig. 6 is not like for like: backtrack / rise train on z1 + z2 (z0 in the prompt), rejection on a whole solution
    assert warmstart.sft_loss_target("backtrack", False) == "z1+z2, z0 in prompt"
    assert warmstart.sft_loss_target("rise", False) == "z1+z2, z0 in prompt"
    assert warmstart.sft_loss_target("backtrack", True) == "z0+z1+z2"
    assert warmstart.sft_loss_target("rejection", False) == "whole solution"
    assert warmstart.sft_loss_target("rejection", True, 0.5) == "whole solution"
    assert warmstart.sft_loss_target("backtrack", False, 0.5) == "z1+z2, z0 in prompt, 0.5 direct mix"
    # each target is what sft_example gives the loss: the completion after the prompt
    t = {"prompt": "P\n", "z0": "A", "completion": "A\nB"}
    assert training.sft_example(t, False)[1] == "\nB" and training.sft_example(t, True)[1] == "A\nB"


def test_search_summary_hand_table():
    def rec(nodes, attempts):
        return {"nodes": [{"correct": c, "value": v} for c, v in nodes],
                "attempts": [{"correct": c} for c in attempts]}

    records = [rec([(False, 0.5), (True, 1.0)], [False, False]),  # found where the attempts missed
               rec([(False, 0.25)], [False, False]),  # missed by both
               rec([(False, 0.75), (False, 0.0), (True, 1.0)], [True, False])]  # found, one attempt right
    s = warmstart.search_summary(records)
    assert s == {"problems": 3, "nodes_mean": 2.0, "search_solved": 2 / 3, "attempt_pass@1": 1 / 6,
                 "attempt_pass@2": 1 / 3, "search_solved_where_attempts_missed": 1 / 2, "root_value_mean": 0.5}
    # every problem has a right attempt: no problem where the attempts missed
    assert warmstart.search_summary(records[2:])["search_solved_where_attempts_missed"] is None


# --------------------------------------------------------------------------------------
# Real runs on the toy model
# --------------------------------------------------------------------------------------


@pytest.fixture
def engine(toy_sampler, toy_paths):
    """The session engine; the base weights go back into it after the test."""
    yield toy_sampler
    toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))


def test_search_traces_sft_and_the_warmstarted_model_backtracks(engine, toy_paths, toy_warmstart, tmp_path):
    out = Path(toy_warmstart["dir"])
    s = toy_warmstart["summary"]["search"]
    # the search finds correct solutions more often than single samples do
    assert s["search_solved"] > s["attempt_pass@1"] + 0.1, s
    # the summary recomputed from search.jsonl, each node and attempt graded again from its text
    records = utils.read_records(str(out / "search.jsonl"), ["problem", "answer", "nodes", "attempts"])
    assert s["problems"] == len(records) == WARMSTART_SMALL["problems"]
    found, att = [], []
    for r in records:
        for n in r["nodes"]:
            assert n["correct"] == (n["complete"] and utils.grade(n["text"], r["answer"]) == 1.0), n
        assert len(r["attempts"]) == WARMSTART_SMALL["attempts"]
        for a in r["attempts"]:
            assert a["correct"] == (utils.grade(a["text"], r["answer"]) == 1.0), a
        found.append(any(n["correct"] for n in r["nodes"]))
        att.append([a["correct"] for a in r["attempts"]])
    missed = [f for f, a in zip(found, att) if not any(a)]
    assert s["search_solved"] == pytest.approx(np.mean(found))
    assert s["attempt_pass@1"] == pytest.approx(np.mean(att))
    assert s["search_solved_where_attempts_missed"] == (pytest.approx(np.mean(missed)) if missed else None)

    traces = utils.read_records(str(out / "traces.jsonl"), ["problem", "answer", "z0", "z1", "z2", "completion"])
    assert len(traces) >= 8 and toy_warmstart["summary"]["traces"]["count"] == len(traces)
    for t in traces:
        ep = split_backtrack(t["completion"])
        assert ep is not None and ep.z0 == t["z0"] and ep.z2 == t["z2"]
        assert utils.grade(ep.z2, t["answer"]) == 1.0  # z2 is correct
        assert utils.grade(ep.z0, t["answer"]) == 0.0  # z0 is a real mistake
        assert restart_prefix(ep.z0, ep.restart_step) is not None  # restart at a step z0 has

    log = [json.loads(x) for x in open(out / "log.jsonl")]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"], [round(r["loss"], 3) for r in log]
    assert all(b["tokens"] > a["tokens"] for a, b in zip(log, log[1:]))
    assert all(r["scheme"] == "backtrack" and r["loss_on"] == "z1+z2, z0 in prompt" for r in log)
    card = json.load(open(out / "model" / "mrt.json"))
    assert card["format"] == "backtrack" and card["stage"] == "warmstart"
    assert card["base_build"] == json.load(open(os.path.join(toy_paths["base"], "build.json")))["fingerprint"]
    SMALL = WARMSTART_SMALL

    # The warmstarted model, from the prompt alone, on held-out problems: how often it writes
    # the backtrack format (marker + restart) and how often that trace is well formed.
    engine.sync_weights(utils.load_model(str(out / "model"), "auto", "cpu"))
    test = utils.read_records(toy_paths["test"], ["problem", "answer"])[:32]
    prompts = [utils.build_prompt(engine.tokenizer, r["problem"]) for r in test]
    outs = engine.generate(prompts, n=4, temperature=1.0, max_tokens=200, seed=5)
    texts = [s.text for g in outs for s in g]
    backtrack_rate = sum(split_backtrack(t) is not None for t in texts) / len(texts)
    print(f"warmstarted toy model: backtrack format in {backtrack_rate:.0%} of {len(texts)} samples")
    # measured 22% on the default toy build (about 40 traces, 30 SFT steps); the base: 0%
    assert backtrack_rate > 0.1
    engine.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))
    base = engine.generate(prompts, n=4, temperature=1.0, max_tokens=200, seed=5)
    assert all(split_backtrack(s.text) is None for g in base for s in g)  # the base never saw the marker

    # the other schemes reuse the same tree
    with sampling.ready_engines({toy_paths["base"]: engine}):
        rej = warmstart.main(warmstart.Args(model=toy_paths["base"], data=toy_paths["train"],
                                            out=str(tmp_path / "rej"), scheme="rejection",
                                            search_from=str(out / "search.jsonl"), **dict(SMALL, epochs=1)))
    assert rej["traces"]["count"] > 0 and json.load(open(tmp_path / "rej" / "model" / "mrt.json"))["format"] == "direct"
    assert json.loads(open(tmp_path / "rej" / "log.jsonl").readline())["loss_on"] == "whole solution"
    path = tmp_path / "fig6.png"
    warmstart.main(warmstart.Args(plot=[str(out / "log.jsonl"), str(tmp_path / "rej" / "log.jsonl")], plot_out=str(path)))
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("case", ["missing_file", "malformed", "missing_model"])
def test_bad_input_one_line_exit_2(case, toy_paths, tmp_path, run_script):
    data = tmp_path / "data.jsonl"
    if case == "malformed":
        data.write_text(json.dumps({"problem": "Start with 2. Add 3. What is the result?", "answer": "5"}) + "\n{oops\n")
    model = str(tmp_path / "nope") if case == "missing_model" else toy_paths["base"]
    if case == "missing_model":
        data = toy_paths["train"]
    out = tmp_path / "out"
    code, err = run_script("warmstart", ["--model", model, "--data", str(data), "--out", str(out)],
                           own_process=case == "malformed")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert {"missing_file": "no such file", "malformed": ":2:", "missing_model": "does not exist"}[case] in err[0]
    assert not out.exists()


# --------------------------------------------------------------------------------------
# The search engine through SFT; torchrun and --resume
# --------------------------------------------------------------------------------------


def test_search_engine_sleeps_through_sft_and_stays_referenced(engine, toy_paths, tmp_path, monkeypatch):
    """An engine that main builds for the search is asleep when SFT starts (vLLM sleep mode
    frees its GPU memory; CPU vLLM has none, so its sleep call is recorded here) and stays
    referenced after main returns: freeing it would end vLLM's process-wide state and
    torchrun's group with it."""
    events = []
    monkeypatch.setattr(warmstart, "ENGINES", [])

    def built(args, model_path, problems, seed):  # the real engine (the session's), as search_engine keeps it
        warmstart.ENGINES.append(engine)
        return engine

    sft = training.sft
    monkeypatch.setattr(warmstart, "search_engine", built)
    monkeypatch.setattr(engine, "sleep", lambda: events.append("sleep"), raising=False)
    monkeypatch.setattr(training, "sft", lambda *a, **k: (events.append("sft"), sft(*a, **k))[1])
    summary = warmstart.main(warmstart.Args(model=toy_paths["base"], data=toy_paths["train"], out=str(tmp_path / "w"),
                                            **dict(WARMSTART_SMALL, problems=12, epochs=1)))
    assert events == ["sleep", "sft"]
    assert warmstart.ENGINES == [engine] and summary["sft_world"] == 1


def test_torchrun_search_then_sharded_sft_and_resume(toy_paths, tmp_path):
    """torchrun --nproc_per_node 2: the search's engines (one per rank) stay up, so SFT runs
    with the process group of 2 (FSDP2 shards); --resume then reuses search.jsonl and continues
    SFT from the checkpoint (here for a second epoch), its log steps following on."""
    out = tmp_path / "w"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "warmstart.py",
            "--model", toy_paths["base"], "--data", toy_paths["train"], "--out", str(out), "--preset", "toy",
            "--problems", "16", "--beam-width", "2", "--expansions", "2", "--rollouts", "2", "--attempts", "2",
            "--search-batch", "8", "--batch-size", "4", "--micro-batch-size", "2", "--save-every", "0"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

    def run(*extra):
        p = subprocess.run(base + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        return p.stdout + p.stderr

    run("--epochs", "1")
    first = json.load(open(out / "summary.json"))
    steps = [json.loads(x)["step"] for x in open(out / "log.jsonl")]
    assert first["sft_world"] == 2 and steps == list(range(1, len(steps) + 1))
    search = (out / "search.jsonl").read_bytes()
    log = run("--epochs", "2", "--resume")
    assert "reusing the search" in log and f"resumed {out / 'checkpoint'} at step {len(steps)}/{2 * len(steps)}" in log
    assert (out / "search.jsonl").read_bytes() == search
    again = [json.loads(x) for x in open(out / "log.jsonl")]
    assert [r["step"] for r in again] == list(range(1, 2 * len(steps) + 1))
    assert all(b["tokens"] > a["tokens"] for a, b in zip(again, again[1:]))
    assert json.load(open(out / "summary.json"))["sft_world"] == 2
    assert json.load(open(out / "model" / "mrt.json"))["args"]["epochs"] == 2
