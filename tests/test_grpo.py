"""Tests of grpo.py: the GRPO math against hand-computed cases, gradient equivalences
(micro-batches, ranks, on-policy = policy gradient), the MRT reward pieces, and real runs on
the toy model (reward improves; single process and 2-rank FSDP; kill and resume)."""

import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grpo  # noqa: E402
import sampling  # noqa: E402
import toy  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

# --------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0])  # two groups of 4
    s_group = math.sqrt(1 / 3)  # Bessel std of [1, 0, 0, 1]: sqrt(4 * 0.25 / 3)
    s_batch = math.sqrt((2 * 0.75**2 + 6 * 0.25**2) / 7)  # std of all 8 around 0.25
    first = torch.tensor([0.5, -0.5, -0.5, 0.5])
    for scale, div in (("group", s_group + 1e-4), ("batch", s_batch + 1e-4), ("none", 1.0)):
        a = grpo.group_advantages(r, 4, scale)
        assert torch.allclose(a[:4], first / div, atol=1e-6), scale
        assert torch.equal(a[4:], torch.zeros(4)), scale  # equal rewards: exactly 0


def test_equal_rewards_give_exactly_zero_never_nan():
    for value in (0.0, 1.0, 0.1, 1 / 3, -2.7):
        r = torch.full((6,), value)
        for scale in ("group", "batch", "none"):
            a = grpo.group_advantages(r, 3, scale)
            assert torch.equal(a, torch.zeros(6)), (value, scale)
    assert torch.equal(grpo.group_advantages(torch.tensor([0.3, 0.9]), 1), torch.zeros(2))  # G = 1: no NaN


# --------------------------------------------------------------------------------------
# grpo_loss: every normalization by hand
# --------------------------------------------------------------------------------------

MASK = torch.tensor([[1.0, 1, 0], [1, 1, 1]])  # lengths 2 and 3


def test_loss_normalizations_on_policy():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    adv = torch.tensor([1.0, -2.0])  # per-token loss: row 0 -> -1, row 1 -> +2 (ratio 1)
    cases = [  # masked sums: row 0 -2 (2 tokens), row 1 +6 (3 tokens)
        ("grpo", {}, (-2 / 2 + 6 / 3) / 2),
        ("bnpo", {}, 4 / 5),
        ("dr_grpo", {}, 4 / (2 * 3)),
        ("dr_grpo", {"max_completion_length": 4}, 4 / (2 * 4)),
        ("dapo", {}, 4 / 5),
        ("dapo", {"num_items": 10}, 4 / 10),
    ]
    for loss_type, kw, want in cases:
        loss, m = grpo.grpo_loss(logp, logp.detach(), None, adv, MASK, loss_type=loss_type, **kw)
        assert loss.item() == pytest.approx(want, abs=1e-6), (loss_type, kw)
        assert m["ratio"] == pytest.approx(1.0) and m["clip_region"] == 0.0


def test_loss_clipping_kl_and_importance_weights():
    old = torch.zeros(2, 3)
    # ratios: row 0 (A = +1): 1.5 (clipped to 1.2), 1.1, pad; row 1 (A = -2): 0.5 (clipped to 0.8), 1.5, 1.0
    logp = torch.log(torch.tensor([[1.5, 1.1, 1.0], [0.5, 1.5, 1.0]]))
    adv = torch.tensor([1.0, -2.0])
    # -min(r A, clip(r) A): row 0: -1.2, -1.1 ; row 1: 1.6, 3.0 (1.5 * 2 > 1.2 * 2: unclipped), 2.0
    loss, m = grpo.grpo_loss(logp, old, None, adv, MASK, loss_type="bnpo")
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 1.6 + 3.0 + 2.0) / 5, abs=1e-6)
    assert m["clip_high"] == pytest.approx(1 / 5) and m["clip_low"] == pytest.approx(1 / 5)
    assert m["clip_region"] == pytest.approx(2 / 5)
    assert m["ratio"] == pytest.approx((1.5 + 1.1 + 0.5 + 1.5 + 1.0) / 5, abs=1e-6)
    # asymmetric clip range: eps_high 0.6 leaves 1.5 unclipped for A > 0
    loss, _ = grpo.grpo_loss(logp, old, None, adv, MASK, loss_type="bnpo", eps_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 1.1 + 1.6 + 3.0 + 2.0) / 5, abs=1e-6)
    # k3 KL with ref - logp = log 2 on every token: 2 - log 2 - 1
    on = torch.zeros(2, 3)
    ref = on + math.log(2)
    loss, m = grpo.grpo_loss(on, on, ref, torch.zeros(2), MASK, loss_type="bnpo", beta=0.1)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-6)
    assert m["kl"] == pytest.approx(1 - math.log(2), abs=1e-6)
    # truncated importance weight min(exp(old - sampler), C): exp(log 5) = 5 -> 3 on row 0, 0.5 on row 1
    samp = torch.tensor([[-math.log(5)] * 3, [math.log(2)] * 3])
    loss, m = grpo.grpo_loss(on, on, None, adv, MASK, loss_type="bnpo", sampler_logp=samp, is_cap=3.0)
    assert loss.item() == pytest.approx((-1 * 3 * 2 + 2 * 0.5 * 3) / 5, abs=1e-6)
    assert m["is_weight"] == pytest.approx((3 * 2 + 0.5 * 3) / 5, abs=1e-6)


def test_on_policy_gradient_is_the_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 4).log_softmax(-1).requires_grad_(True)
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3, 0.4])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, loss_type="dapo")
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -adv[:, None] * mask / mask.sum(), atol=1e-7)  # -(1/N) sum_t A grad log p
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, mask, loss_type="grpo")
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g, -adv[:, None] * mask / mask.sum(1, keepdim=True) / 3, atol=1e-7)


# --------------------------------------------------------------------------------------
# Gradient of one generation batch: whole, 4 accumulated micro-batches, 2 ranks
# --------------------------------------------------------------------------------------

GRAD_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    import grpo

    def batch():
        g = torch.Generator().manual_seed(0)
        B, T, V, D = 8, 6, 5, 4
        feats = torch.randn(B, T, D, generator=g)
        tokens = torch.randint(0, V, (B, T), generator=g)
        lengths = torch.tensor([6, 2, 4, 5, 1, 6, 3, 4])
        mask = (torch.arange(T)[None] < lengths[:, None]).float()
        adv = torch.randn(B, generator=g)
        old_shift = 0.3 * torch.randn(B, T, generator=g)  # ratios away from 1, some clipped
        return feats, tokens, mask, adv, old_shift

    def grad(W, rows, loss_type, n_micro, world, num_items):
        feats, tokens, mask, adv, old_shift = batch()
        W = W.clone().requires_grad_(True)
        M = len(rows) // n_micro
        for k in range(n_micro):
            r = rows[k * M:(k + 1) * M]
            logp = torch.log_softmax(feats[r] @ W, -1).gather(-1, tokens[r][..., None]).squeeze(-1)
            loss, _ = grpo.grpo_loss(logp, logp.detach() + old_shift[r], None, adv[r], mask[r], loss_type=loss_type,
                                     num_items=num_items, max_completion_length=8, eps_low=0.2, eps_high=0.28)
            (loss * grpo.micro_batch_scale(loss_type, n_micro, world)).backward()
        return W.grad

    W = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
''')


def _grad_lib():
    scope = {}
    exec(GRAD_SCRIPT.replace("sys.argv[1]", repr(ROOT)), scope)
    return scope


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_gradient_whole_equals_accumulated_micro_batches(loss_type):
    lib = _grad_lib()
    mask = lib["batch"]()[2]
    rows = list(range(8))
    whole = lib["grad"](lib["W"], rows, loss_type, 1, 1, mask.sum())
    micro = lib["grad"](lib["W"], rows, loss_type, 4, 1, mask.sum())
    assert whole.abs().sum() > 0
    assert torch.allclose(whole, micro, atol=1e-6, rtol=1e-5)


def test_gradient_whole_equals_two_ranks(tmp_path):
    """Two gloo ranks, each with half the batch in 2 micro-batches, gradients averaged as FSDP
    does, num_items all-reduced: the same gradient as the whole batch in one process."""
    script = tmp_path / "two_ranks.py"
    script.write_text(GRAD_SCRIPT + textwrap.dedent('''
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mask = batch()[2]
        for loss_type in ("dapo", "dr_grpo"):
            mine = list(range(rank * 4, rank * 4 + 4))
            num_items = mask[mine].sum()
            dist.all_reduce(num_items)
            g = grad(W, mine, loss_type, 2, world, num_items)
            dist.all_reduce(g)
            g /= world  # FSDP averages gradients over ranks
            whole = grad(W, list(range(8)), loss_type, 1, 1, mask.sum())
            assert torch.allclose(g, whole, atol=1e-6, rtol=1e-5), (loss_type, (g - whole).abs().max())
            if rank == 0:
                print("OK", loss_type, flush=True)
        dist.destroy_process_group()
    '''))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29613", str(script), ROOT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK dapo" in out.stdout and "OK dr_grpo" in out.stdout


# --------------------------------------------------------------------------------------
# MRT reward pieces: alpha, the authors' trap, episode vs final assignment
# --------------------------------------------------------------------------------------


def test_alpha_changes_the_advantages_of_a_group():
    outcome = torch.tensor([1.0, 0, 0, 1])
    gain = torch.tensor([0.25, -0.5, 0.125, 0.0])  # varies per sample
    a0 = grpo.group_advantages(grpo.combine_rewards(outcome, gain, 0.0), 4)
    a1 = grpo.group_advantages(grpo.combine_rewards(outcome, gain, 1.0), 4)
    assert not torch.allclose(a0, a1)
    assert a1[0] > a1[3] and a1[2] > a1[1]  # same outcome, larger gain -> larger advantage
    # equal outcomes: only the bonus separates the samples
    same = torch.zeros(4)
    assert torch.equal(grpo.group_advantages(grpo.combine_rewards(same, gain, 0.0), 4), torch.zeros(4))
    assert grpo.group_advantages(grpo.combine_rewards(same, gain, 0.5), 4).abs().sum() > 1
    # the trap in the authors' released code: alpha times a per-prompt constant cancels
    const = torch.full((4,), 0.3)
    assert torch.allclose(grpo.group_advantages(grpo.combine_rewards(outcome, const, 1.0), 4), a0, atol=1e-5)


def test_length_penalty_reward():
    r = grpo.combine_rewards(torch.tensor([1.0, 1.0]), torch.zeros(2), 0.0, torch.tensor([10.0, 50.0]), 0.1, 100)
    assert torch.allclose(r, torch.tensor([0.99, 0.95]))


def test_episode_and_final_assignment():
    adv_z1, adv_z2 = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.25, -0.75])
    a = grpo.assign_advantages(adv_z1, adv_z2, torch.tensor([2, 0, 4]), 4)  # (3, 4)
    assert a.tolist() == [[0.5, 0.5, 1.5, 1.5], [0.25] * 4, [2.0] * 4]
    # `final`: the (B,) advantage broadcasts over every token in grpo_loss
    logp = torch.zeros(3, 4, requires_grad=True)
    mask = torch.ones(3, 4)
    final = torch.tensor([0.5, -1.0, 2.0])
    loss_b, _ = grpo.grpo_loss(logp, logp.detach(), None, final, mask, loss_type="bnpo")
    loss_t, _ = grpo.grpo_loss(logp, logp.detach(), None, final[:, None].expand(3, 4), mask, loss_type="bnpo")
    assert loss_b.item() == pytest.approx(loss_t.item())


def test_episode_advantages_are_reward_to_go():
    outcome, gain = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.5, 0.25, -0.25, 0.0])
    ntok = torch.tensor([20.0, 40.0, 60.0, 80.0])
    # by hand, scale "none", alpha 2, lambda 0.5, max length 100: penalty 0.1, 0.2, 0.3, 0.4
    #   z2: r - penalty = [0.9, -0.2, 0.7, -0.4], mean 0.25
    #   z1: 2 I + r - penalty = [1.9, 0.3, 0.2, -0.4], mean 0.5
    z1, z2 = grpo.episode_advantages(outcome, gain, ntok, 4, alpha=2.0, length_penalty=0.5, max_completion_length=100,
                                     scale="none")
    assert torch.allclose(z1, torch.tensor([1.4, -0.2, -0.3, -0.9]), atol=1e-6)
    assert torch.allclose(z2, torch.tensor([0.65, -0.45, 0.45, -0.65]), atol=1e-6)
    # z1 gets the `final` advantage of R; groups are normalized separately
    R = grpo.combine_rewards(outcome, gain, 2.0, ntok, 0.5, 100)
    assert torch.equal(z1, grpo.group_advantages(R, 4, "none"))
    z1, z2 = grpo.episode_advantages(outcome, gain, ntok, 2, alpha=1.0, scale="group")
    # groups [1.5, 0.25] and [0.75, 0] for z1, [1, 0] twice for z2: +-1/sqrt(2) before the 1e-4
    want = lambda d: d / 2 / (abs(d) / math.sqrt(2) + 1e-4)  # noqa: E731  (centered / (Bessel std + 1e-4))
    assert torch.allclose(z1, torch.tensor([want(1.25), -want(1.25), want(0.75), -want(0.75)]), atol=1e-6)
    assert torch.allclose(z2, torch.tensor([want(1.0), -want(1.0)] * 2), atol=1e-6)
    # alpha 0: both episodes get the outcome's advantage (reward-to-go of z1 has no bonus left)
    z1, z2 = grpo.episode_advantages(outcome, gain, ntok, 4, alpha=0.0)
    assert torch.equal(z1, z2)


class ScriptedSampler:
    """The sampler interface rollout uses (tokenizer, generate), returning fixed continuations
    per prompt, each a text (ended by itself) or (text, finish_reason); records the prompts it
    was asked."""

    def __init__(self, tok, continuations: dict):
        self.tokenizer, self.continuations, self.prompts = tok, continuations, []

    def generate(self, prompts, n, **kw):
        out = []
        for ids in prompts:
            context = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.prompts.append(context)
            texts = self.continuations[context]
            assert len(texts) == n
            group = []
            for t in texts:
                t, reason = (t, "stop") if isinstance(t, str) else t
                ids_t = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                ids_t += [self.tokenizer.eos_token_id] if reason == "stop" else []  # a cut sample has no EOS
                assert self.tokenizer.decode(ids_t, skip_special_tokens=True) == t
                group.append(sampling.Sample(t, ids_t, len(ids_t), reason, [-0.5] * len(ids_t), len(ids)))
            out.append(group)
        return out


class ScriptedMetaProver:
    """success_rates from a table of contexts; a context holding the right box reads it (1.0),
    as the real mu copies an answer it can see. Records what it was asked."""

    def __init__(self, table: dict):
        self.table, self.asked = table, []

    def success_rates(self, contexts, golds, seed=None):
        self.asked.append((list(contexts), list(golds)))
        return np.array([self.table[c] if c in self.table else float("\\boxed{" + g + "}" in c)
                         for c, g in zip(contexts, golds)])


def test_rollout_gain_wiring_with_a_scripted_sampler_and_meta_prover(toy_paths):
    """Per-sample information gain: J(x, z0, z1_i) - J(x, z0) of its own group for a parsed
    continuation; -J(x, z0) for one that does not parse (malformed restart line, a restart
    line that holds the box with only a line break after it, no restart at all): J after a
    continuation with no episode is 0, so breaking the format never ranks above an honest
    backtrack. mu is asked only [x + z0 per problem] + [x + z0 + z1_i per parsed continuation].
    A z0 with the marker inside a line is split where the cue was appended. A revised attempt
    cut at the token limit scores 0 (sampling.sample_outcome), its gain stands."""
    from infogain import backtrack_cue

    tok = utils.load_tokenizer(toy_paths["base"])
    mark = utils.BACKTRACK_MARKER
    probs = [{"id": 0, "problem": "Start with 17. Add 25. Multiply by 3. Subtract 48. What is the result?", "answer": "78"},
             {"id": 1, "problem": "Start with 2. Add 3. Multiply by 4. What is the result?", "answer": "20"},
             {"id": 2, "problem": "Start with 6. Add 1. Multiply by 2. What is the result?", "answer": "14"}]
    for p in probs:
        p["prompt"] = utils.build_prompt(tok, p["problem"])
    z0s = {0: "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 127\nStep 3: 127 - 48 = 79\nThe answer is \\boxed{79}",
           1: "Step 1: 2 + 3 = 5\nStep 2: 5 * 4 = 24\nThe answer is \\boxed{24}",
           2: "Step 1: 6 + 1 = 7 " + mark + "\nStep 2: 7 * 2 = 15\nThe answer is \\boxed{15}"}  # marker inside a line
    conts = {0: [" 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}",  # parsed, right
                 " 3: 127 - 48 = 80\nThe answer is \\boxed{80}",  # parsed, wrong
                 " two: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}",  # malformed restart, right box
                 " 2: 42 * 3 = 126, 126 - 48 = 78, \\boxed{78}\n"],  # the box on the restart line, then a line break
             1: [" 2: 5 * 4 = 20\nThe answer is \\boxed{20}", " lost", " 1: 2 + 3 = 6\nThe answer is \\boxed{24}",
                 (" 2: 5 * 4 = 20\nThe answer is \\boxed{20}", "length")],  # right, but cut at the token limit
             2: [" 2: 7 * 2 = 14\nThe answer is \\boxed{14}"] * 3 + [" 2: 7 * 2 = 15\nThe answer is \\boxed{15}"]}
    tails = {i: backtrack_cue(z0s[i]) for i in z0s}
    sampler = ScriptedSampler(tok, {probs[i]["prompt"] + tails[i]: conts[i] for i in z0s})
    x = [p["prompt"] for p in probs]
    z1 = lambda i, line: x[i] + z0s[i] + "\n" + mark + "\nStep" + line  # noqa: E731
    table = {x[0] + z0s[0]: 0.25, x[1] + z0s[1]: 0.5, x[2] + z0s[2]: 0.125,
             z1(0, " 2: 42 * 3 = 126"): 0.75, z1(0, " 3: 127 - 48 = 80"): 0.0,
             z1(1, " 2: 5 * 4 = 20"): 0.875, z1(1, " 1: 2 + 3 = 6"): 0.25,
             z1(2, " 2: 7 * 2 = 14"): 0.625, z1(2, " 2: 7 * 2 = 15"): 0.0}
    mu = ScriptedMetaProver(table)
    args = grpo.Args(variant="mrt", group_size=4, temperature=1.0, max_tokens=128)
    rows = grpo.rollout(sampler, probs, z0s, args, seed=7, meta_prover=mu)

    assert sampler.prompts == [x[i] + tails[i] for i in range(3)]
    assert len(mu.asked) == 1
    contexts, golds = mu.asked[0]
    assert contexts == [x[0] + z0s[0], x[1] + z0s[1], x[2] + z0s[2],
                        z1(0, " 2: 42 * 3 = 126"), z1(0, " 3: 127 - 48 = 80"),
                        z1(1, " 2: 5 * 4 = 20"), z1(1, " 1: 2 + 3 = 6"), z1(1, " 2: 5 * 4 = 20"),
                        z1(2, " 2: 7 * 2 = 14"), z1(2, " 2: 7 * 2 = 14"), z1(2, " 2: 7 * 2 = 14"), z1(2, " 2: 7 * 2 = 15")]
    assert golds == ["78", "20", "14", "78", "78", "20", "20", "20", "14", "14", "14", "14"]
    assert [r["group"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["outcome"] for r in rows] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert [r["gain"] for r in rows] == [0.5, -0.25, -0.25, -0.25, 0.375, -0.5, -0.25, 0.375, 0.5, 0.5, 0.5, -0.125]
    assert [r["episodes"] is not None for r in rows] == [True, True, False, False, True, False, True, True] + [True] * 4
    assert [r["truncated"] for r in rows] == [False] * 7 + [True] + [False] * 4
    assert rows[8]["episodes"].z0 == z0s[2] and rows[8]["episodes"].restart_step == 2
    # group 0 under R = r + I: right 1.5 > wrong -0.25 >= malformed -0.25, box-on-restart-line -0.25
    R = grpo.combine_rewards(torch.tensor([r["outcome"] for r in rows]), torch.tensor([r["gain"] for r in rows]), 1.0)
    assert R[:4].tolist() == [1.5, -0.25, -0.25, -0.25] and R[4] > R[6] > R[5]
    # z1 ends on the sampled ids: the first tokens covering the restart line; a continuation
    # with no episodes is all z1 (the `episode` assignment gives every token R's advantage)
    first = rows[0]
    n = first["z1_tokens"]
    assert tok.decode(first["token_ids"][:n]).startswith(" 2: 42 * 3 = 126")
    assert len(tok.decode(first["token_ids"][:n - 1])) < len(" 2: 42 * 3 = 126")
    assert [r["z1_tokens"] for r in (rows[2], rows[3], rows[5])] == [r["num_tokens"] for r in (rows[2], rows[3], rows[5])]
    assert all(0 < r["z1_tokens"] < r["num_tokens"] for r in rows if r["episodes"])


def test_unparsed_continuations_never_rank_above_parsed_ones():
    """R = r + alpha * I with the backtrack gain of rollout (infogain.backtrack_gain): for every
    J value on the m = 8 grid and alpha in (0, 1], parsed right >= parsed wrong >= unparsed and
    parsed right > unparsed; parsed right > parsed wrong when alpha < 1 (at alpha = 1 a right z2
    after a useless z1, J 0, ties a wrong one after a perfect z1, J 1). Both assignments keep
    the order: `final` normalizes R; `episode` gives an unparsed continuation's tokens the
    advantage of R (all z1) and a parsed one's z1 tokens the same."""
    from infogain import backtrack_gain

    grid = [k / 8 for k in range(9)]
    for alpha in (0.25, 0.5, 1.0):
        for before in grid:
            unparsed = grpo.combine_rewards(0.0, backtrack_gain(before, None), alpha)
            for a_right in grid:
                right = grpo.combine_rewards(1.0, backtrack_gain(before, a_right), alpha)
                for a_wrong in grid:
                    wrong = grpo.combine_rewards(0.0, backtrack_gain(before, a_wrong), alpha)
                    assert right >= wrong >= unparsed and right > unparsed, (alpha, before, a_right, a_wrong)
                    assert alpha == 1.0 or right > wrong, (alpha, before, a_right, a_wrong)
    # one group, episode assignment: right, wrong (J after 0: the lowest a parsed one gets), unparsed
    outcome, before = torch.tensor([1.0, 0.0, 0.0]), 0.75
    gain = torch.tensor([backtrack_gain(before, 0.125), backtrack_gain(before, 0.0), backtrack_gain(before, None)])
    adv_z1, adv_z2 = grpo.episode_advantages(outcome, gain, torch.full((3,), 10.0), 3, alpha=1.0)
    a = grpo.assign_advantages(adv_z1, adv_z2, torch.tensor([4, 4, 10]), 10)  # (3, 10): the unparsed one is all z1
    assert a[0, 0] > a[1, 0] >= a[2].max() and adv_z1[1] == adv_z1[2]


def test_step_record_logs_the_unparsed_share():
    args = grpo.resolve_args(grpo.Args(variant="mrt", prompts_per_step=2, group_size=2, micro_batch_size=2), 1)
    ep = object()  # any parsed continuation's episodes
    rows = [{"truncated": False, "episodes": e} for e in (ep, None, None, ep)]
    stat = dict(entropy=1.0, logprob_gap=0.0, clip_low=0.0, clip_high=0.0, clip_region=0.0, ratio=1.0, kl=0.0,
                is_weight=1.0, tokens=5.0, ratio_max=1.0, loss=0.1)
    rewards = {k: torch.tensor([1.0, 0.0, 0.0, 1.0]) for k in ("outcome", "gain", "reward", "tokens")}
    times = {"time_sample": 1.0, "time_train": 1.0, "time_step": 2.0}
    rec = training.step_record(1, rewards, rows, [stat, stat], 0.5, 1e-4, times, args)
    assert rec["unparsed_share"] == 0.5
    direct = grpo.resolve_args(grpo.Args(variant="direct", prompts_per_step=2, group_size=2, micro_batch_size=2), 1)
    rec = training.step_record(1, rewards, [{"truncated": False}] * 4, [stat, stat], 0.5, 1e-4, times, direct)
    assert "unparsed_share" not in rec  # no episodes in the direct format


def test_direct_rollout_grades_a_cut_attempt_zero(toy_paths):
    tok = utils.load_tokenizer(toy_paths["base"])
    p = {"id": 0, "problem": "Start with 2. Add 3. What is the result?", "answer": "5"}
    p["prompt"] = utils.build_prompt(tok, p["problem"])
    done = "Step 1: 2 + 3 = 5\nThe answer is \\boxed{5}"
    sampler = ScriptedSampler(tok, {p["prompt"]: [done, (done, "length")]})
    rows = grpo.rollout(sampler, [p], {}, grpo.Args(variant="direct", group_size=2, temperature=1.0, max_tokens=32), seed=0)
    assert [r["outcome"] for r in rows] == [1.0, 0.0] and [r["truncated"] for r in rows] == [False, True]


def test_data_stream_leaves_out_dropped_problems_in_order():
    """Problems without a usable z0 leave the data stream; the others keep their order, so the
    stream shifts by the dropped ones instead of being reshuffled (and nothing dropped: as before)."""
    n, seed = 10, 3
    full = [utils.problem_index(i, n, seed) for i in range(2 * n)]
    assert [utils.problem_index(i, n, seed, frozenset()) for i in range(2 * n)] == full
    gone = frozenset({2, 7})
    kept = [utils.problem_index(i, n, seed, gone) for i in range(2 * (n - 2))]
    assert kept == [i for i in full if i not in gone]
    train = [{"id": 100 + i} for i in range(n)]
    args = grpo.resolve_args(grpo.Args(variant="mrt", prompts_per_step=4, group_size=2, micro_batch_size=8, seed=seed), 1)
    ids = [p["id"] for pos in (0, 4) for p in utils.step_problems(train, pos, args, 0, skip=frozenset({102, 107}))]
    assert ids == [100 + i for i in kept[:8]]


def test_prepare_z0_resamples_drops_and_resumes(toy_paths, tmp_path):
    """z0 for the problems the run will use: a cut or box-less attempt is resampled, a problem
    whose tries all fail is dropped (stored as dropped in z0.jsonl, left out of the data
    stream and of the held-out set), and the next problems of the stream take its place; a
    resumed run reads the same choice back without sampling."""
    from test_infogain import AttemptScript

    tok = utils.load_tokenizer(toy_paths["base"])
    train = [{"id": i, "prompt": utils.build_prompt(tok, f"Start with {i}. Add 1. What is the result?")} for i in range(8)]
    test = [{"id": i, "prompt": utils.build_prompt(tok, f"Start with {i}. Add 2. What is the result?")} for i in range(2)]
    done = lambda v: (f"Step 1: {v} + 1 = {v + 1}\nThe answer is \\boxed{{{v + 1}}}", "stop")  # noqa: E731
    script = {p["prompt"]: [done(p["id"])] * 4 for p in train + test}
    args = grpo.resolve_args(grpo.Args(variant="mrt", prompts_per_step=2, group_size=2, micro_batch_size=4, steps=2), 1)
    positions = [0, 2]
    first = {p["id"] for pos in positions for p in utils.step_problems(train, pos, args, 0)}
    bad, late = sorted(first)[:2]
    script[train[bad]["prompt"]] = [("Step 1: no end", "length")] * 4  # always cut: dropped
    script[train[late]["prompt"]] = [("Step 1: no box", "stop"), done(late)]  # box-less once, then usable
    script[test[1]["prompt"]] = [("Step 1", "length")] * 4
    path = str(tmp_path / "z0.jsonl")
    sampler = AttemptScript(tok, script)
    skip, kept_test, train_z0, test_z0 = sampling.prepare_z0(sampler, train, test, path, args, False, positions, 1)
    assert skip == {bad} and [p["id"] for p in kept_test] == [0] and test_z0 == {0: done(0)[0]}
    used = {p["id"] for pos in positions for p in utils.step_problems(train, pos, args, 0, skip)}
    assert len(used) == 4 and bad not in used and set(train_z0) == used
    assert train_z0[late] == done(late)[0] and all(train_z0[i] == done(i)[0] for i in used)
    rows = utils.read_records(path, ["split", "id", "z0", "dropped"])
    assert sorted((r["split"], r["id"]) for r in rows if r["dropped"]) == [("test", 1), ("train", bad)]
    again = sampling.prepare_z0(AttemptScript(tok, {}), train, test, path, args, True, positions, 1)  # no sampling
    assert again == (skip, kept_test, train_z0, test_z0)
    with pytest.raises(utils.UserError, match="attempts missing"):
        sampling.prepare_z0(AttemptScript(tok, {}), train, test, path, args, True, [0, 2, 4, 6], 1)


def test_tokens_covering_uses_sampled_ids(toy_paths):
    tok = utils.load_tokenizer(toy_paths["base"])
    text = " 2: 48 - 17 = 31\nStep 3: 31 - 13 = 18\nThe answer is \\boxed{18}"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    cut = text.index("\n")
    n = utils.tokens_covering(tok, ids, cut)
    assert tok.decode(ids[:n]).startswith(text[:cut]) and len(tok.decode(ids[: n - 1])) < cut
    assert utils.tokens_covering(tok, ids, 0) == 0
    assert utils.tokens_covering(tok, ids, len(text)) <= len(ids)


def test_help_names_the_preset_values():
    """Each flag a preset sets names both presets' values in its help, as PRESETS defines them."""
    import re

    docs = utils._field_docs(grpo.Args)
    for name in grpo.PRESETS["toy"]:
        for preset in ("toy", "paper"):
            said = re.search(rf"{preset} preset ([-0-9.e]+)", docs[name])
            assert said and float(said.group(1)) == grpo.PRESETS[preset][name], (name, preset, docs[name])


def test_bad_arguments_are_user_errors():
    with pytest.raises(utils.UserError, match="variant"):
        grpo.resolve_args(grpo.Args(variant="ppo"), 1)
    with pytest.raises(utils.UserError, match="direct"):
        grpo.resolve_args(grpo.Args(variant="direct", alpha=1.0), 1)
    with pytest.raises(utils.UserError, match="loss-type"):
        grpo.resolve_args(grpo.Args(loss_type="sum"), 1)
    with pytest.raises(utils.UserError, match=r"^--group-size must be at least 2 .*got 1$"):
        grpo.resolve_args(grpo.Args(group_size=1), 1)
    with pytest.raises(utils.UserError, match=r"^--micro-batch-size 3 must divide --prompts-per-step x --group-size = 16 x 8 = 128$"):
        grpo.resolve_args(grpo.Args(micro_batch_size=3), 1)
    with pytest.raises(utils.UserError, match="--steps must be at least 1"):
        grpo.resolve_args(grpo.Args(steps=0), 1)
    a = grpo.resolve_args(grpo.Args(variant="length"), 2)
    assert a.preset == "toy" and a.alpha == 0 and a.length_penalty > 0 and a.prompts_per_step * 2 == 16
    p = grpo.resolve_args(grpo.Args(model="some/model"), 1)
    assert (p.preset, p.lr, p.group_size, p.temperature, p.max_tokens) == ("paper", 1e-6, 4, 0.9, 1024)


# --------------------------------------------------------------------------------------
# Real runs on the toy model (real vLLM sampling, real grading, real training)
# --------------------------------------------------------------------------------------


@pytest.fixture
def engine(toy_sampler, toy_paths):
    """The session engine; the base weights go back into it after the test."""
    yield toy_sampler
    toy_sampler.sync_weights(utils.load_model(toy_paths["base"], "auto", "cpu"))


def _args(toy_paths, out, **kw):
    base = dict(model=toy_paths["base"], train_data=toy_paths["train"], test_data=toy_paths["test"], preset="toy",
                out=str(out), eval_problems=0)
    base.update(kw)
    return grpo.Args(**base)


def _cli(args: grpo.Args) -> list[str]:
    """The command-line flags that reproduce an Args."""
    flags = []
    for f, v in vars(args).items():
        if v is not None and v != getattr(grpo.Args, f, None):
            flags += [f"--{f.replace('_', '-')}", str(v)]
    return flags


def _metrics(out) -> list[dict]:
    import json

    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# Direct GRPO from the toy base on a fixed set of 16 training problems, each seen every step:
# the loop must raise its own objective (training reward), the quantity a short run can show
# above sampling noise. (Held-out accuracy after longer runs is measured by study.py: on fresh
# problems each step, 24 steps at lr 1e-4 moved it less than its noise, about 0.035 per step.)
# On a base that starts near 0.4 the reward rises for about 20 steps at lr 2e-4 (bench/README.md); 10 steps were too few for the first-3 / last-3 margin; lr 1e-3 collapsed an
# earlier base in one step. One run, under torchrun with two ranks (the main job's path): the
# single-process loop is the same code at world size 1 (test_gradient_whole_equals_two_ranks;
# test_kill_and_resume_matches_uninterrupted_run trains in one process).
IMPROVE = dict(variant="direct", steps=15, prompts_per_step=16, group_size=8, micro_batch_size=64, lr=1e-4,
               warmup_ratio=0.0, seed=1)


@pytest.fixture
def train16(toy_paths, tmp_path):
    path = tmp_path / "train16.jsonl"
    path.write_text("".join(open(toy_paths["train"]).readlines()[:16]))
    return str(path)


def _improved(rows) -> bool:
    first = sum(r["accuracy"] for r in rows[:3]) / 3
    last = sum(r["accuracy"] for r in rows[-3:]) / 3
    return last > first + 0.1


def test_two_rank_fsdp_run_improves_reward(toy_paths, train16, tmp_path):
    args = _args(toy_paths, tmp_path, train_data=train16, **dict(IMPROVE, prompts_per_step=8))  # 8 per rank: 16 in all
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
           os.path.join(ROOT, "grpo.py")] + _cli(args)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = _metrics(tmp_path)
    assert len(rows) == IMPROVE["steps"]
    assert _improved(rows), [round(r["accuracy"], 3) for r in rows]
    assert all(r["logprob_gap"] < 1e-3 for r in rows), "sampler and trainer disagree: weights not synced?"
    assert os.path.exists(tmp_path / "model" / "config.json")
    card = __import__("json").load(open(tmp_path / "model" / "mrt.json"))
    assert card["format"] == "direct" and card["variant"] == "direct" and card["stage"] == "grpo"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model", "model.safetensors"))


def test_kill_and_resume_matches_uninterrupted_run(engine, toy_paths, toy_warmstart, tmp_path):
    """MRT-B from a small warmstart (from the base, no continuation is correct and nothing
    trains) with every option that carries state (bonus, episode assignment, KL reference,
    two passes per batch, importance correction): 4 steps uninterrupted vs a process killed
    after its step-2 checkpoint and resumed. The final weights must agree, and differ from
    the starting weights."""
    cfg = dict(variant="mrt", steps=4, prompts_per_step=4, group_size=4, micro_batch_size=8, num_iterations=2,
               beta=0.04, assign="episode", is_correction=True, lr=3e-4, save_every=2, mu_samples=4, seed=3,
               model=toy_warmstart["model"])
    engine.sync_weights(utils.load_model(toy_warmstart["model"], "auto", "cpu"))  # z0 from the starting model
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    with sampling.ready_engines({cfg["model"]: engine}):
        grpo.main(_args(toy_paths, whole, **cfg))

    cmd = [sys.executable, os.path.join(ROOT, "grpo.py")] + _cli(_args(toy_paths, cut, **cfg))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    ckpt = cut / "checkpoint"
    deadline = time.time() + 300
    while not training.has_checkpoint(str(ckpt)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    assert training.has_checkpoint(str(ckpt)), err[-3000:]
    assert training.checkpoint_extra(str(ckpt))["step"] == 2
    assert not (cut / "model").exists()

    engine.sync_weights(utils.load_model(toy_warmstart["model"], "auto", "cpu"))  # as a fresh process would hold
    with sampling.ready_engines({cfg["model"]: engine}):
        grpo.main(_args(toy_paths, cut, resume=True, **cfg))
    a, b = _weights(whole), _weights(cut)
    start = _weights(toy_warmstart["dir"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert any(not torch.equal(a[k], start[k]) for k in a), "nothing trained: the test would prove nothing"
    assert [r["step"] for r in _metrics(cut)] == [1, 2, 3, 4]
    rows = _metrics(whole)
    assert any(r["zero_std_groups"] < 1 for r in rows), rows
    assert all("info_gain_mean" in r for r in rows)
    assert any(r["kl"] > 0 for r in rows[1:])  # the reference is used (values by hand: the test below)


def _hand_logprobs(model, ctx_ids, comp_ids, temperature):
    """(tokens,) log p of each completion token, one unpadded sequence at a time, with plain
    torch.log_softmax: an independent path to what training.completion_logprobs computes."""
    out = []
    with torch.no_grad():
        for ctx, comp in zip(ctx_ids, comp_ids):
            ids = torch.tensor([ctx + comp])  # (1, Tp + Tc)
            logits = model(input_ids=ids).logits[0, len(ctx) - 1:-1].double() / temperature  # (Tc, V)
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(comp)[:, None])[:, 0])  # (Tc,)
    return torch.cat(out)


def test_policy_update_kl_and_clip_metrics_by_hand(toy_paths):
    """policy_update on the toy model, 2 passes over one batch with a KL reference: on the first
    pass the policy is the reference and the old policy, so kl and clip_region are exactly 0
    and the ratio exactly 1; on the second pass, after one optimizer step, kl, ratio and
    clip_region equal the k3 KL and clip counts recomputed by hand from the weights after that
    step (a replica run with one pass), and are above 0."""
    import copy

    tok = utils.load_tokenizer(toy_paths["base"])
    records = utils.read_records(toy_paths["train"], ["problem", "answer"])[:4]
    rows = []
    for r in records:
        ctx = utils.encode(tok, utils.build_prompt(tok, r["problem"]))
        start_value, ops = toy.parse_problem(r["problem"])
        comp = tok(toy.render_solution(*toy.solution_steps(start_value, ops)), add_special_tokens=False)["input_ids"]
        rows.append({"ctx_ids": ctx, "token_ids": comp, "sampler_logp": None, "num_tokens": len(comp)})
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    args = grpo.Args(micro_batch_size=2, num_iterations=2, beta=0.04, temperature=1.0, max_tokens=64, lr=1e-4,
                     eps_low=0.02, eps_high=0.02, loss_type="dapo")  # a narrow band: some tokens clip
    model, ref = training.load_trainer(toy_paths["base"], "auto", "cpu", reference=True)
    model.train()
    start = copy.deepcopy(model)
    replica = copy.deepcopy(model)

    def optimizer(m):
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)

    stats, _ = grpo.policy_update(model, ref, *optimizer(model), rows, adv, args, tok.pad_token_id)
    assert len(stats) == 4  # 2 micro-batches x 2 passes
    for m in stats[:2]:
        assert m["kl"] == 0.0 and m["clip_region"] == 0.0 and m["ratio"] == 1.0, m
    # the weights after the first optimizer step: the same update, one pass only
    grpo.policy_update(replica, ref, *optimizer(replica), rows, adv, dataclasses.replace(args, num_iterations=1),
                       tok.pad_token_id)
    for k in range(2):
        mb = rows[2 * k:2 * k + 2]
        ctx, comp = [r["ctx_ids"] for r in mb], [r["token_ids"] for r in mb]
        old = _hand_logprobs(start, ctx, comp, 1.0)  # the reference and the old policy: the start
        new = _hand_logprobs(replica, ctx, comp, 1.0)
        a = torch.cat([torch.full((len(c),), float(adv[2 * k + i])) for i, c in enumerate(comp)])  # (tokens,)
        kl = torch.exp(old - new) - (old - new) - 1  # (tokens,) k3
        ratio = torch.exp(new - old)  # (tokens,)
        clip = ((ratio < 1 - args.eps_low) & (a < 0)) | ((ratio > 1 + args.eps_high) & (a > 0))  # (tokens,)
        m = stats[2 + k]
        assert kl.mean().item() > 0 and m["kl"] == pytest.approx(kl.mean().item(), rel=1e-3), (m, kl.mean())
        assert m["ratio"] == pytest.approx(ratio.mean().item(), rel=1e-4)
        assert m["clip_region"] == pytest.approx(clip.double().mean().item(), abs=1.01 / len(a)), (m, clip)
    assert any(m["clip_region"] > 0 for m in stats[2:]), stats


def test_step_record_logs_mu_tokens_per_problem():
    """mu's decoded tokens of the step per problem (2 problems x 2 continuations here); no key
    without a meta-prover."""
    args = grpo.resolve_args(grpo.Args(variant="mrt", prompts_per_step=2, group_size=2, micro_batch_size=2), 1)
    rows = [{"truncated": False, "episodes": None}] * 4
    stat = dict(entropy=1.0, logprob_gap=0.0, clip_low=0.0, clip_high=0.0, clip_region=0.0, ratio=1.0, kl=0.0,
                is_weight=1.0, tokens=5.0, ratio_max=1.0, loss=0.1)
    rewards = {k: torch.tensor([1.0, 0.0, 0.0, 1.0]) for k in ("outcome", "gain", "reward", "tokens")}
    times = {"time_sample": 1.0, "time_mu": 0.5, "time_train": 1.0, "time_step": 2.0}
    assert training.step_record(1, rewards, rows, [stat, stat], 0.5, 1e-4, times, args, 90)["mu_tokens_per_problem"] == 45
    assert "mu_tokens_per_problem" not in training.step_record(1, rewards, rows, [stat, stat], 0.5, 1e-4, times, args)
