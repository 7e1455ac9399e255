"""bench/memory.py: peak host memory of each training phase per rank, and of the log-probs.

Part 1 runs `torchrun --nproc_per_node N` (gloo, CPU) on a model and, on every rank, these
phases one after the other, with training.py's own functions:
  load      training.load_trainer (every rank builds the model on the meta device; rank 0 reads
            the weights one tensor at a time and scatters it, each rank receiving its shard)
  step      one AdamW step: training.completion_logprobs on a small batch, backward, clip, step
            (the optimizer's state comes into being here)
  save      training.save_checkpoint (sharded, torch.distributed.checkpoint)
  resume    training.load_checkpoint into the same model and optimizer
  export    training.save_pretrained (gathered to rank 0 only, one tensor at a time, written in the
            config's dtype in files of --export-share of the checkpoint, as an 8B model's are)
Load and export move tensors between ranks in pieces of --piece-share of the model, the share
training.MOVE_CHUNK_BYTES is of an 8B model (on a 67 MiB model the 16 MiB default would be a
quarter of it).
For each phase and rank it prints the peak resident memory above the resident memory at the
start of the phase, as a multiple of the model's full state (fp32 parameter bytes, tied
weights once). A rank that held a full copy of the model in a phase shows >= 1.0 there.

Part 2 measures the log-prob computation at the model's vocabulary (128,256 for Llama-3) on a
(B, T) batch of completion tokens: the formula training used before (fp32 log_softmax over the
vocabulary, entropy from it) against training.completion_logprobs' computation
(training.sampled_logprobs, in place, + training.token_entropy), each in a fresh subprocess: logits
from an output head (hidden size 64, so the head itself is small), log-probs, entropy and the
backward pass into the head. It prints each peak (logits included) and the ratio.

How memory is measured: Linux's per-process high-water mark of resident memory (VmHWM in
/proc/self/status), reset at the start of each phase by writing 5 to /proc/self/clear_refs.
Freed heap pages are returned to the system before each reset (malloc_trim), so a phase's
figure is the memory it added. It counts every page the process touched, allocator caches
included: a peak, not an exact tensor account. It sees
host memory only (CPU runs); on GPU use torch.cuda.max_memory_allocated instead.

    python bench/memory.py                       # the realistic-shape model (tests/realistic.py)
    python bench/memory.py --model runs/x/base   # any local model folder
    python bench/memory.py --model M --nproc 2 --batch 4 --tokens 256 --dtype fp32
    python bench/memory.py --model M --parts logprobs --logits-dtype bf16   # part 2 only, bf16 logits

It asserts nothing: it prints the two tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

PHASES = ("load", "step", "save", "resume", "export")


def rss() -> tuple[int, int]:
    """(current resident bytes, high-water resident bytes since the last reset)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak() -> int:
    """Give freed heap pages back to the system (glibc malloc_trim: otherwise memory freed by
    an earlier phase stays resident, is reused unseen, and hides the next phase's peak), then
    reset the high-water mark to the current resident memory; return that."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss()[0]


# --------------------------------------------------------------------------------------
# Part 1: phases under torchrun (worker)
# --------------------------------------------------------------------------------------


def worker(model_path: str, out: str, dtype: str, batch: int, tokens: int, export_share: float,
           piece_share: float) -> None:
    import gc

    import torch

    import training
    import utils

    rank, world, device = utils.init_distributed()
    tok = utils.load_tokenizer(model_path)
    g = torch.Generator().manual_seed(rank)
    vocab = len(tok)
    ctx = [torch.randint(3, vocab, (16,), generator=g).tolist() for _ in range(batch)]
    comp = [torch.randint(3, vocab, (tokens,), generator=g).tolist() for _ in range(batch)]
    result, objs = {}, {}

    def phase(name, fn):
        gc.collect()
        utils.barrier()
        before = reset_peak()
        fn()
        gc.collect()
        utils.barrier()
        result[name] = rss()[1] - before

    def load():
        objs["model"], _ = training.load_trainer(model_path, dtype, device)
        objs["opt"] = torch.optim.AdamW(objs["model"].parameters(), lr=1e-6)

    def step():
        model, opt = objs["model"], objs["opt"]
        lp, mask, _ = training.completion_logprobs(model, ctx, comp, tok.pad_token_id)  # (B, T)
        (-(lp * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the model's size, for the piece size of load and export
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    training.MOVE_CHUNK_BYTES = max(1024, int(piece_share * sum(p.numel() * 4 for p in meta.parameters())))
    del meta
    ckpt = os.path.join(out, "checkpoint")
    phase("load", load)
    phase("step", step)
    phase("save", lambda: training.save_checkpoint(ckpt, objs["model"], objs["opt"], step=1))
    phase("resume", lambda: training.load_checkpoint(ckpt, objs["model"], objs["opt"]))
    model = objs["model"]
    saved_bytes = sum(t.numel() * (model.save_dtype.itemsize if t.is_floating_point() else t.element_size())
                      for _, t in training._state_entries(model))
    shard_bytes = max(1, int(export_share * saved_bytes))
    phase("export", lambda: training.save_pretrained(model, tok, os.path.join(out, "export"), shard_bytes=shard_bytes))
    seen, full_bytes, largest = set(), 0, 0
    for p in model.parameters():  # unique parameters (tied weights once), full (unsharded) sizes
        if id(p) not in seen:
            seen.add(id(p))
            full_bytes += p.numel() * 4
            largest = max(largest, p.numel() * 4)
    result.update(rank=rank, world=world, full_bytes=full_bytes, largest=largest, rss_end=rss()[0],
                  saved_bytes=saved_bytes, shard_bytes=shard_bytes, piece_bytes=training.MOVE_CHUNK_BYTES)
    utils.write_json(os.path.join(out, f"rank{rank}.json"), result)
    utils.barrier()


# --------------------------------------------------------------------------------------
# Part 2: log-prob computation, one variant per fresh process
# --------------------------------------------------------------------------------------


def logprob_worker(variant: str, batch: int, tokens: int, vocab: int, dtype: str) -> dict:
    """One variant, as training runs it: logits from an output head (hidden 64 -> vocab),
    log-probs of the sampled tokens, entropy, backward into the head and the hidden states."""
    import torch

    import training

    torch.set_num_threads(1)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, tokens + 1, 64, generator=g).to(dt).requires_grad_(True)  # (B, T + 1, H)
    head = (torch.randn(vocab, 64, generator=g) / 8).to(dt).requires_grad_(True)  # (V, H)
    targets = torch.randint(0, vocab, (batch, tokens), generator=g)  # (B, T)
    w = torch.randn(batch, tokens, generator=g)  # (B, T): stands for advantages
    temperature = 0.9
    before = reset_peak()
    logits = hidden @ head.T  # (B, T + 1, V)
    if variant == "old":  # the formula training used before
        logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, T, V)
        logp = logp_all.gather(-1, targets[:, :, None]).squeeze(-1)  # (B, T)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, T)
    else:  # training.completion_logprobs' computation
        logp = training.sampled_logprobs(logits, targets, temperature, inplace=True)  # (B, T)
        entropy = training.token_entropy(logits.detach(), tokens, temperature)  # (B, T)
    logits_bytes = logits.numel() * logits.element_size()
    del logits
    (logp * w).sum().backward()
    peak = rss()[1] - before
    return {"variant": variant, "peak": peak, "logits_bytes": logits_bytes, "logp_sum": logp.sum().item(),
            "entropy_sum": entropy.sum().item(), "grad_head_sum": head.grad.float().sum().item()}


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


def default_model(tmp: str) -> str:
    """The realistic-shape model (Llama-3 shape, vocabulary 128,256), built by tests/realistic.py."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from realistic import build_realistic
    except ImportError as e:
        sys.exit(f"error: bench/memory.py needs tests/realistic.py (build_realistic) to build its default "
                 f"model ({e}); pass --model PATH instead")
    return build_realistic(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="model folder ('' : build the realistic-shape model)")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun ranks for part 1")
    ap.add_argument("--dtype", default="bf16", help="compute dtype of the trainer in part 1 (weights stay fp32)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step / log-prob batch")
    ap.add_argument("--tokens", type=int, default=256, help="completion tokens per sequence")
    ap.add_argument("--logits-dtype", default="fp32", help="dtype of the given logits in part 2 (fp32 | bf16)")
    ap.add_argument("--parts", default="phases,logprobs", help="what to run: phases, logprobs or both")
    ap.add_argument("--export-share", type=float, default=0.31,
                    help="export's file size as a share of the saved checkpoint (default 0.31: an 8B model's "
                         "16 GB bf16 checkpoint in training.EXPORT_SHARD_BYTES = 5 GiB files)")
    ap.add_argument("--piece-share", type=float, default=0.0005,
                    help="size of the pieces load and export move between ranks, as a share of the full fp32 state "
                         "(default 0.0005: training.MOVE_CHUNK_BYTES = 16 MiB of an 8B model's 32 GB)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "phases":
        return worker(a.model, a.out, a.dtype, a.batch, a.tokens, a.export_share, a.piece_share)
    if a.worker in ("old", "new"):
        print(json.dumps(logprob_worker(a.worker, a.batch, a.tokens, a.vocab, a.logits_dtype)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or default_model(os.path.join(tmp, "model"))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        out = os.path.join(tmp, "run")
        os.makedirs(out)
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        if "phases" in a.parts:
            phases(a, model, cfg, out, env)
        if "logprobs" in a.parts:
            logprobs(a, cfg, env)


def phases(a, model: str, cfg, out: str, env: dict) -> None:
    """Part 1: run the torchrun worker and print its table."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc),
           os.path.abspath(__file__), "--worker", "phases", "--model", model, "--out", out, "--dtype", a.dtype,
           "--batch", str(a.batch), "--tokens", str(a.tokens), "--export-share", str(a.export_share),
           "--piece-share", str(a.piece_share)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(a.nproc)]
    full = ranks[0]["full_bytes"]
    print(f"model {model}: vocabulary {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers; "
          f"full state (fp32 parameters) {full / 2**20:.0f} MiB; {a.nproc} ranks, gloo, compute {a.dtype}, "
          f"step batch {a.batch} x {a.tokens} tokens")
    print(f"largest single parameter: {ranks[0]['largest'] / full:.2f} of the full state (export holds one whole "
          f"on rank 0, in the saved dtype; the gradient gather holds one in the compute dtype on every rank)")
    print(f"export: saved weights {ranks[0]['saved_bytes'] / full:.2f} of the full state, written in files of at "
          f"most {ranks[0]['shard_bytes'] / full:.2f} of it (--export-share {a.export_share}); load and export move "
          f"pieces of {ranks[0]['piece_bytes'] / full:.4f} of it (--piece-share {a.piece_share})")
    print("peak resident memory above the phase's start, / full state:")
    print(f"{'phase':<8}" + "".join(f"{'rank ' + str(r):>10}" for r in range(a.nproc)))
    for ph in PHASES:
        print(f"{ph:<8}" + "".join(f"{r[ph] / full:>10.2f}" for r in ranks))


def logprobs(a, cfg, env: dict) -> None:
    """Part 2: each variant in a fresh process; print the peaks and their ratio."""
    vocab = cfg.vocab_size
    res = {}
    for variant in ("old", "new"):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant, "--batch", str(a.batch),
                            "--tokens", str(a.tokens), "--vocab", str(vocab), "--logits-dtype", a.logits_dtype],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"error: log-prob worker {variant} failed:\n{p.stderr[-4000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    lb = res["old"]["logits_bytes"]
    print(f"\nlog-probs + entropy + backward at vocabulary {vocab}: logits ({a.batch}, {a.tokens + 1}, {vocab}) "
          f"{a.logits_dtype} = {lb / 2**20:.0f} MiB; peak resident memory above the start (logits included):")
    for v, name in (("old", "full log_softmax (before)"), ("new", "chunked, in place (utils)")):
        print(f"  {name:<28} {res[v]['peak'] / 2**20:>8.0f} MiB  ({res[v]['peak'] / lb:.2f} x logits)")
    print(f"  ratio before / after: {res['old']['peak'] / res['new']['peak']:.2f}x; same results: sum of "
          f"log-probs {res['old']['logp_sum']:.4f} vs {res['new']['logp_sum']:.4f}, of the head's gradient "
          f"{res['old']['grad_head_sum']:.6f} vs {res['new']['grad_head_sum']:.6f}")


if __name__ == "__main__":
    main()
