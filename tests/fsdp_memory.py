"""The memory- and speed-side paths of training.py and sampling.py on FSDP2 shards; a worker for
tests/test_fsdp.py, run under `torchrun --nproc_per_node 2` (CPU, gloo):

    torchrun --standalone --nproc_per_node 2 tests/fsdp_memory.py --base runs/toy/base --out /tmp/mem

- `iter_full_params` (the weight sync's source): shards cast first and gathered in buckets, against
  each entry gathered whole and then cast, as it was done before; on the toy (tied embeddings) and
  on a module of uneven shards (5 rows as 3 + 2, 1 row as 1 + 0); the all-gathers are counted.
- `gradient_sync`: gradients added up unreduced over two micro-batches and reduced once, against
  gradients reduced every micro-batch.
- `load_trainer(..., reference=True)` with bf16 compute: the reference's shards are bf16, the
  policy's fp32, and the two compute the same log-probabilities.
- `Sampler(backend="hf").sync_weights` from the sharded model: copied into the sampler's own
  tensors.

Rank 0 writes --out/memory.pt.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fsdp_step  # noqa: E402
import sampling  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402


def whole_then_cast(model, dtype=None):
    """iter_full_params as it was: every state-dict entry gathered whole (fp32), then cast."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        t = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


def same_entries(want, got) -> bool:
    """The same names and tensors (dtypes included); the same order but for tied names, which
    come together, at the first one's place."""
    want, order = dict(want), [n for n, _ in got]
    return sorted(want) == sorted(order) and len(order) == len(want) and all(
        want[n].dtype == t.dtype and torch.equal(want[n], t) for n, t in got) and \
        [n for n in want if n != "lm_head.weight"] == [n for n in order if n != "lm_head.weight"]


def counting_gathers(fn):
    """fn()'s result and the number of all_gather_into_tensor calls it made."""
    real, count = dist.all_gather_into_tensor, [0]

    def counted(*a, **k):
        count[0] += 1
        return real(*a, **k)

    dist.all_gather_into_tensor = counted
    try:
        return fn(), count[0]
    finally:
        dist.all_gather_into_tensor = real


def check_iter_full_params(base: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    out = {}
    model, _ = training.load_trainer(base, dtype="fp32", device="cpu")
    for dtype in (None, torch.bfloat16):
        want = list(whole_then_cast(model, dtype))
        for bucket in (1, 64 * 1024, None):  # one tensor per bucket, several, all in one
            got, calls = counting_gathers(lambda: list(training.iter_full_params(model, dtype, bucket)))
            out[(str(dtype), bucket)] = {"same": same_entries(want, got), "gathers": calls}
    got = dict(training.iter_full_params(model, torch.bfloat16))
    out["tied_once"] = got["lm_head.weight"] is got["model.embed_tokens.weight"]
    out["entries"] = len(dict(training._state_entries(model)))
    torch.manual_seed(0)
    uneven = fully_shard(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1)))  # 3 + 2 and 1 + 0 rows
    want = list(whole_then_cast(uneven, torch.bfloat16))
    got, calls = counting_gathers(lambda: list(training.iter_full_params(uneven, torch.bfloat16)))
    out["uneven"] = {"same": same_entries(want, got), "gathers": calls,
                     "rows": [t.to_local().shape[0] for t in uneven.state_dict().values()]}
    return out


def check_gradient_sync(base: str, tok, ctx, comp) -> dict:
    """Two micro-batches of this rank's rows, loss summed; the full gradients either way."""
    micro = [(ctx[:1], comp[:1]), (ctx[1:], comp[1:])]
    grads, skipped = {}, None
    for each in (True, False):
        model, _ = training.load_trainer(base, dtype="fp32", device="cpu")
        for k, (c, t) in enumerate(micro):
            training.gradient_sync(model, each or k == len(micro) - 1)
            lp, mask, _ = training.completion_logprobs(model, c, t, tok.pad_token_id)  # (b, Tc)
            (-(lp * mask).sum()).backward()
            if not each and k == 0:  # not reduced yet: no sharded gradient exists
                skipped = all(p.grad is None for p in model.parameters())
        grads[each] = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    return {"each": grads[True], "once": grads[False], "skipped": skipped}


def check_reference(base: str, tok, ctx, comp) -> dict:
    from torch.distributed.tensor import DTensor

    model, ref = training.load_trainer(base, dtype="bf16", device="cpu", reference=True)
    dtypes = {"ref_dtypes": sorted({str(p.dtype) for p in ref.parameters()}),
              "policy_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
              "ref_sharded": all(isinstance(p, DTensor) for p in ref.parameters())}
    with torch.no_grad():
        lp_policy, mask, _ = training.completion_logprobs(model, ctx, comp, tok.pad_token_id)  # (b, Tc)
        lp_ref = training.completion_logprobs(ref, ctx, comp, tok.pad_token_id)[0]  # (b, Tc)
    return {**dtypes, "equal": torch.equal(lp_policy, lp_ref), "tokens": int(mask.sum())}


def check_hf_sync(base: str) -> dict:
    model, _ = training.load_trainer(base, dtype="fp32", device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # other weights than the sampler's
    hf = sampling.Sampler(base, backend="hf")
    before = {n: t.data_ptr() for n, t in hf.model.state_dict().items()}
    hf.sync_weights(model)
    full, own = training.full_state_dict(model), hf.model.state_dict()
    return {"equal": sorted(full) == sorted(own) and all(torch.equal(full[k], own[k]) for k in full),
            "in_place": before == {n: t.data_ptr() for n, t in own.items()}}


def run(base: str, out: str) -> None:
    rank, world, _ = utils.init_distributed()
    tok = utils.load_tokenizer(base)
    ctx, comp = fsdp_step.batch(tok)
    mine = list(range(rank, fsdp_step.N_SEQS, world))
    ctx, comp = [ctx[i] for i in mine], [comp[i] for i in mine]
    result = {"world": world, "iter": check_iter_full_params(base),
              "grads": check_gradient_sync(base, tok, ctx, comp),
              "reference": check_reference(base, tok, ctx, comp), "hf_sync": check_hf_sync(base)}
    result["reference"] = utils.all_gather(result["reference"])
    result["hf_sync"] = utils.all_gather(result["hf_sync"])
    if utils.is_main():
        torch.save(result, os.path.join(out, "memory.pt"))
    utils.barrier()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run(args.base, args.out)
