"""Numerics of training: the chunked log-probabilities equal the full log-softmax formula
(values and gradients), and bf16 compute keeps fp32 master weights that move at lr 1e-6
where pure-bf16 parameters would not."""

import os
import random
import sys

import pytest
import torch

import toy
import training
import utils


def old_completion_logprobs(model, ctx_ids, comp_ids, pad_id, temperature, with_entropy=False):
    """The formula training used before: an fp32 log_softmax over the whole vocabulary."""
    ctx, ctx_mask = training.pad_sequences(ctx_ids, pad_id, left=True)  # (B, Tp)
    comp, comp_mask = training.pad_sequences(comp_ids, pad_id)  # (B, Tc)
    ids, attn = torch.cat([ctx, comp], 1), torch.cat([ctx_mask, comp_mask], 1)  # (B, Tp + Tc)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, Tp + Tc)
    Tc = comp.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=Tc + 1).logits
    logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, Tc, V)
    logp = logp_all.gather(-1, comp[:, :, None]).squeeze(-1)  # (B, Tc)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach() if with_entropy else None  # (B, Tc)
    return logp, comp_mask.float(), entropy


def toy_batch(tok, n=4):
    ctx, comp = [], []
    for i in range(n):
        p = toy.make_problem(random.Random(i))
        lines, final = toy.solution_steps(p["start"], p["ops"])
        ctx.append(tok(utils.build_prompt(tok, p["problem"]))["input_ids"])
        comp.append(tok(toy.render_solution(lines, final), add_special_tokens=False)["input_ids"][: 5 + 7 * i]
                    + [tok.eos_token_id])
    return ctx, comp


@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_completion_logprobs_equal_full_log_softmax_on_toy(toy_paths, temperature):
    tok = utils.load_tokenizer(toy_paths["base"])
    model = utils.load_model(toy_paths["base"], "fp32", "cpu")
    ctx, comp = toy_batch(tok)
    adv = torch.randn(4, max(len(c) for c in comp), generator=torch.Generator().manual_seed(0))  # (B, Tc)
    results = []
    for fn in (old_completion_logprobs, training.completion_logprobs):
        model.zero_grad(set_to_none=True)
        logp, mask, ent = fn(model, ctx, comp, tok.pad_token_id, temperature, with_entropy=True)
        (logp * adv * mask).sum().backward()
        results.append((logp.detach(), mask, ent, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, m0, e0, g0), (lp1, m1, e1, g1) = results
    assert torch.equal(m0, m1) and m0.sum() > 20
    # a few fp32 spacings at the logits' scale (~20, spacing 1.9e-6): both are fp32 roundings of z - lse
    assert (lp0 - lp1).abs().max().item() < 5e-6
    assert (e0 - e1).abs().max().item() < 1e-5 and e0.abs().max() > 0.1
    scale = max(g.abs().max().item() for g in g0.values())
    assert scale > 0
    assert max((g0[n] - g1[n]).abs().max().item() for n in g0) < 1e-5 * scale


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_logprobs_in_chunks_equal_full_formula(dtype, inplace):
    """Chunks that do not divide T, logits longer than the targets, bf16 logits, the
    gradient written into the logits' own storage or not."""
    g = torch.Generator().manual_seed(0)
    leaf = (3 * torch.randn(3, 8, 50, generator=g)).to(dtype).requires_grad_(True)  # (B, T + 1, V)
    targets = torch.randint(0, 50, (3, 7), generator=g)  # (B, T)
    w = torch.randn(3, 7, generator=g)  # (B, T)
    full = torch.log_softmax(leaf[:, :7].float() / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    (want,) = torch.autograd.grad((full * w).sum(), leaf)
    ent = training.token_entropy(leaf, 7, 0.7, chunk=3)  # (B, T)
    p = torch.softmax(leaf[:, :7].float() / 0.7, -1)  # (B, T, V)
    assert (ent - -(p * p.log()).sum(-1)).abs().max().item() < 1e-5
    logits = leaf * 1  # (B, T + 1, V): a non-leaf, as a model's output
    got = training.sampled_logprobs(logits, targets, 0.7, chunk=3, inplace=inplace)  # (B, T)
    (grad,) = torch.autograd.grad((got * w).sum(), leaf)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    assert (got - full).abs().max().item() < 1e-5
    assert grad[:, 7:].abs().max().item() == 0.0
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (grad.float() - want.float()).abs().max().item() < tol
    assert torch.equal(logits, leaf) != inplace  # in place: the logits now hold their gradient


def test_inplace_backward_fails_loudly_when_the_logits_are_saved_elsewhere():
    leaf = torch.randn(2, 4, 10).requires_grad_(True)  # (B, T + 1, V)
    logits = torch.tanh(leaf)  # tanh saves its output for its own backward
    lp = training.sampled_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), inplace=True)  # (B, T)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


def adamw_deltas(model, tok, steps=3, lr=1e-6):
    """|change| of every parameter entry after `steps` AdamW steps (lr 1e-6, the paper's)
    of completion NLL on toy solutions, measured in fp32."""
    ctx, comp = toy_batch(tok, n=8)
    start = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        lp, mask, _ = training.completion_logprobs(model, ctx, comp, tok.pad_token_id)  # (B, Tc)
        (-(lp * mask).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    moments = {v.dtype for st in opt.state.values() for k, v in st.items() if k.startswith("exp_avg")}
    return torch.cat([(p.detach().float() - start[n]).abs().flatten() for n, p in model.named_parameters()]), moments


def test_bf16_compute_moves_fp32_master_weights_at_lr_1e6(toy_paths):
    """bf16 compute over fp32 master weights (load_trainer, --dtype bf16 in one process):
    the forward runs in bf16, the parameters and Adam moments are fp32, and 3 steps at lr 1e-6
    move almost every entry by about lr per step. Pure-bf16 parameters round most updates away."""
    tok = utils.load_tokenizer(toy_paths["base"])
    model, ref = training.load_trainer(toy_paths["base"], "bf16", "cpu")
    assert ref is None and model.save_dtype == torch.float32  # the toy's config names float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    ids = torch.tensor([tok("Problem: 1")["input_ids"]])
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # the compute is bf16
    master, moments = adamw_deltas(model, tok)
    assert moments == {torch.float32} and {p.dtype for p in model.parameters()} == {torch.float32}
    share_master = (master > 0).float().mean().item()
    steps_lr = 3 * 1e-6
    assert share_master > 0.95, share_master
    assert 0.3 * steps_lr < master.median().item() <= 1.01 * steps_lr, master.median().item()

    pure = utils.load_model(toy_paths["base"], "bf16", "cpu")
    share_pure = (adamw_deltas(pure, tok)[0] > 0).float().mean().item()
    assert share_pure < 0.2, share_pure
    print(f"entries changed after 3 AdamW steps at lr 1e-6: fp32 master {share_master:.2%}, pure bf16 {share_pure:.2%}")


# --------------------------------------------------------------------------------------
# Host reads: grpo_loss's metrics stay on the device; policy_update reads them once
# --------------------------------------------------------------------------------------


def old_grpo_loss_metrics(logp, old_logp, ref_logp, advantages, mask, eps_low=0.2, eps_high=0.2, beta=0.0,
                          sampler_logp=None, is_cap=3.0):
    """grpo_loss's metrics as grpo.py computed them before: one `.item()` per value."""
    mask = mask.float()
    adv = advantages if advantages.dim() == 2 else advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    is_weight = torch.clamp(torch.exp(old_logp - sampler_logp), max=is_cap) if sampler_logp is not None else None
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1 if beta != 0.0 else None
    ntok = mask.sum().clamp(min=1.0)
    mean = lambda x: ((x * mask).sum() / ntok).item()  # noqa: E731
    low = ((ratio < 1 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    return {"clip_low": mean(low), "clip_high": mean(high), "clip_region": mean(torch.maximum(low, high)),
            "ratio": mean(ratio), "ratio_max": (ratio * mask).max().item(), "tokens": mask.sum().item(),
            "kl": mean(kl) if kl is not None else 0.0,
            "is_weight": mean(is_weight) if is_weight is not None else 1.0}


def test_grpo_loss_metrics_are_device_tensors_equal_to_the_old_reads():
    import grpo

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 9, generator=g) * 3  # (B, T)
    old = logp + 0.4 * torch.randn(4, 9, generator=g)  # ratios away from 1: some clipped either way
    ref, samp = logp + 0.3 * torch.randn(4, 9, generator=g), old + 0.5 * torch.randn(4, 9, generator=g)
    mask = (torch.arange(9)[None] < torch.tensor([9, 3, 6, 1])[:, None]).float()  # (B, T)
    for adv, kw in ((torch.tensor([1.0, -0.5, 2.0, -1.0]), {}),
                    (torch.randn(4, 9, generator=g), dict(beta=0.04, sampler_logp=samp, eps_high=0.28))):
        _, m = grpo.grpo_loss(logp, old, ref, adv, mask, **kw)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())  # nothing read to the host
        want = old_grpo_loss_metrics(logp, old, ref, adv, mask, **kw)
        (got,) = training.read_metrics([m])
        assert got == want  # exactly: the same fp32 values, read at once
        assert 0 < want["clip_low"] < 1 and 0 < want["clip_high"] < 1 and want["tokens"] == 19.0


class RecordingSync(torch.nn.Module):
    """The toy model, plus FSDP2's `set_requires_gradient_sync` recorded (one process has none)."""

    def __init__(self, model, calls):
        super().__init__()
        self.inner, self.calls = model, calls

    def forward(self, **kw):
        return self.inner(**kw)

    def set_requires_gradient_sync(self, on):
        self.calls.append(on)


def test_policy_update_reads_the_device_once_and_syncs_gradients_on_the_last_micro_batch(toy_paths, monkeypatch):
    """grpo.policy_update on the toy, 3 micro-batches x 2 passes: its metrics equal the per-value reads
    of before (computed here from the model as it was), the device is read once (one `tolist`, no
    `item`), and gradient sync is off for every micro-batch but the last of each optimizer step."""
    import copy
    import dataclasses

    import grpo

    tok = utils.load_tokenizer(toy_paths["base"])
    ctx, comp = toy_batch(tok, n=6)
    g = torch.Generator().manual_seed(1)
    rows = [{"ctx_ids": c, "token_ids": t, "num_tokens": len(t),
             "sampler_logp": (-torch.rand(len(t), generator=g)).tolist()} for c, t in zip(ctx, comp)]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    args = dataclasses.replace(grpo.Args(), micro_batch_size=2, num_iterations=2, temperature=1.0, beta=0.0,
                               max_tokens=64)
    calls = []
    model = RecordingSync(utils.load_model(toy_paths["base"], "fp32", "cpu"), calls)
    start = copy.deepcopy(model.inner)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    reads = {"item": 0, "tolist": 0, "__float__": 0}  # by the project's code (AdamW reads its CPU step counts)
    ours = {os.path.abspath(m.__file__) for m in (grpo, training, utils)}
    for name in reads:
        def counted(self, *a, _f=getattr(torch.Tensor, name), _n=name, **k):
            reads[_n] += os.path.abspath(sys._getframe(1).f_code.co_filename) in ours
            return _f(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    stats, grad_norm = grpo.policy_update(model, None, opt, sched, rows, adv, args, tok.pad_token_id)
    monkeypatch.undo()
    assert reads == {"item": 0, "tolist": 1, "__float__": 0}
    assert calls == [False, False, True] * 2 and len(stats) == 6 and grad_norm > 0
    for k in range(3):  # the first pass, from the starting weights: the reads of before
        mb = rows[2 * k:2 * k + 2]
        c, t = [r["ctx_ids"] for r in mb], [r["token_ids"] for r in mb]
        logp, mask, ent = training.completion_logprobs(start, c, t, tok.pad_token_id, 1.0, with_entropy=True)
        samp = training.pad_sequences([r["sampler_logp"] for r in mb], 0, dtype=torch.float)[0]
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv[2 * k:2 * k + 2], mask, max_completion_length=64,
                                 num_items=float(sum(r["num_tokens"] for r in rows)))
        want = {**old_grpo_loss_metrics(logp, logp.detach(), None, adv[2 * k:2 * k + 2], mask),
                "entropy": ((ent * mask).sum() / mask.sum().clamp(min=1)).item(),
                "logprob_gap": ((samp - logp.detach()).abs() * mask).sum().item() / max(1.0, mask.sum().item()),
                "loss": loss.item()}
        assert stats[k] == want, k


def test_chunk_positions_by_device_memory():
    """Positions per log-prob chunk: on CPU (no free bytes) 2^20 logits, as before; on CUDA as many
    as keep 4 fp32 rows within 1/8 of the free bytes, capped at 2^26 logits, never below the CPU's."""
    V = 128_256
    assert training._chunk_positions(V) == 8 and training._chunk_positions(50) == 20_971  # 2^20 // V
    assert training._chunk_positions(V, 2**30) == 65  # 2^30 // (8 * 4 * 4 * V) = 1073741824 // 16416768
    assert training._chunk_positions(V, 16 * 2**30) == 523  # 1046 fit; the cap: 2^26 // V
    assert training._chunk_positions(V, 100 * 2**20) == 8 and training._chunk_positions(V, 0) == 8  # the floor
    assert training._chunk_positions(32_000, 2**30) == 262  # 1073741824 // (128 * 32000)
    assert training.free_device_bytes("cpu") is None


def test_free_device_bytes_counts_the_allocators_cache(monkeypatch):
    """Free on a CUDA device: the driver's free bytes plus what torch's allocator reserved and does
    not use (the calls mocked: no GPU here)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (5 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1 << 30)
    assert training.free_device_bytes("cuda:0") == 7 << 30
