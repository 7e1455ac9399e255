"""Numerics of training: the chunked log-probabilities equal the full log-softmax formula
(values and gradients), and bf16 compute keeps fp32 master weights that move at lr 1e-6
where pure-bf16 parameters would not."""

import random

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
