"""sampling.Sampler on the toy model with the real vLLM engine (CPU) and the transformers
fallback: agreement of the two backends, stop strings, n samples, seeded reproducibility,
and the key proof of the in-place sync: after `sync_weights`, vLLM samples from the new weights, even
for a prompt whose KV blocks were cached under the old ones.

It uses the session engine (`toy_sampler`, small KV blocks so a prompt spans several) and
syncs the base weights back after changing them."""

import os
import random

import pytest
import torch

import sampling
import toy
import training
import utils

from conftest import ENGINE_BLOCK as BLOCK  # KV-cache block size of the session engine (tokens)


@pytest.fixture(scope="module")
def engine(toy_sampler):
    return toy_sampler


@pytest.fixture(scope="module")
def hf_sampler(toy_paths):
    return sampling.Sampler(toy_paths["base"], backend="hf")


@pytest.fixture(scope="module")
def prompts(toy_paths, engine):
    records = utils.read_records(toy_paths["test"], ["problem", "answer"])[:4]
    return [utils.build_prompt(engine.tokenizer, r["problem"]) for r in records]


def trainer_logprobs(model, tokenizer, prompt, samples, temperature=1.0):
    """(tokens, samples) log-probs of each sample's tokens under `model` (training.completion_logprobs)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        lp, _, _ = training.completion_logprobs(model, [prompt_ids] * len(samples), [s.token_ids for s in samples],
                                                tokenizer.pad_token_id, temperature)  # (B, Tc)
    return [lp[i, : s.num_tokens] for i, s in enumerate(samples)]


def max_logprob_gap(model, tokenizer, prompt, samples, temperature=1.0):
    want = trainer_logprobs(model, tokenizer, prompt, samples, temperature)
    gaps = [(w - torch.tensor(s.logprobs)).abs().max().item() for w, s in zip(want, samples)]
    assert all(len(s.logprobs) == s.num_tokens == len(s.token_ids) > 0 for s in samples)
    return max(gaps)


def hf_greedy(model, tokenizer, prompt, max_tokens):
    """Greedy token ids from plain transformers (EOS included, as the Sampler reports it)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


# --------------------------------------------------------------------------------------
# The two backends on the base model
# --------------------------------------------------------------------------------------


def test_greedy_vllm_equals_hf(engine, hf_sampler, prompts):
    v = engine.generate(prompts, temperature=0.0, max_tokens=80)
    h = hf_sampler.generate(prompts, temperature=0.0, max_tokens=80)
    for gv, gh in zip(v, h):
        assert len(gv) == len(gh) == 1
        a, b = gv[0], gh[0]
        assert (a.text, a.token_ids, a.finish_reason, a.prompt_tokens) == (b.text, b.token_ids, b.finish_reason, b.prompt_tokens)
        assert a.finish_reason == "stop" and a.token_ids[-1] == engine.tokenizer.eos_token_id  # EOS counted
        assert "\\boxed{" in a.text and a.num_tokens == len(a.token_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_trainer(engine, hf_sampler, prompts, toy_paths, temperature):
    model = utils.load_model(toy_paths["base"]).eval()
    for sampler in (engine, hf_sampler):
        groups = sampler.generate(prompts[:2], n=3, temperature=temperature, max_tokens=60, seed=5)
        for prompt, group in zip(prompts, groups):
            assert max_logprob_gap(model, engine.tokenizer, prompt, group, temperature) < 1e-3, sampler.backend


def test_stop_strings_and_n(engine, hf_sampler, prompts):
    pad = engine.tokenizer.pad_token_id
    for sampler in (engine, hf_sampler):
        groups = sampler.generate(prompts[:2], n=8, temperature=1.0, max_tokens=80, stop=["\nStep 3"], seed=1)
        assert [len(g) for g in groups] == [8, 8]
        # n samples at temperature 1 differ (a sharp toy base, --seed 1, wrote two steps the same
        # way in 4 samples of a prompt: 8 of each of two prompts)
        assert any(len({tuple(s.token_ids) for s in g}) > 1 for g in groups), "n samples at temperature 1 should differ"
        for g in groups:
            for s in g:
                assert "Step 3" not in s.text and s.text.startswith("Step 1:")
                decoded = engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                assert decoded.startswith(s.text) and s.num_tokens == len(s.token_ids) == len(s.logprobs)
                assert pad not in s.token_ids  # finished sequences of a batch are not padded
                if decoded != s.text:  # cut at the stop string
                    assert decoded[len(s.text):].startswith("\nStep 3") and s.finish_reason == "stop"
    # greedy with a stop string: both backends stop at the same token
    v = engine.generate(prompts, temperature=0.0, max_tokens=80, stop=["\nStep 3"])
    h = hf_sampler.generate(prompts, temperature=0.0, max_tokens=80, stop=["\nStep 3"])
    assert [(g[0].text, g[0].token_ids) for g in v] == [(g[0].text, g[0].token_ids) for g in h]
    # max_tokens reached: finish_reason "length"
    for sampler in (engine, hf_sampler):
        s = sampler.generate(prompts[:1], temperature=0.0, max_tokens=5)[0][0]
        assert s.num_tokens == 5 and s.finish_reason == "length"


def test_token_id_prompts(engine, prompts):
    ids = engine.tokenizer(prompts[0])["input_ids"]
    a = engine.generate([prompts[0]], temperature=0.0, max_tokens=40)[0][0]
    b = engine.generate([ids], temperature=0.0, max_tokens=40)[0][0]
    assert a.token_ids == b.token_ids and a.prompt_tokens == b.prompt_tokens == len(ids)


def test_seeded_reproducibility(engine, hf_sampler, prompts):
    a, b, c, d = prompts

    def ids(groups):
        return [[s.token_ids for s in g] for g in groups]

    first = ids(engine.generate([a, b], n=2, temperature=1.0, max_tokens=40, seed=7))
    assert ids(engine.generate([a, b], n=2, temperature=1.0, max_tokens=40, seed=7)) == first
    # a prompt's samples do not depend on the prompts batched with it (same position, same seed)
    assert ids(engine.generate([a], n=2, temperature=1.0, max_tokens=40, seed=7)) == first[:1]
    assert ids(engine.generate([a, c, d, b], n=2, temperature=1.0, max_tokens=40, seed=7))[0] == first[0]
    # n samples of one seeded request differ from each other, and another seed gives others
    many = ids(engine.generate([a], n=6, temperature=1.0, max_tokens=40, seed=7))[0]
    assert len({tuple(x) for x in many}) > 1
    assert ids(engine.generate([a, b], n=2, temperature=1.0, max_tokens=40, seed=8)) != first
    # transformers fallback: same seed, same samples
    h1 = ids(hf_sampler.generate([a, b], n=2, temperature=1.0, max_tokens=40, seed=7))
    assert ids(hf_sampler.generate([a, b], n=2, temperature=1.0, max_tokens=40, seed=7)) == h1
    assert ids(hf_sampler.generate([a, b], n=2, temperature=1.0, max_tokens=40, seed=8)) != h1


def test_engine_mode_follows_the_eager_setting(engine):
    """The session engine starts in the mode MRT_VLLM_EAGER asks (conftest sets "1")."""
    cfg = engine.llm.llm_engine.vllm_config.model_config
    assert cfg.enforce_eager is sampling.resolve_eager(os.environ.get("MRT_VLLM_EAGER"), torch.cuda.is_available())


def test_cpu_kv_cache_bytes_hand_computed():
    """K and V of every layer for max_num_seqs sequences of whole blocks (one more each), capped."""
    # the toy's shape: 3 layers, 2 KV heads of 64, fp32: 3,072 bytes a token; 276 tokens -> 3 + 1 blocks of 128
    assert sampling.cpu_kv_cache_bytes(3, 2, 64, 4, 276) == 256 * 4 * 128 * 3072
    assert sampling.cpu_kv_cache_bytes(3, 2, 64, 4, 256, max_num_seqs=8, block_size=32) == 8 * 9 * 32 * 3072
    # Llama-3.1-8B in bf16 (32 layers, 8 KV heads of 128): 131,072 bytes a token, over the cap at 4,096 tokens
    assert sampling.cpu_kv_cache_bytes(32, 8, 128, 2, 4096) == sampling.CPU_KV_CAP == 2 << 30
    assert sampling.cpu_kv_cache_bytes(32, 8, 128, 2, 64, max_num_seqs=1, cap=1 << 40) == 2 * 128 * 131072


def test_engine_kv_cache_is_sized_from_its_length(engine, toy_paths):
    """Without VLLM_CPU_KVCACHE_SPACE a CPU engine is given the KV cache its length needs (the
    session engine: the model's positions, blocks of 32), not a fixed size."""
    if torch.cuda.is_available() or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        pytest.skip("the KV cache is sized from the run only on CPU without VLLM_CPU_KVCACHE_SPACE")
    import json

    cfg = json.load(open(os.path.join(toy_paths["base"], "config.json")))
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4  # fp32 on CPU
    blocks = -(-engine.max_model_len // BLOCK) + 1
    want = 256 * blocks * BLOCK * per_token
    assert engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == want < sampling.CPU_KV_CAP
    assert sampling.model_kv_cache_bytes(toy_paths["base"], engine.max_model_len, "float32", block_size=BLOCK) == want


def test_engine_leaves_the_process_single(engine, toy_paths):
    """vLLM starts a process group of one in a plain process; that must not turn on
    distributed training (FSDP, external_launcher for the next engine, collectives)."""
    from torch.distributed.tensor import DTensor

    assert not utils.is_distributed() and utils.world_size() == 1 and utils.rank() == 0
    model = training.shard_model(utils.load_model(toy_paths["base"]))
    assert not any(isinstance(p, DTensor) for p in model.parameters())


# --------------------------------------------------------------------------------------
# In-place weight sync and the prefix cache
# --------------------------------------------------------------------------------------


def long_prompt(tokenizer, n_shots=4, seed=0):
    """Worked toy problems, then a new one: a prompt spanning several KV blocks."""
    rng = random.Random(seed)
    text = ""
    for _ in range(n_shots):
        p = toy.make_problem(rng)
        lines, final = toy.solution_steps(p["start"], p["ops"])
        text += utils.build_prompt(tokenizer, p["problem"]) + toy.render_solution(lines, final) + "\n\n"
    return text + utils.build_prompt(tokenizer, toy.make_problem(rng)["problem"])


def perturb(model, tokenizer, steps=3, lr=0.1):
    """A few SGD steps of real cross-entropy on other text: wrong arithmetic, boxed 7."""
    texts = [utils.build_prompt(tokenizer, toy.make_problem(random.Random(100 + i))["problem"])
             + "Step 1: 1 + 1 = 7\nStep 2: 7 * 7 = 7\nThe answer is \\boxed{7}" for i in range(8)]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        lp, mask, _ = training.completion_logprobs(model, [s[:1] for s in seqs], [s[1:] for s in seqs],
                                                   tokenizer.pad_token_id)  # (B, T-1)
        loss = -(lp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_sync_weights_resets_stale_prefix_cache(engine, hf_sampler, toy_paths):
    tok = engine.tokenizer
    prompt = long_prompt(tok)
    n_prompt = len(tok(prompt)["input_ids"])
    assert n_prompt >= 5 * BLOCK, n_prompt
    trainer = utils.load_model(toy_paths["base"]).eval()
    try:
        # Before the update: vLLM caches the prompt's KV blocks (and agrees with transformers).
        before = engine.generate([prompt], temperature=0.0, max_tokens=60)[0][0]
        assert before.token_ids == hf_greedy(trainer, tok, prompt, 60)

        perturb(trainer, tok)
        after = hf_greedy(trainer, tok, prompt, 60)
        assert after != before.token_ids, "the update should change the greedy output"

        # Weights alone, no cache reset: the cached blocks from the old weights are reused,
        # and the samples are not the trainer's. (This is what sync_weights must prevent.)
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": training.iter_full_params(trainer)})
        stale = engine.generate([prompt], n=2, temperature=1.0, max_tokens=40, seed=3)[0]
        assert max_logprob_gap(trainer, tok, prompt, stale) > 0.05

        engine.sync_weights(trainer)
        greedy = engine.generate([prompt], temperature=0.0, max_tokens=60)[0][0]
        assert greedy.token_ids == after
        fresh = engine.generate([prompt], n=4, temperature=1.0, max_tokens=60, seed=3)[0]
        assert max_logprob_gap(trainer, tok, prompt, fresh) < 1e-3
        # a second prompt sharing the (now recomputed) prefix reuses the new cache correctly
        prompt2 = prompt + "Step 1:"
        s2 = engine.generate([prompt2], n=2, temperature=1.0, max_tokens=40, seed=4)[0]
        assert max_logprob_gap(trainer, tok, prompt2, s2) < 1e-3

        # the transformers fallback syncs too
        hf_sampler.sync_weights(trainer)
        assert hf_sampler.generate([prompt], temperature=0.0, max_tokens=60)[0][0].token_ids == after
    finally:  # back to the base weights, for the other tests of this module
        base = utils.load_model(toy_paths["base"])
        engine.sync_weights(base)
        hf_sampler.sync_weights(base)
    assert engine.generate([prompt], temperature=0.0, max_tokens=60)[0][0].token_ids == before.token_ids


def test_hf_fallback_sync_copies_in_place_and_checks_names(hf_sampler, toy_paths):
    """The transformers fallback copies a trainer's weights tensor by tensor into its own storage
    (no full state dict is built), in its own dtype; weights that do not match its model are an
    error naming them, raised once every tensor went by (under torchrun every rank gathers all)."""
    import weakref

    trainer = utils.load_model(toy_paths["base"], "fp32", "cpu")
    ptrs = {n: t.data_ptr() for n, t in hf_sampler.model.state_dict().items()}
    real, alive = training.iter_full_params, []

    def watched(*a, **k):  # how many of the tensors handed out before are still held, at each next one
        refs = []
        for name, t in real(*a, **k):
            alive.append(len({id(r()) for r in refs if r() is not None}))  # a tied pair is one tensor
            refs.append(weakref.ref(t))
            yield name, t
            del t

    try:
        with torch.no_grad():
            trainer.model.norm.weight.mul_(1.5)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(training, "iter_full_params", watched)
            hf_sampler.sync_weights(trainer)
        assert len(alive) == len(trainer.state_dict()) and max(alive) <= 1  # one tensor at a time
        own = hf_sampler.model.state_dict()
        assert {n: t.data_ptr() for n, t in own.items()} == ptrs
        assert torch.equal(own["model.norm.weight"], trainer.model.norm.weight)
        other = torch.nn.Linear(2, 2)
        with pytest.raises(RuntimeError, match=r"do not match .*not in it: \['weight', 'bias'\]"):
            hf_sampler.sync_weights(other)
    finally:
        hf_sampler.sync_weights(utils.load_model(toy_paths["base"], "fp32", "cpu"))
    assert torch.equal(hf_sampler.model.model.norm.weight, utils.load_model(toy_paths["base"]).model.norm.weight)


def test_model_to_sync_is_read_on_the_host_in_the_engine_dtype(toy_paths, monkeypatch):
    """sampling.load_on_host (star.py's start and base weights): on the CPU, in the dtype the
    engine runs in on this process's device: bf16 for 'auto' when there is a GPU (mocked here),
    fp32 on a CPU-only machine, as asked otherwise."""
    m = sampling.load_on_host(toy_paths["base"])
    assert m.device.type == "cpu" and {p.dtype for p in m.parameters()} == {torch.float32}
    assert {p.dtype for p in sampling.load_on_host(toy_paths["base"], "bf16").parameters()} == {torch.bfloat16}
    monkeypatch.setattr(utils, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # an Ampere or newer GPU
    m = sampling.load_on_host(toy_paths["base"])
    assert m.device.type == "cpu" and {p.dtype for p in m.parameters()} == {torch.bfloat16}
