"""One AdamW step on the toy base model, single process or FSDP2 under torchrun; a worker
for tests/test_fsdp.py, which runs it both ways and compares what it saves.

    python tests/fsdp_step.py --base /work/toy-dev/base --out /tmp/one
    torchrun --standalone --nproc_per_node 2 tests/fsdp_step.py --base /work/toy-dev/base --out /tmp/two --sample

Rank 0 saves to --out/result.pt: the weights as loaded (training.load_trainer, with its frozen
reference copy), every rank's buffers of both, and whether the embeddings are still tied, the
loss and gradient norm of the step, the full gradients, the full updated weights, and the
weights after a second step taken by a model restored from the checkpoint written after the
first (training.save_checkpoint/load_checkpoint). It also saves the updated model with
training.save_pretrained under --out/hf. With --sample, every rank builds its own vLLM engine, samples its own prompt before and after `sync_weights` from the sharded
model, and writes --out/sample_<rank>.json with the engine's results next to transformers'
(and its first unseeded samples of a prompt shared by all ranks).
"""

import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sampling  # noqa: E402
import toy  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402

N_SEQS = 6


def batch(tokenizer):
    """Six toy problems with their solutions (EOS included) as (prompt ids, completion ids);
    loss on the completion tokens only. Lengths differ, so the two ranks hold different
    numbers of loss tokens."""
    seqs, n_prompt = [], []
    for i in range(N_SEQS):
        p = toy.make_problem(random.Random(i))
        lines, final = toy.solution_steps(p["start"], p["ops"])
        prompt = tokenizer(utils.build_prompt(tokenizer, p["problem"]))["input_ids"]
        completion = tokenizer(toy.render_solution(lines, final), add_special_tokens=False)["input_ids"]
        seqs.append(prompt + completion + [tokenizer.eos_token_id])
        n_prompt.append(len(prompt))
    return [s[:k] for s, k in zip(seqs, n_prompt)], [s[k:] for s, k in zip(seqs, n_prompt)]  # (contexts, completions)


def step(model, opt, ctx, comp, world, pad_id):
    """Token-mean cross-entropy over the whole (all-rank) batch, one clipped AdamW step.
    FSDP2 averages gradients over ranks, so each rank's sum is scaled by world / N_total."""
    nll, mask, _ = training.completion_logprobs(model, ctx, comp, pad_id)  # (b, Tc)
    nll = -nll
    n_local = mask.sum()
    n_total = utils.all_reduce(n_local)
    local_sum = (nll * mask).sum()
    (local_sum * world / n_total).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # active: the norm was 0.2-0.7 on toy builds
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    loss = utils.all_reduce(local_sum.detach())
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (loss / n_total).item(), grad_norm.item(), grads, int(n_local.item())


def new_model_and_opt(base, reference=False):
    """training.load_trainer: read by rank 0 only, each rank sent its own rows, under torchrun;
    on this rank's device (the CPU under gloo, its GPU under NCCL)."""
    model, ref = training.load_trainer(base, dtype="fp32", device=utils.default_device(), reference=reference)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    return (model, opt, ref) if reference else (model, opt)


def greedy_ids(model, tokenizer, prompt, max_tokens):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def logprob_gap(model, tokenizer, prompt, samples):
    p = tokenizer(prompt)["input_ids"]
    gaps = []
    for s in samples:
        with torch.no_grad():
            want = training.completion_logprobs(model, [p], [s.token_ids], tokenizer.pad_token_id)[0][0]  # (Tc,)
        gaps.append((want - torch.tensor(s.logprobs)).abs().max().item())
    return max(gaps)


def uneven_round_trip(out: str) -> None:
    """training.py's scatter from rank 0 and gather to rank 0 on FSDP2 shards of uneven row counts:
    a (5, 3) weight (3 + 2 rows) and a (1,) bias (1 + 0 rows), moved in pieces of 2 rows
    (MOVE_CHUNK_BYTES set to 24 bytes). Rank 0 writes what came back."""
    from torch.distributed.fsdp import fully_shard

    training.MOVE_CHUNK_BYTES = 2 * 3 * 4  # two fp32 rows of the weight

    layer = fully_shard(torch.nn.Linear(3, 5))
    wanted = {"weight": torch.arange(15.0).view(5, 3), "bias": torch.arange(5.0) + 100}
    sd = layer.state_dict(keep_vars=True)
    for name, t in sd.items():
        training._scatter_from_rank0(t, wanted[name] if utils.is_main() else None)
    rows = {name: t.to_local().shape[0] for name, t in sd.items()}
    back = {name: training._gather_to_rank0(t) for name, t in sd.items()}
    one = fully_shard(torch.nn.Linear(3, 1))
    b = one.state_dict(keep_vars=True)["bias"]
    training._scatter_from_rank0(b, torch.tensor([7.0]) if utils.is_main() else None)
    rows["one bias"], back["one bias"] = b.to_local().shape[0], training._gather_to_rank0(b)
    rows = utils.all_gather(rows)
    if utils.is_main():
        torch.save({"wanted": wanted, "back": back, "rows": rows}, os.path.join(out, "uneven.pt"))


def run(base: str, out: str, sample: bool = False) -> None:
    rank, world, _ = utils.init_distributed()
    utils.seed_everything(0)
    tok = utils.load_tokenizer(base)
    ctx, comp = batch(tok)
    mine = list(range(rank, N_SEQS, world))  # this rank's rows of the fixed batch
    ctx, comp = [ctx[i] for i in mine], [comp[i] for i in mine]

    if sample:  # before any training: each rank samples its own prompt with the base weights
        sampler = sampling.Sampler(base, seed=0)
        shared = utils.build_prompt(tok, toy.make_problem(random.Random(999))["problem"])
        unseeded = sampler.generate([shared], n=8, temperature=1.0, max_tokens=30)[0]  # first draw of the engine
        prompt = utils.build_prompt(tok, toy.make_problem(random.Random(1000 + rank))["problem"])
        ref = utils.load_model(base, dtype="float32", device="cpu").eval()
        before = sampler.generate([prompt], temperature=0.0, max_tokens=60)[0][0]
        before_ref = greedy_ids(ref, tok, prompt, 60)

    model, opt, ref_model = new_model_and_opt(base, reference=True)
    loaded, ref_state = training.full_state_dict(model), training.full_state_dict(ref_model)
    # every buffer, non-persistent ones (rotary frequencies) included, on every rank
    buffers = utils.all_gather({f"{k}{n}": b.detach().cpu().clone() for k, m in (("", model), ("ref.", ref_model))
                                for n, b in m.named_buffers()})
    tied = model.lm_head.weight is model.model.embed_tokens.weight  # the toy ties them
    del ref_model
    loss, grad_norm, grads, n_local = step(model, opt, ctx, comp, world, tok.pad_token_id)
    state = training.full_state_dict(model)

    # checkpoint round trip: a fresh model and optimizer restored from it take the same next step
    ckpt = os.path.join(out, "ckpt")
    training.save_checkpoint(ckpt, model, opt, step=1)
    model2, opt2 = new_model_and_opt(base)
    extra = training.load_checkpoint(ckpt, model2, opt2)
    restored = training.full_state_dict(model2)
    step(model, opt, ctx, comp, world, tok.pad_token_id)
    step(model2, opt2, ctx, comp, world, tok.pad_token_id)
    second, second_restored = training.full_state_dict(model), training.full_state_dict(model2)

    counts = utils.all_gather(n_local)
    if utils.is_main():
        torch.save({"loss": loss, "grad_norm": grad_norm, "grads": grads, "state": state, "restored": restored,
                    "extra": extra, "second": second, "second_restored": second_restored, "tokens": counts,
                    "world": world, "loaded": loaded, "ref_state": ref_state, "tied": tied, "buffers": buffers},
                   os.path.join(out, "result.pt"))
    training.save_pretrained(model, tok, os.path.join(out, "hf"))  # the model after two steps
    training.save_pretrained(model, tok, os.path.join(out, "hf_parts"), shard_bytes=1 << 20)  # in several files
    if world > 1:
        uneven_round_trip(out)

    if sample:  # sync from the sharded model (every rank gathers), then sample again
        ref.load_state_dict(training.full_state_dict(model))
        stale = sampler.generate([prompt], n=2, temperature=1.0, max_tokens=40, seed=1)[0]
        sampler.sync_weights(model)
        after = sampler.generate([prompt], temperature=0.0, max_tokens=60)[0][0]
        fresh = sampler.generate([prompt], n=2, temperature=1.0, max_tokens=40, seed=1)[0]
        utils.write_json(os.path.join(out, f"sample_{rank}.json"), {
            "rank": rank, "prompt": prompt,
            "before": before.token_ids, "before_ref": before_ref,
            "after": after.token_ids, "after_ref": greedy_ids(ref, tok, prompt, 60),
            "unseeded": [s.token_ids for s in unseeded],
            "stale_gap": logprob_gap(ref, tok, prompt, stale), "fresh_gap": logprob_gap(ref, tok, prompt, fresh),
        })
    utils.barrier()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sample", action="store_true")
    args = ap.parse_args()
    run(args.base, args.out, args.sample)
