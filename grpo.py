"""grpo.py: MRT-B reinforcement learning on GRPO (paper Alg. 2), and its baselines.

One step of Alg. 2, on every rank, for P problems x of the training set:
  sample     z0 ~ pi_base(. | x) once per problem, before any update (prepare_z0: an attempt cut at
             --max-tokens or without a box is resampled, a problem with none usable in sampling.Z0_TRIES
             tries is dropped from the run); G continuations z_{1:2} ~ pi(. | x, z0, "\\n" + MARKER +
             "\\nStep") from the current policy, which names the restart step (" k: ...") and writes the
             revised attempt (rollout)
  reward     r_i = grade(z2_i) on the revised attempt only (z0's box is context, never credited), 0 when cut
             at --max-tokens (sampling.sample_outcome); I_i = J(mu | x, z0, z1_i) - J(mu | x, z0), the
             information gain of the backtrack episode (Def. 5.1, infogain.backtrack_gain);
             R_i = r_i + alpha * I_i                                  (combine_rewards)
  advantage  A_i = (R_i - mean_group) / (std_group + 1e-4)          (group_advantages)
  loss       token-level clipped ratio objective, k3 KL to the reference (grpo_loss)
  update     AdamW over micro-batches with gradient accumulation, --num-iterations optimizer steps per
             generation batch (P x G sequences per rank), FSDP2 across ranks (policy_update)
  sync       the new weights go into the rank's vLLM engine in place (sampling.Sampler.sync_weights)

--variant sets defaults (explicit flags win):
  mrt      backtrack format, alpha = 1: outcome + information-gain bonus (MRT-B)
  outcome  alpha = 0: outcome-only GRPO, same format
  length   alpha = 0, reward r - lambda * num_tokens / max_tokens (Fig. 9; lambda = --length-penalty, 0.1)
  direct   plain GRPO on the prompt: no z0, no backtrack, reward grade(completion) (0 when cut)
--assign final gives every token of z_{1:2} the group-normalized R (as the paper ran); `episode` gives z1's
and z2's tokens their own group-normalized reward-to-go (episode_advantages). A continuation that does not
parse into episodes gets r = 0 and I = -J(mu | x, z0): breaking the format never pays (rollout).

Run (the toy task and model are the default; the toy preset trains in a few minutes on CPU):
    python grpo.py                                   # MRT-B on the toy task, 1 process
    torchrun --nproc_per_node 2 grpo.py              # the same with 2 ranks (FSDP2, gloo)
    python grpo.py --variant outcome                 # or length / direct baselines
    python grpo.py --mu-mode rollout --mu-rollout-tokens 128   # mu continues the trace (MetaProver)
    torchrun --nproc_per_node 8 grpo.py --model runs/warmstart/model \\
        --train-data data/train.jsonl --problem-field question --answer-field solution \\
        --preset paper --gradient-checkpointing       # a real model on 8 GPUs, paper Table 2
    (several nodes: torchrun --nnodes N --node-rank R --master-addr H ... grpo.py ...)
    python grpo.py --resume                          # continue <out> from its checkpoint

Outputs in <out> (default runs/grpo/<variant>): z0.jsonl (dropped problems marked "dropped", with their last
try), metrics.jsonl (one line per step; backtrack variants log unparsed_share; on toy problems also the
restart precision against the ground truth, toy.restart_metrics: restart_fixable, restart_at_first_wrong,
z2_acc_z0_wrong; time_mu is mu's part of time_sample), samples.jsonl (one group of completions with their
rewards per step), eval.json (held-out accuracy at the start and the end), checkpoint/ (sharded,
training.save_checkpoint), model/ with mrt.json.

Where this departs from the paper / the authors' code:
- The bonus I_i varies per sample (J after z1_i minus J before); the authors' released reward added alpha
  times a per-prompt constant, which cancels under group normalization.
- z0 is sampled at the start of the run with the run's own engine (the authors stored z0 offline); the
  policy and the frozen base are the same weights at that moment.
- Defaults that Table 2 does not give (prompts per step, steps, beta = 0.04 as TRL's default at the time,
  eps 0.2, loss `dapo`) are assumptions, documented in PRESETS.
- Held-out accuracy is measured in the variant's own format with the same z0 source, at the training
  temperature, so start and end compare like for like.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import namedtuple
from dataclasses import dataclass

# One OpenMP thread unless told otherwise (before `import torch`): vLLM's engine and the trainer share this
# process, and more threads' spin-waits make every CPU op many times slower on a shared CPU (bench/README.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sampling  # noqa: E402
import toy  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from infogain import backtrack_cue, backtrack_gain, split_continuation  # noqa: E402
from training import read_metrics, step_record  # noqa: E402

# --------------------------------------------------------------------------------------
# Alg. 2, sample: G continuations per problem, split into episodes, graded, information gain
# --------------------------------------------------------------------------------------


def rollout(sampler, problems, z0s, args: Args, seed: int, meta_prover=None):
    """G continuations per problem, one dict per continuation, group by group: ctx_ids, token_ids,
    sampler_logp, outcome r, gain I (0 without a meta-prover), text, truncated, (backtrack) episodes and
    z1_tokens: the z1/z2 boundary found on the sampled ids (decoded prefixes, never re-tokenized text), the
    token that straddles it counted as z1's. A continuation that does not parse into episodes
    (infogain.split_continuation: no restart line, a restart line with a box or a second step, or no step
    and no box after it) has r = 0 and J after it = 0 (mu is not asked), so its gain is -J(mu | x, z0) and
    r + alpha * I = -alpha * J(mu | x, z0), never above a parsed continuation's of its group (J after >= 0):
    breaking the format never pays (the length penalty still ranks shorter ones above longer ones). All its
    tokens are z1's (`episode`: the advantage of R). mu is asked once per step, after the policy: the P
    contexts x + z0 and every parsed x + z0 + z1_i in one call, the engine's prefix cache holding x + z0 in
    whole KV blocks for all of them (sampling.CPU_ENGINE_BLOCK on CPU)."""
    fmt, tok = variant_format(args.variant), sampler.tokenizer
    tails = [backtrack_cue(z0s[p["id"]]) if fmt == "backtrack" else "" for p in problems]
    ctx_ids = [utils.encode(tok, p["prompt"] + t) for p, t in zip(problems, tails)]
    outs = sampler.generate(ctx_ids, n=args.group_size, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=seed, logprobs=True)
    rows = []
    for gi, (p, tail, ids, group) in enumerate(zip(problems, tails, ctx_ids, outs)):
        for s in group:
            ep = split_continuation(z0s[p["id"]], tail + s.text) if fmt == "backtrack" else None
            graded = s.text if fmt == "direct" else (ep.z2 if ep else None)  # no episodes: r = 0
            row = dict(problem=p, group=gi, ctx_ids=ids, token_ids=s.token_ids, sampler_logp=s.logprobs,
                       text=s.text, num_tokens=s.num_tokens, truncated=s.finish_reason == "length", gain=0.0,
                       z1_tokens=0, outcome=0.0 if graded is None else sampling.sample_outcome(
                           graded, p["answer"], s.finish_reason, args.reward, p.get("record")))
            if fmt == "backtrack":  # z1 ends where z2 begins, len(text) - len(z2) characters in
                row.update(episodes=ep, z1_tokens=s.num_tokens if ep is None  # unparsed: all z1
                           else utils.tokens_covering(tok, s.token_ids, len(s.text) - len(ep.z2)))
            rows.append(row)
    if meta_prover is not None:  # I_i = J(mu | x, z0, z1_i) - J(mu | x, z0)  (Def. 5.1)
        parsed = [i for i, r in enumerate(rows) if r["episodes"]]  # unparsed: J after is 0, mu not asked
        contexts = ([p["prompt"] + z0s[p["id"]] for p in problems]
                    + [rows[i]["problem"]["prompt"] + rows[i]["episodes"].z0 + rows[i]["episodes"].z1
                       for i in parsed])
        golds = [p["answer"] for p in problems] + [rows[i]["problem"]["answer"] for i in parsed]
        J = meta_prover.success_rates(contexts, golds, seed=utils.derive_seed(seed, "meta-prover"))
        after = dict(zip(parsed, J[len(problems):]))
        for i, r in enumerate(rows):
            r["gain"] = backtrack_gain(J[r["group"]], after.get(i))
    return rows


# --------------------------------------------------------------------------------------
# Alg. 2, reward: R = r + alpha * I - lambda * length
# --------------------------------------------------------------------------------------


def combine_rewards(outcome, gain, alpha: float, num_tokens=None, length_penalty: float = 0.0,
                    max_completion_length: int | None = None):
    """R_i = r_i + alpha * I_i - lambda * num_tokens_i / max_completion_length (tensors (B,)).
    The bonus varies per sample, so alpha changes the group-normalized advantages."""
    reward = outcome + alpha * gain
    if length_penalty:
        reward = reward - length_penalty * num_tokens / max_completion_length
    return reward


# --------------------------------------------------------------------------------------
# Alg. 2, advantage: group-normalized, per sequence (`final`) or per episode (`episode`)
# --------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(B,) advantages of (B,) rewards, group by group: (r - mean_group) / (std + 1e-4), std (Bessel)
    per group ("group"), over the batch ("batch", TRL's) or none ("none"). An all-equal group gets
    exactly 0 (never NaN, never rounding noise)."""
    r = rewards.float().view(-1, group_size)  # (B/G, G)
    centered = r - r.mean(dim=1, keepdim=True)  # (B/G, G)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centered)  # (B/G, 1)
        adv = centered / (std + 1e-4)
    elif scale == "batch":
        adv = centered / ((r.std() if r.numel() > 1 else torch.zeros(())) + 1e-4)
    elif scale == "none":
        adv = centered
    else:
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # (B/G, 1)
    return torch.where(equal, torch.zeros_like(adv), adv).view(-1)


def episode_advantages(outcome, gain, num_tokens, group_size: int, *, alpha: float,
                       length_penalty: float = 0.0, max_completion_length: int | None = None,
                       scale: str = "group"):
    """(adv_z1, adv_z2), each (B,), group by group, of the `episode` assignment: per-episode reward-to-go,
    group-normalized. z1 is credited with its own reward and all after it, alpha * I + r - lambda *
    num_tokens / max_completion_length (= R: adv_z1 is the `final` advantage, which `final` gives every
    token of z_{1:2}, as the paper ran); z2 with what follows it, r - lambda * num_tokens /
    max_completion_length. With reward-to-go both assignments have the same expected policy gradient
    (the paper's footnote on per-episode vs final rewards) up to the group normalization, each of its own
    reward."""
    after_z1 = combine_rewards(outcome, gain, alpha, num_tokens, length_penalty,
                               max_completion_length)  # (B,)
    after_z2 = combine_rewards(outcome, torch.zeros_like(gain), 0.0, num_tokens, length_penalty,
                               max_completion_length)  # (B,)
    return group_advantages(after_z1, group_size, scale), group_advantages(after_z2, group_size, scale)


def assign_advantages(adv_z1: torch.Tensor, adv_z2: torch.Tensor, z1_tokens: torch.Tensor,
                      T: int) -> torch.Tensor:
    """Per-token advantages (B, T) of the `episode` assignment: positions t < z1_tokens[i] (the
    backtrack episode z1) get adv_z1[i], the rest (the revised attempt z2, EOS included) get
    adv_z2[i]. The `final` assignment is the (B,) advantage itself, broadcast by grpo_loss."""
    pos = torch.arange(T)[None, :]  # (1, T)
    return torch.where(pos < z1_tokens[:, None], adv_z1[:, None], adv_z2[:, None]).float()  # (B, T)


Episode = namedtuple("Episode", "adv_z1 adv_z2 z1_tokens")
"""The `episode` assignment's pieces, each (B,): the advantage of z1's tokens, that of z2's, z1's length."""


# --------------------------------------------------------------------------------------
# Alg. 2, loss: token-level clipped ratio objective, k3 KL to the reference
# --------------------------------------------------------------------------------------


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, loss_type="dapo", eps_low=0.2, eps_high=0.2,
              beta=0.0, num_items=None, max_completion_length=None, sampler_logp=None, is_cap=3.0):
    """The GRPO loss of one micro-batch with TRL's semantics, and its metrics (0-d tensors on the loss's
    device; read_metrics reads them). logp, old_logp, ref_logp, mask: (B, T); advantages (B,) or (B, T).
    ratio = exp(logp - old_logp); per-token loss -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A);
    with sampler_logp, times the truncated importance weight min(exp(old_logp - sampler_logp), is_cap)
    (TRL's vllm_importance_sampling_correction, token_truncate); plus beta times the k3 KL
    exp(ref - logp) - (ref - logp) - 1 (ref_logp None when beta is 0). Normalization:
      grpo     per-sequence token mean, then mean over the B sequences
      bnpo     token mean over this micro-batch
      dr_grpo  token sum / (B * max_completion_length)      (default: T)
      dapo     token sum / num_items, the completion-token count of the whole generation batch over all
               ranks and accumulation steps (default: mask.sum())
    Accumulation, as TRL: the caller divides grpo/bnpo/dr_grpo losses by the number of micro-batches
    (`dapo`: no division) and, across ranks whose gradients are averaged (FSDP), multiplies the `dapo`
    loss by the world size (micro_batch_scale)."""
    mask = mask.float()
    adv = advantages if advantages.dim() == 2 else advantages[:, None]  # (B, T) or (B, 1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    is_weight = kl = None
    if sampler_logp is not None:
        is_weight = torch.clamp(torch.exp(old_logp - sampler_logp), max=is_cap).detach()  # (B, T)
        per_token = per_token * is_weight
    if beta != 0.0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1  # (B, T) k3 estimator
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (logp.shape[0] * (max_completion_length or logp.shape[1]))
    elif loss_type == "dapo":
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=torch.float)
        loss = (per_token * mask).sum() / n.clamp(min=1.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    with torch.no_grad():  # 0-d tensors, not read here: a host read waits for the device (read_metrics)
        ntok = mask.sum().clamp(min=1.0)
        mean = lambda x: (x * mask).sum() / ntok  # noqa: E731
        low = ((ratio < 1 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1 + eps_high) & (adv > 0)).float()
        zero = mask.new_zeros(())
        metrics = {"clip_low": mean(low), "clip_high": mean(high),
                   "clip_region": mean(torch.maximum(low, high)), "ratio": mean(ratio),
                   "ratio_max": (ratio * mask).max(), "tokens": mask.sum(),
                   "kl": mean(kl) if kl is not None else zero,
                   "is_weight": mean(is_weight) if is_weight is not None else zero + 1.0}
    return loss, metrics


def overlong_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering: the (B, T) completion mask with the rows of completions cut
    at the token limit (`truncated`, (B,) bool) zeroed, so they add no token to the loss (their
    rewards still enter their group's statistics, which are computed before)."""
    return mask * (~truncated.to(device=mask.device, dtype=torch.bool))[:, None].to(mask.dtype)  # (B, T)


# --------------------------------------------------------------------------------------
# Alg. 2, update: micro-batches, gradient accumulation, --num-iterations optimizer steps (then sync)
# --------------------------------------------------------------------------------------


def micro_batch_scale(loss_type: str, n_micro: int, world: int) -> float:
    """Factor on each micro-batch's grpo_loss so that the accumulated gradient, averaged over
    ranks (FSDP), is the gradient of the generation batch's loss (TRL's accumulation rules)."""
    return float(world) if loss_type == "dapo" else 1.0 / n_micro


def policy_update(model, ref, opt, sched, rows: list[dict], advantages, args: Args, pad_id: int):
    """Loss and update on one generation batch: micro-batches with gradient accumulation, --num-iterations
    optimizer steps; old (and reference) log-probs from the first pass, before any update of this batch.
    `advantages`: (B,) for the `final` assignment, or an Episode. Returns the per-micro-batch metrics (first
    pass first) and the last gradient norm, read from the device once. Under FSDP2 the gradients are reduced
    over the ranks once per optimizer step, in the backward of its last micro-batch (training.gradient_sync).
    With --mask-truncated, completions cut at --max-tokens add no tokens (overlong_mask), nor to dapo's
    token count."""
    M, world = args.micro_batch_size, utils.world_size()
    n_micro = len(rows) // M
    trained = [r for r in rows if not (args.mask_truncated and r["truncated"])]
    num_items = utils.all_reduce(torch.tensor(float(sum(r["num_tokens"] for r in trained))))  # dapo's count
    old_logp, ref_logp, stats = {}, {}, []
    for it in range(args.num_iterations):
        for k in range(n_micro):
            mb, sl = rows[k * M:(k + 1) * M], slice(k * M, (k + 1) * M)
            ctx, comp = [r["ctx_ids"] for r in mb], [r["token_ids"] for r in mb]
            logp, mask, ent = training.completion_logprobs(model, ctx, comp, pad_id, args.temperature,
                                                           with_entropy=it == 0)  # (M, T)
            if args.mask_truncated:  # entropy, gap and loss over the trained tokens only
                mask = overlong_mask(mask, torch.tensor([r["truncated"] for r in mb]))  # (M, T)
            samp = training.pad_sequences([r["sampler_logp"] or [0.0] * r["num_tokens"] for r in mb], 0,
                                          dtype=torch.float)[0].to(logp.device)  # (M, T)
            if it == 0:
                old_logp[k] = logp.detach()
                if ref is not None:
                    with torch.no_grad():
                        ref_logp[k] = training.completion_logprobs(ref, ctx, comp, pad_id,
                                                                   args.temperature)[0]  # (M, T)
            a = advantages  # an Episode: (M, T) per token; else (M,), `final`, broadcast over the tokens
            adv = (assign_advantages(a.adv_z1[sl], a.adv_z2[sl], a.z1_tokens[sl], logp.shape[1])
                   if isinstance(a, Episode) else a[sl])
            loss, m = grpo_loss(logp, old_logp[k], ref_logp.get(k), adv.to(logp.device), mask,
                                loss_type=args.loss_type, eps_low=args.eps_low, eps_high=args.eps_high,
                                beta=args.beta, num_items=num_items, max_completion_length=args.max_tokens,
                                sampler_logp=samp if args.is_correction else None, is_cap=args.is_cap)
            training.gradient_sync(model, k == n_micro - 1)  # FSDP2 reduces the gradients once, on the last
            (loss * micro_batch_scale(args.loss_type, n_micro, world)).backward()
            if it == 0:  # the proof that weights synced: the engine's and the trainer's log-probs agree
                m["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1)
                m["logprob_gap"] = ((samp - logp.detach()).abs() * mask).sum()  # / tokens, once read
            m["loss"] = loss.detach()
            stats.append(m)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    *stats, last = read_metrics([*stats, {"grad_norm": grad_norm}])  # one host read per generation batch
    for m in stats[:n_micro]:
        m["logprob_gap"] /= max(1.0, m["tokens"])
    return stats, last["grad_norm"]


# --------------------------------------------------------------------------------------
# Main: Alg. 2
# --------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    """Train; returns the held-out accuracies {"start", "end"}. An engine on the starting model in
    sampling.READY (tests) is used instead of a new one, with the trainer's weights synced into it."""
    rank, world, device = utils.init_distributed()
    args = resolve_args(args, world)
    out, fmt = args.out or os.path.join("runs", "grpo", args.variant), variant_format(args.variant)
    backtrack = fmt == "backtrack"
    default_path, toy_paths = ((args.model, None) if args.model and args.train_data and args.test_data
                               else toy.default_model())  # the toy's model and data where none is given
    model_path = args.model or default_path
    args = dataclasses.replace(args, instruction=utils.stage_instruction(args.instruction, model_path))
    ckpt_path, eval_path = os.path.join(out, "checkpoint"), os.path.join(out, "eval.json")
    if args.resume:  # refused before anything loads when the arguments change the run's meaning
        done = training.check_resume_args(ckpt_path, args, RESUME_FREE)["step"]
        if args.steps < done:
            raise utils.UserError(f"--resume: --steps {args.steps} is below the checkpoint's step {done}",
                                  every_rank=True)
    utils.seed_everything(args.seed)
    utils.print0(f"grpo: variant {args.variant} ({fmt}), preset {args.preset}, model {model_path}, world "
                 f"{world}, {args.prompts_per_step} prompts x {args.group_size} per rank per step, "
                 f"{args.steps} steps")

    # -- data (its prompt lengths size the engine) ------------------------------------------
    tok = utils.load_tokenizer(model_path)
    utils.make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    train, test = utils.rl_problems(args, tok, toy_paths)
    # restart precision against the toy's ground truth, on toy problems only (the same answer on every rank)
    on_toy = backtrack and any(toy.parse_problem(p["problem"]) for p in train)

    # -- models: the vLLM engine sized from the run's own lengths, the policy (FSDP2 over ranks, fp32
    # masters), a frozen reference if beta > 0 (the same read of the weights), mu (MetaProver) if used --
    uses_mu = args.alpha != 0.0 or args.assign == "episode"
    longest = max(p["prompt_tokens"] for p in train + test)
    ready = model_path in sampling.READY  # it may hold other weights (and a prefix cache computed with them)
    sampler = sampling.rl_engine(model_path, tok, longest, args, backtrack, uses_mu and not args.mu_model)
    model, ref = training.load_trainer(model_path, args.dtype, device, args.gradient_checkpointing,
                                       reference=args.beta != 0.0)
    model.train()
    if ready:
        sampler.sync_weights(model)
    meta_prover = sampling.rl_meta_prover(sampler, tok, longest, args, backtrack) if uses_mu else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.steps * args.num_iterations  # optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, training.lr_lambda(int(args.warmup_ratio * total), total,
                                                                      args.lr_schedule))

    # -- resume ------------------------------------------------------------------------------
    P, G, per_step = args.prompts_per_step, args.group_size, args.prompts_per_step * world
    start, data_pos = 0, 0  # first step of this run, and its position in the data stream
    if args.resume:
        extra = training.load_checkpoint(ckpt_path, model, opt, sched)
        start, data_pos = extra["step"], extra["data_position"]
        sampler.sync_weights(model)  # the engine must sample from the restored weights
        utils.print0(f"resumed from {ckpt_path} at step {start}")

    def position(step: int) -> int:  # where a step starts in the endless data stream
        return data_pos + (step - start) * per_step

    # -- z0 from the frozen base for every problem the run will use (Alg. 2); held-out accuracy at start --
    train_z0, test_z0, skip = {}, {}, frozenset()
    if backtrack:
        positions = [position(s) for s in range(start, args.steps)]
        skip, test, train_z0, test_z0 = prepare_z0(sampler, train, test, os.path.join(out, "z0.jsonl"), args,
                                                   args.resume, positions, world)
    evals = json.load(open(eval_path)) if args.resume and os.path.exists(eval_path) else {}
    eval_seed = utils.derive_seed(args.seed, "held-out")
    held_out = f"{len(test)} problems x {args.eval_samples}, variant {args.variant}"
    if test and "start" not in evals:
        acc = heldout_accuracy(sampler, test, test_z0, args, eval_seed)
        utils.record_heldout(eval_path, evals, "start", acc, held_out)

    resumed = start if args.resume else None
    logger = utils.JsonlLogger(os.path.join(out, "metrics.jsonl"), resume_step=resumed,
                               report_to=args.report_to, config=dataclasses.asdict(args))
    sample_log = utils.JsonlLogger(os.path.join(out, "samples.jsonl"), resume_step=resumed)
    card = {"stage": "grpo", "variant": args.variant, "format": fmt, "base": model_path}
    bar = tqdm(range(start, args.steps), desc=f"grpo {args.variant}", disable=not utils.is_main(),
               initial=start, total=args.steps)
    for step in bar:
        t_step = time.time()

        # ---- sample: G continuations per problem from the current policy (seeded per step and rank)
        problems = step_problems(train, position(step), args, rank, skip)
        mu_seconds, mu_tokens = (meta_prover.seconds, meta_prover.tokens) if meta_prover else (0.0, 0)
        rows = rollout(sampler, problems, train_z0, args, utils.derive_seed(args.seed, "rollout", step, rank),
                       meta_prover)
        t_sample = time.time() - t_step
        t_mu = (meta_prover.seconds if meta_prover else 0.0) - mu_seconds  # mu's share of the sampling time
        mu_tokens = meta_prover.tokens - mu_tokens if meta_prover else None  # tokens mu decoded this step

        # ---- reward: R = r + alpha * I - lambda * length, gathered over ranks ---------------
        outcome, gain = (torch.tensor([r[k] for r in rows]) for k in ("outcome", "gain"))  # (B,) each
        ntok = torch.tensor([r["num_tokens"] for r in rows], dtype=torch.float)  # (B,)
        reward = combine_rewards(outcome, gain, args.alpha, ntok, args.length_penalty, args.max_tokens)
        mine = {"outcome": outcome, "gain": gain, "reward": reward, "tokens": ntok}
        every = {k: torch.cat([r[k] for r in utils.all_gather(mine)]) for k in mine}  # (B * world,) each

        # ---- advantage: group-normalized (groups never straddle ranks; `batch` scale sees all)
        own = slice(rank * P * G, (rank + 1) * P * G)
        adv_final = group_advantages(every["reward"], G, args.scale_rewards)[own]  # (B,)
        advantages = adv_final
        if args.assign == "episode":  # reward-to-go: z1 tokens A(alpha * I + r - pen.), z2 tokens A(r - pen.)
            adv_z1, adv_z2 = episode_advantages(every["outcome"], every["gain"], every["tokens"], G,
                                                alpha=args.alpha, length_penalty=args.length_penalty,
                                                max_completion_length=args.max_tokens,
                                                scale=args.scale_rewards)  # (B * world,) each
            advantages = Episode(adv_z1=adv_z1[own], adv_z2=adv_z2[own],
                                 z1_tokens=torch.tensor([r["z1_tokens"] for r in rows]))  # (B,) each

        # ---- loss and update (engine asleep with --sleep-mode), then sync: the engine samples
        # the next batch from the new weights
        t1 = time.time()
        stats, grad_norm = sampling.update_asleep(sampler, lambda: policy_update(
            model, ref, opt, sched, rows, advantages, args, tok.pad_token_id), model)
        t_train = time.time() - t1

        # ---- log, checkpoint -------------------------------------------------------------------
        times = {"time_sample": t_sample, "time_mu": t_mu, "time_train": t_train,
                 "time_step": time.time() - t_step}
        rec = step_record(step + 1, every, rows, stats, grad_norm, sched.get_last_lr()[0], times, args,
                          mu_tokens)
        if on_toy:  # one collective call, made on every rank alike
            rec.update(toy.restart_metrics(rows, train_z0))
        logger.log(rec)
        sample_log.log(utils.group_sample(step + 1, rows[:G], train_z0, reward, adv_final))
        bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", acc=f"{rec['accuracy']:.3f}",
                        gap=f"{rec['logprob_gap']:.1e}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            training.save_checkpoint(ckpt_path, model, opt, sched, step=step + 1, card=card,
                                     data_position=position(step + 1), args=dataclasses.asdict(args))

    # -- end: held-out accuracy, final model with its card --------------------------------------
    if test:
        acc = heldout_accuracy(sampler, test, test_z0, args, eval_seed)
        utils.record_heldout(eval_path, evals, "end", acc, held_out)
    training.save_model(model, tok, os.path.join(out, "model"), dict(card, args=dataclasses.asdict(args)))
    return evals


# --------------------------------------------------------------------------------------
# Arguments: presets (where every preset value is defined), variants, checks
# --------------------------------------------------------------------------------------

PRESETS = {
    # toy: sized so that `python grpo.py` improves held-out accuracy in minutes on 2 CPU cores.
    "toy": dict(steps=40, prompts_per_step=16, group_size=8, micro_batch_size=32, lr=2e-4, warmup_ratio=0.05,
                weight_decay=0.0, beta=0.0, temperature=1.0, max_prompt_length=256, max_tokens=128,
                save_every=10),
    # paper: Table 2 (lr 1e-6 cosine, warmup 0.1, weight decay 0.01, max prompt 1500, max completion 1024,
    # G = 4, temperature 0.9); steps, prompts per rank, micro-batch and beta are assumptions (beta 0.04 was
    # TRL's default when the authors trained).
    "paper": dict(steps=500, prompts_per_step=8, group_size=4, micro_batch_size=4, lr=1e-6, warmup_ratio=0.1,
                  weight_decay=0.01, beta=0.04, temperature=0.9, max_prompt_length=1500, max_tokens=1024,
                  save_every=50),
}
VARIANTS = {"mrt": ("backtrack", 1.0, 0.0), "outcome": ("backtrack", 0.0, 0.0),  # format, alpha, lambda
            "length": ("backtrack", 0.0, 0.1), "direct": ("direct", 0.0, 0.0)}


@dataclass
class Args:
    variant: str = "mrt"
    """mrt | outcome | length | direct (sets format, alpha and length penalty defaults)"""
    preset: str = "auto"
    """toy | paper | auto (toy when --model is empty, else paper): defaults of the None fields"""
    model: str = ""
    """policy to start from ('' : runs/warmstart/model if fine-tuned from this toy build, else toy base)"""
    train_data: str = ""
    """training problems: .jsonl, .parquet or a hub dataset org/name[:split] ('' : the toy train split)"""
    test_data: str = ""
    """held-out problems for the start/end accuracy ('' : the toy test split)"""
    problem_field: str = "problem"
    """field of a data record holding the problem text"""
    answer_field: str = "answer"
    """field of a data record holding the gold answer"""
    instruction: str | None = None
    """user-turn instruction of a chat template (default: the one in the model's mrt.json, else standard)"""
    out: str = ""
    """run folder ('' : runs/grpo/<variant>)"""
    resume: bool = False
    """continue from <out>/checkpoint/ (same arguments)"""
    seed: int = 0
    """seeds data order, sampling (per step and rank) and initialisation of everything else"""
    steps: int | None = None
    """generation batches, each --num-iterations optimizer steps (toy preset 40; paper preset 500)"""
    prompts_per_step: int | None = None
    """problems per step on each rank (toy preset 16 in all, split over the ranks; paper preset 8)"""
    group_size: int | None = None
    """G: continuations per problem, the GRPO group (toy preset 8; paper preset 4)"""
    micro_batch_size: int | None = None
    """sequences per forward/backward; divides problems x group size (toy preset 32; paper preset 4)"""
    num_iterations: int = 1
    """optimizer passes over each generation batch (mu in the GRPO paper)"""
    lr: float | None = None
    """peak learning rate of AdamW (toy preset 2e-4; paper preset 1e-6)"""
    lr_schedule: str = "cosine"
    """cosine | constant, after linear warmup"""
    warmup_ratio: float | None = None
    """fraction of optimizer steps in linear warmup (toy preset 0.05; paper preset 0.1)"""
    weight_decay: float | None = None
    """AdamW weight decay (toy preset 0.0; paper preset 0.01)"""
    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    loss_type: str = "dapo"
    """grpo | bnpo | dr_grpo | dapo (see grpo_loss)"""
    scale_rewards: str = "group"
    """group | batch | none (see group_advantages)"""
    eps_low: float = 0.2
    """lower clip range of the ratio"""
    eps_high: float = 0.2
    """upper clip range of the ratio (DAPO uses 0.28)"""
    beta: float | None = None
    """k3 KL coefficient to the reference (starting) model, 0 skips it (toy preset 0.0; paper preset 0.04)"""
    is_correction: bool = False
    """truncated importance-sampling correction for sampler/trainer log-prob mismatch"""
    is_cap: float = 3.0
    """cap C of the importance weight min(exp(old_logp - sampler_logp), C)"""
    temperature: float | None = None
    """sampling temperature, the trainer divides logits by it too (toy preset 1.0; paper preset 0.9)"""
    top_p: float = 1.0
    """nucleus sampling"""
    max_prompt_length: int | None = None
    """problems whose prompt is longer (tokens) are dropped (toy preset 256; paper preset 1500)"""
    max_tokens: int | None = None
    """max new tokens of z0 and of each continuation z_{1:2} (toy preset 128; paper preset 1024)"""
    alpha: float | None = None
    """weight of the information-gain bonus (variant default: mrt 1, others 0)"""
    assign: str = "final"
    """final | episode: advantage of every token, or per-episode reward-to-go (see episode_advantages)"""
    length_penalty: float | None = None
    """lambda of the length variant (its default 0.1): reward r - lambda * num_tokens / max_tokens"""
    mu_model: str = ""
    """meta-prover model ('' : the current policy, in the same engine)"""
    mu_suffix: str = utils.MU_SUFFIX
    """forced suffix that makes mu answer now"""
    mu_samples: int = 8
    """m: mu rollouts per context for J(mu | context)"""
    mu_max_tokens: int = 16
    """max tokens of a mu answer"""
    mu_mode: str = "forced"
    """forced: mu answers after --mu-suffix; rollout: mu continues the trace (see sampling.MetaProver)"""
    mu_rollout_tokens: int = 128
    """B: tokens mu writes per sample in --mu-mode rollout"""
    dtype: str = "auto"
    """auto (bf16 on GPU, else fp16; fp32 on CPU) | bf16 | fp16 | fp32; weights and optimizer stay fp32"""
    gpu_memory_utilization: float = 0.3
    """share of GPU memory the vLLM engine may take (its weights and KV cache)"""
    sleep_mode: str = "auto"
    """auto | on | off: vLLM sleep mode, the engine off the GPU during updates (auto: on with CUDA)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward"""
    save_every: int | None = None
    """checkpoint every N steps and at the end (toy preset 10; paper preset 50)"""
    report_to: str = "none"
    """live metrics besides the JSONL files: none | tensorboard | wandb | trackio (optional packages)"""
    eval_problems: int = 128
    """held-out problems for the start/end accuracy (0: skip)"""
    eval_samples: int = 4
    """samples per held-out problem"""
    reward: str = ""
    """custom reward module:function or path/to/file.py:function: (completion, gold, problem record) -> float
    in [0, 1], replacing the math-verify grader at every grading site, mu's included (empty: utils.grade)"""
    answer_from: str = ""
    """solution field whose last \\boxed{} is the gold answer (NuminaMath style); empty: --answer-field"""
    mask_truncated: bool = False
    """DAPO's overlong filtering: completions cut at --max-tokens add no loss tokens (rewards still count)"""


RESUME_FREE = ("out", "resume", "steps", "save_every", "report_to", "dtype", "gpu_memory_utilization",
               "sleep_mode", "gradient_checkpointing")
"""Arguments a --resume may change (--steps only upwards); any other differing from the
checkpoint's is refused (training.check_resume_args): it would change what the run computes."""


def resolve_args(args: Args, world: int) -> Args:
    """Fill the None fields from the preset and the variant; check and derive sizes."""
    if args.variant not in VARIANTS:
        raise utils.UserError(f"--variant must be one of {sorted(VARIANTS)}, got {args.variant!r}")
    preset = args.preset if args.preset != "auto" else ("toy" if not args.model else "paper")
    if preset not in PRESETS:
        raise utils.UserError(f"--preset must be toy, paper or auto, got {args.preset!r}")
    fmt, alpha, lam = VARIANTS[args.variant]
    values = dict(PRESETS[preset], alpha=alpha, length_penalty=lam)
    if preset == "toy":
        values["prompts_per_step"] = max(1, values["prompts_per_step"] // world)
    args = dataclasses.replace(args, preset=preset,
                               **{k: v for k, v in values.items() if getattr(args, k) is None})
    if fmt == "direct" and (args.alpha != 0 or args.assign != "final"):
        raise utils.UserError("--variant direct has no episodes: it needs --alpha 0 and --assign final")
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name, allowed in (("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo")),
                          ("scale_rewards", ("group", "batch", "none")), ("assign", ("final", "episode")),
                          ("lr_schedule", ("cosine", "constant")), ("mu_mode", sampling.MU_MODES)):
        if getattr(args, name) not in allowed:
            raise utils.UserError(f"{flag(name)} must be one of {allowed}, got {getattr(args, name)!r}")
    at_least = [(name, 1, "") for name in ("steps", "prompts_per_step", "micro_batch_size", "num_iterations",
                                           "max_tokens", "mu_samples", "mu_max_tokens", "mu_rollout_tokens")]
    for name, least, why in at_least + [("group_size", 2, " (GRPO compares continuations of one problem)")]:
        if getattr(args, name) < least:
            raise utils.UserError(f"{flag(name)} must be at least {least}{why}, got {getattr(args, name)}")
    B = args.prompts_per_step * args.group_size  # generation batch per rank
    if B % args.micro_batch_size:
        raise utils.UserError(f"--micro-batch-size {args.micro_batch_size} must divide --prompts-per-step x "
                              f"--group-size = {args.prompts_per_step} x {args.group_size} = {B}")
    return args


def variant_format(variant: str) -> str:
    return VARIANTS[variant][0]


# --------------------------------------------------------------------------------------
# Data stream, the attempts z0, held-out accuracy
# --------------------------------------------------------------------------------------


def step_problems(train: list[dict], position: int, args: Args, rank: int,
                  skip: frozenset = frozenset()) -> list[dict]:
    """The P problems of one rank in the step that starts at `position` of the data stream (each step takes
    P x world consecutive positions; rank r takes the r-th share, utils.problem_index). `skip`: ids of
    problems left out of the stream (no usable z0, prepare_z0)."""
    P = args.prompts_per_step
    gone = frozenset(i for i, p in enumerate(train) if p["id"] in skip) if skip else frozenset()
    return [train[utils.problem_index(position + rank * P + j, len(train), args.seed, gone)]
            for j in range(P)]


def prepare_z0(sampler, train: list[dict], test: list[dict], path: str, args: Args, reuse: bool,
               positions: list[int], world: int) -> tuple[frozenset, list[dict], dict, dict]:
    """z0 for every training problem the run will use (the steps that start at `positions`, every rank's
    share) and every held-out problem (Alg. 2: the frozen base's attempt), sampled now, while the engine
    holds the base weights (sampling.prepare_z0: drops, rounds, the stored `path`, reuse, what it returns)."""
    def wanted(skip: frozenset) -> set:
        return {p["id"] for pos in positions for r in range(world)
                for p in step_problems(train, pos, args, r, skip)}

    return sampling.prepare_z0(sampler, train, test, path, wanted, reuse, temperature=args.temperature,
                               top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)


def heldout_accuracy(sampler, problems, z0s, args: Args, seed: int) -> float:
    """Mean accuracy of --eval-samples continuations per held-out problem (graded on z2 for backtrack
    variants; a continuation cut at --max-tokens scores 0, as in training), problems split over the ranks,
    same seed at start and end."""
    rank, world = utils.rank(), utils.world_size()
    mine, eval_args = problems[rank::world], dataclasses.replace(args, group_size=args.eval_samples)
    rows = rollout(sampler, mine, z0s, eval_args, utils.derive_seed(seed, rank)) if mine else []
    return float(np.mean([x for part in utils.all_gather([r["outcome"] for r in rows]) for x in part]))


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
