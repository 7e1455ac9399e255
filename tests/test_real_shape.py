"""The real path on a realistic-shape model (tests/realistic.py: Llama-3 vocabulary 128,256,
1,048,576 positions in its config, bf16 config, Llama-3 chat template), on CPU, where an engine's
KV cache is sized from its length and is at most 2 GiB (sampling.model_kv_cache_bytes): every
engine must be sized from its run's own lengths (a 1M-token sequence needs 4 GiB of KV cache at
this model's shape, so an engine sized from the config cannot start). Stages run as
subprocesses (one engine per process; the session's in-process toy engine stays alone):
grpo.py under `torchrun --nproc_per_node 2` with the paper preset, its folder as a kill after
the step-1 checkpoint leaves it resumed (same weights as the uninterrupted run), the export
loaded by transformers and by vLLM (evaluate.py on it), warmstart.py and star.py in one
process. Also: the sleep-mode call order (a recording engine), the engine sizes, and the
one-line error of an engine that cannot start."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import grpo
import realistic
import sampling
import training
import utils
import warmstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
GRPO_FLAGS = ["--preset", "paper", "--steps", "2", "--group-size", "2", "--prompts-per-step", "2",
              "--micro-batch-size", "2", "--max-tokens", "64", "--eval-problems", "12", "--eval-samples", "2",
              "--mu-samples", "4", "--lr", "1e-4", "--lr-schedule", "constant", "--save-every", "1", "--seed", "1"]
"""The paper preset (beta 0.04: a reference model; MRT-B: the meta-prover in the same engine;
max prompt 1500) with small overrides; lr 1e-4 so that two steps visibly move the weights;
56 graded samples in all (8 trained on, 24 at each evaluation), so that on three-step
problems (`easy`) some are right whatever machine built the toy (see `easy`)."""


def _env():
    return dict({k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}, OMP_NUM_THREADS="1",
                MRT_VLLM_EAGER="1",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd, timeout=600, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout, **kw)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    return out


@pytest.fixture(scope="session")
def real_model(toy_paths, tmp_path_factory):
    """The realistic-shape model built from the session's toy base (cached by content under
    runs/realistic, so a session builds it once)."""
    return realistic.build_realistic(os.path.join(ROOT, "runs", "realistic"), base=toy_paths["base"])


@pytest.fixture(scope="session")
def easy(toy_paths, tmp_path_factory):
    """{'train', 'test'}: the toy splits' three-step problems. The realistic model is the toy
    base after a short fit to the chat template, right less often than the toy base and more
    often on three-step problems (docs/scaling.md). The toy's float results differ
    between machines (MKL picks its kernels by CPU and splits the products by thread), so its
    quality does too; the tests that need a right sample take them from these problems, with
    enough samples (56 in the GRPO run, 64 in STaR) that none right is rare at the lowest rate
    seen."""
    import toy

    folder = tmp_path_factory.mktemp("easy")
    out = {}
    for split in ("train", "test"):
        rows = [line for line in open(toy_paths[split]) if len(toy.parse_problem(json.loads(line)["problem"])[1]) == 3]
        out[split] = str(folder / f"{split}.jsonl")
        with open(out[split], "w") as f:
            f.writelines(rows)
    return out


@pytest.fixture(scope="session")
def grpo_whole(real_model, easy, tmp_path_factory):
    """A 2-rank, 2-step paper-preset grpo.py run on the realistic model: (out folder, stdout and
    stderr, a copy of the out folder as it stood once step 1 was logged and checkpointed). The
    copy is what a run killed right after its step-1 checkpoint leaves on disk (its checkpoint
    save hard-linked: a finished save is never written again, only deleted by the next one), so
    that the resume test needs no second run up to step 1."""
    out = tmp_path_factory.mktemp("grpo_whole")
    snap = tmp_path_factory.mktemp("grpo_step1") / "run"
    log = out.parent / (out.name + ".log")  # a file, not a pipe: a full pipe would stall the run
    cmd = TORCHRUN + ["--master_port", "29631", "grpo.py", "--model", real_model, "--train-data", easy["train"],
                      "--test-data", easy["test"], "--out", str(out)] + GRPO_FLAGS
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    ckpt, metrics, deadline = out / "checkpoint", out / "metrics.jsonl", time.time() + 500
    while proc.poll() is None and time.time() < deadline and not snap.exists():
        if metrics.exists() and '"step": 1' in metrics.read_text() and training.has_checkpoint(str(ckpt)):
            save = (ckpt / "latest").read_text().strip()
            shutil.copytree(out, snap, ignore=shutil.ignore_patterns("checkpoint", ".tmp-*"))
            shutil.copytree(ckpt / save, snap / "checkpoint" / save, copy_function=os.link)
            (snap / "checkpoint" / "latest").write_text(save + "\n")
        time.sleep(0.05)
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return out, text, snap


# --------------------------------------------------------------------------------------
# The model itself, and engine sizes (no engine)
# --------------------------------------------------------------------------------------


def test_realistic_model_shape(real_model, toy_paths):
    cfg = json.load(open(os.path.join(real_model, "config.json")))
    assert cfg["vocab_size"] == 128256 and cfg["max_position_embeddings"] == 1048576
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and cfg["head_dim"] == 64
    tok = utils.load_tokenizer(real_model)
    assert len(tok) < 1000 and tok.eos_token == "<|eot_id|>" and tok.pad_token_id != tok.eos_token_id
    prompt = utils.build_prompt(tok, "Start with 3. Add 4. What is the result?")
    assert prompt.startswith(realistic.PROMPT_START) and prompt.endswith(realistic.ASSISTANT_HEADER)
    # the chat template reaches the stages' prompts
    problems = utils.load_problems(toy_paths["test"], tokenizer=tok)
    assert all(p["prompt"].startswith(realistic.PROMPT_START) for p in problems)
    build = json.load(open(os.path.join(real_model, "build.json")))
    assert build["unused_mass_last"] < 0.01, build  # samples stay inside the tokenizer's ids


def _text_of(tok, n: int, line: str = "Step {i}: {i} + 4 = {j}\n") -> str:
    """A completion of n tokens of this tokenizer (toy steps, cut at n tokens), as the engine
    would have sampled it."""
    ids = tok("".join(line.format(i=i, j=i + 4) for i in range(1, 4000)), add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return tok.decode(ids[:n])


FIT_ROOM, FIT_SLACK = 8, 32
"""An engine sized from its run holds the run's longest sequence with at least FIT_ROOM tokens
of room (text re-encoded from sampled tokens, as z0 and z1 are, may take a few more tokens than
were sampled) and at most FIT_SLACK to spare; sized from the realistic model's config it would
be 1,048,576 tokens."""


def _fits(need: int, longest: int):
    assert longest + FIT_ROOM <= need <= longest + FIT_SLACK, (need, longest)


def test_engine_sizes_come_from_the_run(real_model):
    """grpo.py's and warmstart.py's engine sizes against the longest sequence each run sends its
    engine, built here as text from this tokenizer's own tokens: the engine holds it (need >=
    longest) and is sized from it, not from the config (need <= longest + FIT_SLACK)."""
    from infogain import backtrack_cue

    def grpo_need(a, mu_in_engine: bool) -> int:  # as grpo.main sizes its engine
        mu = sampling.mu_need(tok, a.mu_mode, a.mu_suffix, a.mu_max_tokens, a.mu_rollout_tokens)
        return sampling.trace_need(tok, P, a.max_tokens, grpo.VARIANTS[a.variant][0] == "backtrack",
                                   mu if mu_in_engine else 0)

    tok = utils.load_tokenizer(real_model)
    prompt = utils.build_prompt(tok, "Start with 3. Add 4. Multiply by 2. Subtract 5. What is the result?")
    P = len(utils.encode(tok, prompt))
    z0, cont = _text_of(tok, 64), _text_of(tok, 64)  # z0 and a continuation of --max-tokens 64 each
    ctx = prompt + backtrack_cue(z0)  # what a continuation is sampled from
    args = grpo.resolve_args(grpo.Args(model=real_model, max_tokens=64), 1)
    assert args.mu_max_tokens == 16 and args.mu_mode == "forced"
    # backtrack, mu elsewhere: the continuation after prompt + z0 + cue
    _fits(grpo_need(args, False), len(utils.encode(tok, ctx)) + 64)
    # mu in the same engine: its context x + z0 + z1 (z1 at most the whole continuation), the
    # suffix, 16 answer tokens
    mu_longest = len(utils.encode(tok, sampling.mu_context(ctx + cont, utils.MU_SUFFIX))) + 16
    _fits(grpo_need(args, True), mu_longest)
    rollout = grpo.resolve_args(grpo.Args(model=real_model, max_tokens=64, mu_mode="rollout",
                                          mu_rollout_tokens=100), 1)
    _fits(grpo_need(rollout, True), len(utils.encode(tok, ctx + cont)) + 100)
    direct = grpo.resolve_args(grpo.Args(model=real_model, variant="direct", max_tokens=64), 1)
    _fits(grpo_need(direct, True), P + 64)
    assert sampling.engine_length(real_model, 300) == 300  # never the config's 1,048,576
    assert sampling.engine_length(real_model, 5_000_000) == 1048576  # capped at the model's positions
    # warmstart's search: a node of --max-depth steps of --max-step-tokens each, then a rollout or an attempt
    w = warmstart.resolve_args(warmstart.Args(model=real_model, data="x", max_depth=6, max_step_tokens=40,
                                              max_tokens=300), 1)
    step = _text_of(tok, 40, line="{i} + 4 = {j}, ")
    node = prompt + "".join(step + w.step_delimiter for _ in range(6))
    _fits(warmstart.search_need(w, P), len(utils.encode(tok, node)) + 300)


def test_infogain_and_r1_engines_are_sized_from_the_run(real_model, toy_paths):
    """infogain.py and r1_analysis.py size their engines from what the run holds (prompts,
    sampled or given traces, mu's tokens), never the realistic model's 1,048,576 positions:
    each holds the run's longest sequence, built here as text, as `_fits` asks."""
    import infogain
    import r1_analysis

    tok = utils.load_tokenizer(real_model)
    problems = utils.load_problems(toy_paths["test"], limit=4)
    prompts = [utils.build_prompt(tok, p["problem"]) for p in problems]
    prompt = max(prompts, key=lambda x: len(utils.encode(tok, x)))
    z0, cont = _text_of(tok, 64), _text_of(tok, 64)
    # mu's context after the longest z1 (at most the whole continuation); the rollout mu appends no suffix
    mu_ctx = sampling.mu_context(prompt + infogain.backtrack_cue(z0) + cont, utils.MU_SUFFIX)
    a = infogain.Args(model=[real_model], max_tokens=64, mu_max_tokens=16)
    _fits(infogain.engine_need(real_model, a, problems, []), len(utils.encode(tok, mu_ctx)) + 16)
    rollout = infogain.Args(model=[real_model], max_tokens=64, mu_mode="rollout", mu_rollout_tokens=100)
    rollout_ctx = prompt + infogain.backtrack_cue(z0) + cont
    _fits(infogain.engine_need(real_model, rollout, problems, []), len(utils.encode(tok, rollout_ctx)) + 100)
    # given traces: mu's longest context is the last episode's
    z0 = "Step 1: 3 + 4 = 7\nThe answer is \\boxed{7}."
    trace = {"problem": problems[0]["problem"], "episodes": infogain.split_backtrack(
        infogain.backtrack_cue(z0) + " 1: 3 + 4 = 7\nThe answer is \\boxed{7}." * 20)}
    last = infogain.episode_contexts(utils.build_prompt(tok, trace["problem"]), trace["episodes"])[-1]
    longest = len(utils.encode(tok, sampling.mu_context(last, utils.MU_SUFFIX))) + 16
    assert longest > len(utils.encode(tok, prompt)) + 200  # the trace, not the prompts, sets the size
    _fits(infogain.engine_need(real_model, a, None, [trace]), longest)

    r, _ = r1_analysis.resolve(r1_analysis.Args(model=real_model, direct_model=real_model, generate=True, preset="toy"))
    needs = r1_analysis.engine_needs(r, problems, None, real_model, real_model)
    assert set(needs) == {real_model} and 200 < needs[real_model] < 5000  # one engine serves all three roles
    assert sampling.engine_length(real_model, needs[real_model]) == needs[real_model]


# --------------------------------------------------------------------------------------
# Sleep mode: the call order, on a recording engine (vLLM's CPU build has no sleep mode)
# --------------------------------------------------------------------------------------


class RecordingEngine:
    """Stands where the vLLM LLM would be; records the calls the Sampler makes on it."""

    def __init__(self, calls):
        self.calls = calls

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(("collective_rpc", method, sorted(dict(kwargs["weights_iterator"]))))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True


def _recording_sampler(sleep_mode: bool):
    calls = []
    s = object.__new__(sampling.Sampler)
    s.backend, s.llm, s.sleep_mode, s.asleep, s.dtype = "vllm", RecordingEngine(calls), sleep_mode, False, "fp32"
    return s, calls


def test_sleep_mode_call_order():
    model = torch.nn.Linear(2, 2)
    s, calls = _recording_sampler(True)
    out = sampling.update_asleep(s, lambda: calls.append(("update",)) or "stats", model)
    assert out == "stats"
    # level 2 (the weights are not copied to the host), the weights woken and overwritten, then the KV cache
    assert calls == [("sleep", 2), ("update",), ("wake_up", ["weights"]),
                     ("collective_rpc", "reload_weights", ["bias", "weight"]), ("reset_prefix_cache",),
                     ("wake_up", ["kv_cache"])] and not s.asleep
    # the model to sync may be what the update returns (star: the SFT's new model)
    calls.clear()
    sampling.update_asleep(s, lambda: model)
    assert [c[0] for c in calls] == ["sleep", "wake_up", "collective_rpc", "reset_prefix_cache", "wake_up"]
    # a failing update still wakes the engine (and syncs nothing); its weights were dropped: no sampling
    calls.clear()
    with pytest.raises(ZeroDivisionError):
        sampling.update_asleep(s, lambda: 1 / 0, model)
    assert calls == [("sleep", 2), ("wake_up", None)] and not s.asleep
    with pytest.raises(RuntimeError, match="weights were dropped"):
        s.generate(["x"])
    sampling.update_asleep(s, lambda: None, model)  # synced again: it samples (and sleeps) as before
    assert not s.weights_dropped
    # without sleep mode (CPU): no sleep, no wake-up, the sync alone
    s, calls = _recording_sampler(False)
    sampling.update_asleep(s, lambda: None, model)
    assert [c[0] for c in calls] == ["collective_rpc", "reset_prefix_cache"]


def test_sleep_mode_flag():
    assert sampling.resolve_sleep_mode("auto") is torch.cuda.is_available()
    assert sampling.resolve_sleep_mode("off") is False
    if not torch.cuda.is_available():
        with pytest.raises(utils.UserError, match="sleep-mode on needs vLLM on CUDA"):
            sampling.resolve_sleep_mode("on")
    with pytest.raises(utils.UserError, match="--sleep-mode must be auto, on or off"):
        sampling.resolve_sleep_mode("sometimes")


def test_eager_flag():
    """MRT_VLLM_EAGER: unset -> eager on CPU, compiled on CUDA; "0"/"1" as set; else one line."""
    assert sampling.resolve_eager(None, cuda=False) is True and sampling.resolve_eager("", cuda=False) is True
    assert sampling.resolve_eager(None, cuda=True) is False
    assert sampling.resolve_eager("0", cuda=False) is False and sampling.resolve_eager("1", cuda=True) is True
    with pytest.raises(utils.UserError, match="MRT_VLLM_EAGER must be 0 or 1"):
        sampling.resolve_eager("yes", cuda=False)


# --------------------------------------------------------------------------------------
# End to end (subprocesses)
# --------------------------------------------------------------------------------------


def test_grpo_paper_preset_two_ranks(grpo_whole):
    out, log, _ = grpo_whole
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["logprob_gap"] < 1e-3 for r in rows), rows  # the engine samples the trainer's weights
    # the reference model is there: step 2's policy moved away from it, when step 1 had a group with
    # signal to move it (every group's two samples alike, all right or all wrong, gives no update:
    # seen on a toy built with --seed 1, whose realistic model got every three-step problem right)
    assert rows[1]["kl"] > 0 or rows[0]["zero_std_groups"] == 1, rows
    # one pass per batch: the old policy is the policy (ratio exactly 1, nothing clipped), and at
    # step 1 the policy is the reference (the same computation on the same weights: kl 0)
    assert all(r["ratio_mean"] == 1.0 and r["clip_region"] == 0.0 for r in rows) and rows[0]["kl"] < 1e-9, rows
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    texts = [c["text"] for s in samples for c in s["completions"]]
    assert all(t.strip() for t in texts) and any("\\boxed{" in t for t in texts), texts  # solutions that end in an answer
    z0 = [json.loads(line)["z0"] for line in open(out / "z0.jsonl")]
    assert any(t.startswith("Step 1:") for t in z0), z0  # real solutions, decoded text
    evals = json.load(open(out / "eval.json"))
    outcomes = [c["outcome"] for s in samples for c in s["completions"]] + [evals["start"], evals["end"]]
    assert any(x > 0 for x in outcomes), (evals, samples)  # grading finds correct answers
    assert "max_model_len" in log and "1048576" not in log.split("max_model_len", 1)[1][:40]


def _export_checks(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    assert m.config.vocab_size == 128256 and m.get_input_embeddings().weight.shape[0] == 128256


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of
    their own: killing torchrun's process group would leave them running)."""
    import psutil

    root = psutil.Process(pid)
    for p in root.children(recursive=True) + [root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def test_resume_after_step_1_matches_uninterrupted_run(grpo_whole, real_model, easy):
    """The uninterrupted run's folder as it stood after its step-1 checkpoint (grpo_whole's copy:
    what a kill at that moment leaves) resumed under torchrun ends at the uninterrupted run's
    weights. A real SIGKILL of a run, then its resume, is tests/test_grpo.py's kill-and-resume
    test (one process, the toy)."""
    whole, _, snap = grpo_whole
    assert snap.exists(), "no copy: the run ended before its step-1 checkpoint was seen"
    assert training.checkpoint_extra(str(snap / "checkpoint"))["step"] == 1
    assert '"step": 2' not in (snap / "metrics.jsonl").read_text() and not (snap / "model").exists()
    # resumed in place: no other test reads the copy
    _run(TORCHRUN + ["--master_port", "29633", "grpo.py", "--model", real_model, "--train-data", easy["train"],
                     "--test-data", easy["test"], "--out", str(snap)] + GRPO_FLAGS + ["--resume"])
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "model" / "model.safetensors")), load_file(str(snap / "model" / "model.safetensors"))
    start = load_file(os.path.join(real_model, "model.safetensors"))
    assert a.keys() == b.keys() and set(start) <= set(a)  # the export may write the tied lm_head too
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    assert any(not torch.equal(a[k].float(), start[k].float()) for k in start), "nothing trained: the test proves nothing"
    assert [json.loads(line)["step"] for line in open(snap / "metrics.jsonl")] == [1, 2]


def test_export_loads_in_transformers_and_vllm(grpo_whole, real_model, toy_paths, tmp_path):
    """The export is the trainer's final weights: loaded by transformers, each of its tensors
    equals the run's last checkpoint (the fp32 master weights after step 2, restored here into a
    fresh trainer model) rounded to the config's bf16, tensor by tensor, and the weights moved
    from the start. Then vLLM: evaluate.py on the export, sized from its own lengths, its 4 x 2
    samples graded again from their text."""
    from transformers import AutoModelForCausalLM

    whole, _, _ = grpo_whole
    model_dir = str(whole / "model")
    _export_checks(model_dir)
    assert training.checkpoint_extra(str(whole / "checkpoint"))["step"] == 2  # saved at the last step
    trainer, _ = training.load_trainer(real_model, "auto", "cpu")
    training.load_checkpoint(str(whole / "checkpoint"), trainer)
    masters = trainer.state_dict()
    export = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    start = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.bfloat16).state_dict()
    assert masters.keys() == export.keys() == start.keys()
    for k, w in masters.items():
        assert w.dtype == torch.float32 and export[k].dtype == torch.bfloat16, k
        assert torch.equal(w.to(torch.bfloat16), export[k]), k
    assert any(not torch.equal(export[k], start[k]) for k in start), "nothing trained: the test proves nothing"
    tok = utils.load_tokenizer(model_dir)
    assert tok.chat_template and tok.eos_token == "<|eot_id|>"
    out = tmp_path / "eval"
    _run([sys.executable, "evaluate.py", "--models", f"grpo={model_dir}", "--data", toy_paths["test"], "--problems",
          "4", "--samples", "2", "--max-tokens", "64", "--modes", "parallel", "--out", str(out)])
    rows = [json.loads(line) for line in open(out / "samples" / "grpo.parallel.jsonl")]
    golds = [json.loads(line)["answer"] for line in open(toy_paths["test"])][:4]
    assert [(r["problem"], r["sample"]) for r in rows] == [(i, j) for i in range(4) for j in range(2)]
    for r in rows:
        assert r["gold"] == golds[r["problem"]] and 1 <= r["gen_tokens"] <= 64
        assert r["correct"] == utils.grade(utils.last_episode(r["text"]), r["gold"]), r
    curve = json.load(open(out / "curves.json"))["runs"]["grpo"]["modes"]["parallel"]
    assert curve["pass"][0] == pytest.approx(sum(r["correct"] for r in rows) / 8)  # 2 samples of each problem


def test_warmstart_and_star_single_process(real_model, easy, tmp_path):
    """Both stages in one process each, on three-step problems (`easy`): a trace needs a right
    leaf, a STaR example a right sample (64 of them)."""
    ws = tmp_path / "ws"
    _run([sys.executable, "warmstart.py", "--model", real_model, "--data", easy["train"], "--out", str(ws),
          "--preset", "toy", "--problems", "8", "--beam-width", "2", "--expansions", "2", "--rollouts", "2",
          "--max-depth", "6", "--attempts", "2", "--search-batch", "8", "--epochs", "1", "--batch-size", "4",
          "--micro-batch-size", "4", "--save-every", "0"])
    summary = json.load(open(ws / "summary.json"))
    assert summary["traces"]["count"] >= 1 and os.path.isfile(ws / "model" / "config.json")
    st = tmp_path / "star"
    _run([sys.executable, "star.py", "--method", "star", "--model", real_model, "--data", easy["train"],
          "--test-data", easy["test"], "--out", str(st), "--preset", "toy", "--iterations", "1",
          "--problems", "16", "--group-size", "4", "--max-tokens", "128", "--eval-problems", "4", "--eval-samples", "1",
          "--epochs", "1", "--batch-size", "4", "--micro-batch-size", "4"])
    summary = json.load(open(st / "summary.json"))
    assert summary["examples"] >= 1 and os.path.isfile(st / "model" / "config.json"), summary


def test_engine_that_cannot_start_is_one_line(real_model, toy_paths, tmp_path):
    """An engine asked for the config's whole 1,048,576-token context in a 1 GiB KV budget
    (--max-tokens that large; VLLM_CPU_KVCACHE_SPACE=1, the user's setting, which vLLM takes
    over the run's own size): one `error:` line per failing rank, naming the rank (one rank may
    fail alone), the model and vLLM's reason, no traceback from the ranks."""
    out = subprocess.run(TORCHRUN + ["--master_port", "29635", "grpo.py", "--model", real_model, "--variant", "direct",
                                     "--train-data", toy_paths["train"], "--test-data", toy_paths["test"],
                                     "--out", str(tmp_path / "g"), "--max-tokens", "1048576",
                                     "--steps", "1", "--group-size", "2", "--prompts-per-step", "1",
                                     "--micro-batch-size", "2"],
                         capture_output=True, text=True, env=dict(_env(), VLLM_CPU_KVCACHE_SPACE="1"), cwd=ROOT,
                         timeout=600)
    assert out.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", out.stderr), out.stderr[-4000:]  # the ranks exit 2
    errors = [l for l in out.stderr.splitlines() if "error: " in l and "could not start" in l]
    ranks = [re.search(r"error: rank (\d): ", l) for l in errors]  # torchrun may stop one rank before it says it
    assert errors and all(r and r.group(1) in "01" for r in ranks), out.stderr[-4000:]
    assert real_model in errors[0] and "KV cache" in errors[0] and "VLLM_CPU_KVCACHE_SPACE" in errors[0], errors
    assert "(1.0 GiB)" in errors[0], errors  # the budget the variable set
    assert "[rank0]: Traceback" not in out.stderr and "[rank1]: Traceback" not in out.stderr, out.stderr[-4000:]
    assert not (tmp_path / "g" / "model").exists()


def test_every_rank_error_is_printed_by_rank_0_only(tmp_path):
    """utils.run_main: a UserError that every rank meets alike (every_rank=True) is one line
    from rank 0 and silence elsewhere, exit 2 on every rank; other errors print on any rank."""
    code = """
import sampling
import training
import utils
def main(every):
    raise utils.UserError("the same everywhere", every_rank=every)
if __name__ == "__main__":
    import sys
    utils.run_main(main, sys.argv[1] == "1")
"""
    for rank, every, lines in (("0", "1", ["error: the same everywhere"]), ("1", "1", []),
                               ("1", "0", ["error: the same everywhere"])):
        r = subprocess.run([sys.executable, "-c", code, every], cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=ROOT, RANK=rank))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == lines, (rank, every, r.stderr)
