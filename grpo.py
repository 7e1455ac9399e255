"""grpo.py: MRT-B reinforcement learning on GRPO (paper Alg. 2), and its baselines.

One step of Alg. 2, on every rank, for P problems x of the training set:
  sample     z0 ~ pi_base(. | x) once per problem before any update (sampling.prepare_z0: a cut or box-less
             attempt is resampled, a problem without a usable one in Z0_TRIES tries dropped); G continuations
             z_{1:2} ~ pi(. | x, z0, "\\n" + MARKER + "\\nStep") from the current policy, which names the
             restart step (" k: ...") and writes the revised attempt (rollout)
  reward     r_i = grade(z2_i) on the revised attempt only (z0's box is context, never credited), 0 when cut
             at --max-tokens (sampling.sample_outcome); I_i = J(mu | x, z0, z1_i) - J(mu | x, z0), the
             information gain of the backtrack episode (Def. 5.1, infogain.backtrack_gain);
             R_i = r_i + alpha * I_i                                  (combine_rewards)
  advantage  A_i = (R_i - mean_group) / (std_group + 1e-4)          (group_advantages)
  loss       token-level clipped ratio objective, k3 KL to the reference (grpo_loss)
  update     AdamW over micro-batches with gradient accumulation, --num-iterations optimizer steps per
             generation batch (P x G sequences per rank), FSDP2 across ranks (policy_update)
  sync       the new weights go into the rank's vLLM engine in place (sampling.Sampler.sync_weights)

--variant sets defaults (explicit flags win): mrt (backtrack format, alpha = 1: outcome + information-gain
bonus, MRT-B), outcome (alpha = 0), length (alpha = 0, r - lambda * num_tokens / max_tokens, Fig. 9, lambda
0.1), direct (plain GRPO on the prompt: no z0, no backtrack, reward grade(completion)). --assign final gives
every token of z_{1:2} the group-normalized R (as the paper ran); `episode` gives z1's and z2's tokens their
own reward-to-go (episode_advantages). A continuation that does not parse into episodes gets r = 0 and
I = -J(mu | x, z0): breaking the format never pays (rollout).

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

Outputs in <out> (default runs/grpo/<variant>): z0.jsonl (problems without a usable z0 marked "dropped"),
metrics.jsonl (a line per step; on toy problems also toy.restart_metrics, the restart precision against the
ground truth), samples.jsonl (one group per step with rewards), eval.json (held-out accuracy at start and
end), checkpoint/ (sharded, training.save_checkpoint), model/ with mrt.json.

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

# One OpenMP thread unless told (before `import torch`): the engine and trainer share a CPU (bench/README.md)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sampling  # noqa: E402
import toy  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from infogain import backtrack_cue, backtrack_gain, split_continuation  # noqa: E402

# ---- Alg. 2, sample: G continuations per problem, split into episodes, graded, information gain ----


def rollout(sampler, problems, z0s, args: Args, seed: int, meta_prover=None):
    """G continuations per problem, one dict per continuation, group by group: ctx_ids, token_ids,
    sampler_logp, outcome r, gain I (0 without a meta-prover), text, truncated, (backtrack) episodes and
    z1_tokens (the z1/z2 boundary on the sampled ids, its straddling token z1's). A continuation that does
    not parse into episodes (infogain.split_continuation) has r = 0, all tokens z1's, and J after it = 0
    (mu not asked): I = -J(mu | x, z0), so R = -alpha * J(mu | x, z0) is never above a parsed one's of its
    group. mu is asked once per step: the P contexts x + z0 and every parsed x + z0 + z1_i in one call,
    sharing x + z0 in the engine's prefix cache (sampling.CPU_ENGINE_BLOCK on CPU)."""
    fmt, tok = VARIANTS[args.variant][0], sampler.tokenizer
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


def heldout_accuracy(sampler, problems, z0s, args: Args, evals: dict, key: str, path: str) -> None:
    """evals[key] = mean accuracy of --eval-samples continuations per held-out problem (graded as in
    training), problems split over the ranks, the same seed at start and end; said, and written to `path`."""
    rank, world = utils.rank(), utils.world_size()
    mine, eval_args = problems[rank::world], dataclasses.replace(args, group_size=args.eval_samples)
    seed = utils.derive_seed(utils.derive_seed(args.seed, "held-out"), rank)
    rows = rollout(sampler, mine, z0s, eval_args, seed) if mine else []
    acc = float(np.mean([x for part in utils.all_gather([r["outcome"] for r in rows]) for x in part]))
    utils.record_heldout(path, evals, key, acc, f"{len(problems)} problems x {args.eval_samples}, "
                                                f"variant {args.variant}")


# ---- Alg. 2, reward: R = r + alpha * I - lambda * length -----------------------------


def combine_rewards(outcome, gain, alpha: float, num_tokens=None, length_penalty: float = 0.0,
                    max_completion_length: int | None = None):
    """R_i = r_i + alpha * I_i - lambda * num_tokens_i / max_completion_length (tensors (B,)).
    The bonus varies per sample, so alpha changes the group-normalized advantages."""
    reward = outcome + alpha * gain
    if length_penalty:
        reward = reward - length_penalty * num_tokens / max_completion_length
    return reward


# ---- Alg. 2, advantage: group-normalized, per sequence (`final`) or per episode (`episode`) ----


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
    """(adv_z1, adv_z2), each (B,), of the `episode` assignment: per-episode reward-to-go, group-normalized.
    z1 gets R = alpha * I + r - length penalty (the `final` advantage), z2 gets r - length penalty. Both
    assignments have the same expected policy gradient (the paper's footnote on per-episode vs final
    rewards) up to the group normalization."""
    pen = (num_tokens, length_penalty, max_completion_length)  # the length penalty's arguments
    after_z1 = combine_rewards(outcome, gain, alpha, *pen)  # (B,)
    after_z2 = combine_rewards(outcome, torch.zeros_like(gain), 0.0, *pen)  # (B,)
    return group_advantages(after_z1, group_size, scale), group_advantages(after_z2, group_size, scale)


def assign_advantages(adv_z1: torch.Tensor, adv_z2: torch.Tensor, z1_tokens: torch.Tensor,
                      T: int) -> torch.Tensor:
    """Per-token advantages (B, T) of the `episode` assignment: positions t < z1_tokens[i] (the
    backtrack episode z1) get adv_z1[i], the rest (the revised attempt z2, EOS included) get
    adv_z2[i]. The `final` assignment is the (B,) advantage itself, broadcast by grpo_loss."""
    pos = torch.arange(T)[None, :]  # (1, T)
    return torch.where(pos < z1_tokens[:, None], adv_z1[:, None], adv_z2[:, None]).float()  # (B, T)


# ---- Alg. 2, loss: token-level clipped ratio objective, k3 KL to the reference -------


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
    The caller scales each micro-batch's loss for accumulation over micro-batches and ranks
    (micro_batch_scale)."""
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


# ---- Alg. 2, update: micro-batches, gradient accumulation, --num-iterations optimizer steps (then sync) ----


def micro_batch_scale(loss_type: str, n_micro: int, world: int) -> float:
    """Factor on each micro-batch's grpo_loss so that the accumulated gradient, averaged over ranks (FSDP),
    is the generation batch's (TRL's rules): 1 / micro-batches, except `dapo` (its num_items already counts
    every micro-batch and rank): times the world size, undoing FSDP's average."""
    return float(world) if loss_type == "dapo" else 1.0 / n_micro


def policy_update(model, ref, opt, sched, rows: list[dict], advantages, args: Args, pad_id: int):
    """Loss and update on one generation batch: micro-batches with gradient accumulation, --num-iterations
    optimizer steps; old (and reference) log-probs from the first pass, before any update of this batch.
    `advantages`: (B,) for the `final` assignment, or (B, 2) for `episode` (z1's and z2's; z1 is a row's
    first z1_tokens tokens). Returns the per-micro-batch metrics (first pass first) and the last gradient
    norm, read from the device once. Under FSDP2 the gradients are reduced over the ranks once per optimizer
    step, in the backward of its last micro-batch (training.gradient_sync). With --mask-truncated, cut
    completions add no tokens (overlong_mask), nor to dapo's token count."""
    M, world, n_micro = args.micro_batch_size, utils.world_size(), len(rows) // args.micro_batch_size
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
            if it == 0:  # the old and reference log-probs: the first pass's, before any update of this batch
                old_logp[k] = logp.detach()
                with torch.no_grad():
                    ref_logp[k] = None if ref is None else training.completion_logprobs(
                        ref, ctx, comp, pad_id, args.temperature)[0]  # (M, T)
            a = advantages[sl]  # (M,) `final`, broadcast over the tokens; (M, 2) `episode`: (M, T) per token
            adv = a if a.dim() == 1 else assign_advantages(a[:, 0], a[:, 1], torch.tensor(
                [r["z1_tokens"] for r in mb]), logp.shape[1])
            loss, m = grpo_loss(logp, old_logp[k], ref_logp[k], adv.to(logp.device), mask,
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
        grad_norm = training.optimizer_step(model, opt, sched, args.max_grad_norm)
    *stats, last = training.read_metrics([*stats, {"grad_norm": grad_norm}])  # one host read per batch
    for m in stats[:n_micro]:
        m["logprob_gap"] /= max(1.0, m["tokens"])
    return stats, last["grad_norm"]


# ---- Main: Alg. 2 --------------------------------------------------------------------


def main(args: Args) -> dict:
    """Train; returns the held-out accuracies {"start", "end"}. An engine on the starting model in
    sampling.READY (tests) is used instead of a new one, with the trainer's weights synced into it."""
    rank, world, device = utils.init_distributed()
    args = resolve_args(args, world)
    out, fmt = args.out or os.path.join("runs", "grpo", args.variant), VARIANTS[args.variant][0]
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
    utils.print0(f"grpo: variant {args.variant} ({fmt}), preset {args.preset}, model {model_path}, "
                 f"world {world}, {args.prompts_per_step} prompts x {args.group_size} per rank per step, "
                 f"{args.steps} steps")

    # -- data (its prompt lengths size the engine) ------------------------------------------
    tok = utils.load_tokenizer(model_path)
    train, test = utils.rl_problems(args, tok, toy_paths)  # a bad --reward fails here, before any model loads
    on_toy = backtrack and any(toy.parse_problem(p["problem"]) for p in train)  # restart precision, toy only

    # -- models: vLLM engine sized from the run's lengths, policy (FSDP2, fp32 masters), reference, mu --
    uses_mu = args.alpha != 0.0 or args.assign == "episode"
    longest = max(p["prompt_tokens"] for p in train + test)
    ready = model_path in sampling.READY  # it may hold other weights (and a prefix cache computed with them)
    sampler = sampling.rl_engine(model_path, tok, longest, args, backtrack, uses_mu and not args.mu_model)
    model, ref = training.load_trainer(model_path, args.dtype, device, args.gradient_checkpointing,
                                       reference=args.beta != 0.0)
    model.train()
    meta_prover = sampling.rl_meta_prover(sampler, tok, longest, args, backtrack) if uses_mu else None
    opt, sched = training.adamw(model, args, args.steps * args.num_iterations, args.lr_schedule)

    # -- resume ------------------------------------------------------------------------------
    P, G, per_step = args.prompts_per_step, args.group_size, args.prompts_per_step * world
    start, data_pos = 0, 0  # first step of this run, and its position in the data stream
    if args.resume:
        extra = training.load_checkpoint(ckpt_path, model, opt, sched)
        start, data_pos = extra["step"], extra["data_position"]
        utils.print0(f"resumed from {ckpt_path} at step {start}")
    if ready or args.resume:  # the engine samples from the trainer's (restored) weights
        sampler.sync_weights(model)

    def position(step: int) -> int:  # where a step starts in the endless data stream
        return data_pos + (step - start) * per_step

    # -- z0 from the frozen base for every problem the run will use (Alg. 2); held-out accuracy at start --
    train_z0, test_z0, skip = {}, {}, frozenset()
    if backtrack:  # every rank's problems of every step from `start` on, and the held-out ones
        skip, test, train_z0, test_z0 = sampling.prepare_z0(
            sampler, train, test, os.path.join(out, "z0.jsonl"), args, args.resume,
            [position(s) for s in range(start, args.steps)], world)
    evals = json.load(open(eval_path)) if args.resume and os.path.exists(eval_path) else {}
    if test and "start" not in evals:
        heldout_accuracy(sampler, test, test_z0, args, evals, "start", eval_path)

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
        problems = utils.step_problems(train, position(step), args, rank, skip)
        rows = rollout(sampler, problems, train_z0, args, utils.derive_seed(args.seed, "rollout", step, rank),
                       meta_prover)
        t_sample = time.time() - t_step
        t_mu, mu_tokens = meta_prover.lap() if meta_prover else (0.0, None)  # mu's share of this step

        # ---- reward: R = r + alpha * I - lambda * length, gathered over ranks ---------------
        outcome, gain = (torch.tensor([r[k] for r in rows]) for k in ("outcome", "gain"))  # (B,) each
        ntok = torch.tensor([r["num_tokens"] for r in rows], dtype=torch.float)  # (B,)
        reward = combine_rewards(outcome, gain, args.alpha, ntok, args.length_penalty, args.max_tokens)
        mine = {"outcome": outcome, "gain": gain, "reward": reward, "tokens": ntok}
        every = {k: torch.cat([r[k] for r in utils.all_gather(mine)]) for k in mine}  # (B * world,) each

        # ---- advantage: group-normalized (groups never straddle ranks; `batch` scale sees all)
        own = slice(rank * P * G, (rank + 1) * P * G)
        advantages = adv_final = group_advantages(every["reward"], G, args.scale_rewards)[own]  # (B,)
        if args.assign == "episode":  # reward-to-go: z1 tokens A(alpha * I + r - pen.), z2 tokens A(r - pen.)
            adv_z1, adv_z2 = episode_advantages(every["outcome"], every["gain"], every["tokens"], G,
                                                alpha=args.alpha, length_penalty=args.length_penalty,
                                                max_completion_length=args.max_tokens,
                                                scale=args.scale_rewards)  # (B * world,) each
            advantages = torch.stack([adv_z1[own], adv_z2[own]], dim=1)  # (B, 2)

        # ---- loss and update (engine asleep with --sleep-mode), then sync: the next batch's weights
        t1 = time.time()
        stats, grad_norm = sampling.update_asleep(sampler, lambda: policy_update(
            model, ref, opt, sched, rows, advantages, args, tok.pad_token_id), model)
        t_train = time.time() - t1

        # ---- log, checkpoint -------------------------------------------------------------------
        times = dict(time_sample=t_sample, time_mu=t_mu, time_train=t_train, time_step=time.time() - t_step)
        rec = training.step_record(step + 1, every, rows, stats, grad_norm, sched.get_last_lr()[0], times,
                                   args, mu_tokens)
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
        heldout_accuracy(sampler, test, test_z0, args, evals, "end", eval_path)
    training.save_model(model, tok, os.path.join(out, "model"), dict(card, args=dataclasses.asdict(args)))
    return evals


# ---- Arguments: presets (where every preset value is defined), variants, checks ------

PRESETS = {
    # toy: sized so that `python grpo.py` improves held-out accuracy in minutes on 2 CPU cores.
    "toy": dict(steps=40, prompts_per_step=16, group_size=8, micro_batch_size=32, lr=2e-4, warmup_ratio=0.05,
                weight_decay=0.0, beta=0.0, temperature=1.0, max_prompt_length=256, max_tokens=128,
                save_every=10),
    # paper: Table 2; steps, prompts per rank, micro-batch and beta (TRL's default then) are assumptions
    "paper": dict(steps=500, prompts_per_step=8, group_size=4, micro_batch_size=4, lr=1e-6, warmup_ratio=0.1,
                  weight_decay=0.01, beta=0.04, temperature=0.9, max_prompt_length=1500, max_tokens=1024,
                  save_every=50),
}
VARIANTS = {"mrt": ("backtrack", 1.0, 0.0), "outcome": ("backtrack", 0.0, 0.0),  # format, alpha, lambda
            "length": ("backtrack", 0.0, 0.1), "direct": ("direct", 0.0, 0.0)}


@dataclasses.dataclass
class Args(utils.DataArgs, training.TrainerArgs, sampling.MuArgs):
    """This stage's own flags; the bases add those every stage spells alike (--help lists all)."""
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
    save_every: int | None = None
    """checkpoint every N steps and at the end (toy preset 10; paper preset 50)"""
    eval_problems: int = 128
    """held-out problems for the start/end accuracy (0: skip)"""
    eval_samples: int = 4
    """samples per held-out problem"""
    mask_truncated: bool = False
    """DAPO's overlong filtering: completions cut at --max-tokens add no loss tokens (rewards still count)"""


RESUME_FREE = training.RESUME_FREE + ("steps",)  # --steps only upwards (main)


def resolve_args(args: Args, world: int) -> Args:
    """Fill the None fields from the preset and the variant; check and derive sizes."""
    utils.check_flags(args, choices={"variant": VARIANTS, "preset": ("toy", "paper", "auto")})
    preset = args.preset if args.preset != "auto" else ("toy" if not args.model else "paper")
    fmt, alpha, lam = VARIANTS[args.variant]
    values = dict(PRESETS[preset], alpha=alpha, length_penalty=lam)
    if preset == "toy":
        values["prompts_per_step"] = max(1, values["prompts_per_step"] // world)
    args = dataclasses.replace(args, preset=preset,
                               **{k: v for k, v in values.items() if getattr(args, k) is None})
    if fmt == "direct" and (args.alpha != 0 or args.assign != "final"):
        raise utils.UserError("--variant direct has no episodes: it needs --alpha 0 and --assign final")
    sampling.check_mu_args(args)
    at_least = dict.fromkeys(("steps", "prompts_per_step", "micro_batch_size", "num_iterations",
                              "max_tokens"), 1)
    choices = {"loss_type": ("grpo", "bnpo", "dr_grpo", "dapo"), "scale_rewards": ("group", "batch", "none"),
               "assign": ("final", "episode"), "lr_schedule": ("cosine", "constant")}
    utils.check_flags(args, choices, at_least | {"group_size": 2},
                      why={"group_size": " (GRPO compares continuations of one problem)"})
    B = args.prompts_per_step * args.group_size  # generation batch per rank
    if B % args.micro_batch_size:
        raise utils.UserError(f"--micro-batch-size {args.micro_batch_size} must divide --prompts-per-step x "
                              f"--group-size = {args.prompts_per_step} x {args.group_size} = {B}")
    return args


if __name__ == "__main__":
    utils.run_main(main, utils.parse_args(Args))
