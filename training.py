"""training.py: the trainer's model under FSDP2, shared by warmstart.py, star.py and grpo.py.

Sections: the trainer stages' shared flags (`TrainerArgs`, `RESUME_FREE`), optimizer (`adamw`,
`optimizer_step`) and learning-rate schedule; the model (`load_trainer`: fp32 master weights sharded
with `fully_shard` per decoder layer, read from disk once by rank 0 and scattered row by row;
`shard_model`; mixed precision); export (`save_pretrained`: gathered to rank 0 a tensor at a time,
written as safetensors files with an index); resumable checkpoints (`save_checkpoint` /
`load_checkpoint`: torch.distributed.checkpoint shards, RNG states, atomic `latest`);
log-probabilities of completions under the trainer model (`completion_logprobs`,
`sampled_logprobs`: chunked, no fp32 (B, T, V) tensor). The SFT loop of warmstart.py and star.py
(`sft`: the loss on completion tokens only, `sft_batch`, `sft_example`). Under plain `python` the
same calls run unsharded in one process. Command line: `python training.py export --checkpoint DIR
--base MODEL --out DIR` writes a checkpoint as a transformers folder (`export_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import utils

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class TrainerArgs:
    """Flags of the stages that train (warmstart.py, star.py, grpo.py) beside a vLLM engine."""

    max_grad_norm: float = 1.0
    """gradient clipping (0: off)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward"""
    gpu_memory_utilization: float = 0.3
    """share of GPU memory the stage's vLLM engine may take (its weights and KV cache)"""
    sleep_mode: str = "auto"
    """auto | on | off: vLLM sleep mode, the engine's weights and KV cache off the GPU while the trainer
    updates (auto: on with CUDA; vLLM's CPU build has none)"""
    report_to: str = "none"
    """live metrics besides the JSONL files: none | tensorboard | wandb | trackio (optional packages)"""


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    """LambdaLR factor: linear warmup over `warmup` steps, then cosine to 0 at `total`
    (or constant 1 with schedule="constant")."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


RESUME_FREE = ("out", "resume", "save_every", "report_to", "dtype", "gpu_memory_utilization", "sleep_mode",
               "gradient_checkpointing")
"""Flags a trainer stage's --resume may change (output, logging, memory: not what the run computes); a stage
adds its own (grpo.py --steps, star.py --iterations, ...). Any other flag that differs from the
checkpoint's is refused (check_resume_args)."""


def adamw(model, args, total: int, schedule: str = "cosine"):
    """(optimizer, scheduler) of a trainer stage: AdamW at args.lr with args.weight_decay, and a LambdaLR of
    linear warmup over args.warmup_ratio of the `total` optimizer steps, then `schedule` (lr_lambda)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = lr_lambda(int(args.warmup_ratio * total), total, schedule)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def optimizer_step(model, opt, sched, max_grad_norm: float):
    """Clip the gradients to max_grad_norm (0: no clipping), step the optimizer and the schedule, zero the
    gradients. Returns the norm before clipping as a plain tensor (an FSDP2 DTensor made whole), on the
    device: the caller reads it when it reads its other metrics."""
    import torch

    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


def decoder_layers(model):
    """The list of decoder blocks of a Hugging Face causal LM."""
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        with contextlib.suppress(AttributeError):
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def shard_model(model, activation_checkpointing: bool = False, compute_dtype=None):
    """FSDP2: `fully_shard` each decoder layer, then the root. With one process (no
    process group) the model is not sharded. Activation checkpointing wraps each layer first
    (recompute in backward, to trade compute for memory).

    Mixed precision, when `compute_dtype` is set and differs from the parameters' dtype (the
    parameters are the fp32 master weights the optimizer updates): under torchrun FSDP2's
    MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32) (each unsharded
    layer is cast for compute; gradients are reduced and kept in fp32); in one process the
    model's forward runs under torch.autocast(compute_dtype), which casts weights and
    activations per op and leaves parameters and gradients in fp32. (Autocast rather than
    fully_shard on a world of one: a plain `python` run has no process group to shard over.)"""
    import torch

    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    param_dtype = next(model.parameters()).dtype
    mixed = compute_dtype is not None and compute_dtype != param_dtype
    if not utils.is_distributed():
        if mixed:
            device_type = next(model.parameters()).device.type
            model.forward = torch.autocast(device_type, dtype=compute_dtype)(model.forward)
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)} if mixed else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def load_trainer(path: str, dtype: str = "auto", device: str | None = None, gradient_checkpointing: bool = False,
                 reference: bool = False):
    """The model a trainer updates: fp32 master weights (the optimizer's state is fp32
    too), computing in `dtype` ('auto': bf16 on GPU, fp32 on CPU; see shard_model), sharded
    with FSDP2 under torchrun. With reference=True also a frozen copy (eval mode, no
    gradients) built from the same read, for a KL term; else None. Returns (model, reference).
    `model.save_dtype` is the dtype its config file names: save_pretrained writes that.

    The reference, under torchrun: its parameters are sharded and held in the compute dtype
    (no fp32 copy): FSDP2's mixed precision casts the policy's fp32 masters to that dtype for
    each forward, so the two compute the same log-probabilities from the same weights. In one
    process it is an fp32 copy run under the same autocast as the policy: a copy stored in the
    compute dtype would compute differently there (autocast keeps the residual stream fp32).

    The weights are read from disk once: in one process, by this process (the reference is a
    copy); under torchrun, by rank 0 only (`_weights_of`: rows read from the safetensors
    files when needed), while every rank builds the model on the meta device and shards it;
    rank 0 sends each rank its rows of each tensor, cast to the shard's dtype, a piece at a time
    (`_scatter_from_rank0`). No rank ever holds a full copy, not even of one tensor: each
    holds its shards, rank 0 also one piece in flight."""
    import copy

    import torch
    from transformers import AutoConfig

    utils.check_model_path(path)
    device = device or utils.default_device()
    compute = utils.torch_dtype(dtype, device)
    with utils.loading_errors(path):
        cfg = AutoConfig.from_pretrained(path)
    save_dtype = getattr(cfg, "dtype", None) or torch.float32
    save_dtype = utils.torch_dtype(save_dtype, "cpu") if isinstance(save_dtype, str) else save_dtype
    if not utils.is_distributed():
        model = utils.load_model(path, "fp32", device)
        ref = copy.deepcopy(model) if reference else None
        models = [shard_model(model, gradient_checkpointing, compute)]
        if ref is not None:
            models.append(shard_model(ref, False, compute))
    else:  # the reference's parameters in the compute dtype: what the policy's forward computes with
        models = [_sharded_on_meta(path, cfg, device, gradient_checkpointing and k == 0, compute,
                                   param_dtype=compute if k == 1 else None)
                  for k in range(2 if reference else 1)]
        entries = [dict(_state_entries(m)) for m in models]
        weights = _weights_of(path, list(entries[0])) if utils.is_main() else None
        for name in entries[0]:
            full = weights(name) if weights is not None else None  # rank 0: the whole tensor, from disk
            for e in entries:
                _scatter_from_rank0(e[name], full)
            del full
    for m in models:
        m.save_dtype = save_dtype
    model, ref = models[0], (models[1].eval().requires_grad_(False) if reference else None)
    return model, ref


def _sharded_on_meta(path: str, cfg, device: str, activation_checkpointing: bool, compute_dtype,
                     param_dtype=None):
    """The model built with its parameters on the meta device (no memory), sharded with FSDP2,
    then given uninitialized storage for its shards on `device`. Its buffers are real from the
    start: each module's own constructor computes them on the CPU (the rotary frequencies,
    computed from the config and never in a checkpoint, as the model built by from_pretrained
    has them), and they are copied into the storage on `device`. The parameters and persistent
    buffers are left for load_trainer to fill."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=param_dtype or torch.float32)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # small: frequencies, ids
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    shard_model(model, activation_checkpointing, compute_dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside the block, every parameter a module registers is moved to the meta device (no
    memory; a parameter already there, e.g. a tied one, is kept as it is), while buffers stay
    where their module's code puts them."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters[name]
        if p is not None and p.device.type != "meta":
            self._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _state_entries(model):
    """(name, tensor) of the model's state dict, each tensor once (tied weights are one
    object: the first name stands for both)."""
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


class _DiskTensor:
    """One tensor of a safetensors file whose rows are read when indexed (`t[a:b]`); the file
    is mapped for that read only, so no page of it stays resident."""

    def __init__(self, file: str, name: str):
        self.file, self.name = file, name

    def __getitem__(self, index):
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return f.get_slice(self.name)[index]


def _weights_of(path: str, names: list[str]) -> Callable:
    """Rank 0's reader of a checkpoint: name -> the tensor as a _DiskTensor, whose rows are
    read from disk when indexed (`full[a:b]`), so no whole tensor need be resident. A hub name is
    first resolved to its local snapshot (`huggingface_hub.snapshot_download`, the files
    transformers would fetch; not run here, no hub). When the files do not hold every one of
    `names` (the model's state-dict names) under that name (an architecture whose checkpoint
    keys transformers converts while loading, or .bin weights), the model is loaded whole by
    transformers instead and its tensors are handed out (indexed the same way) and dropped
    one by one."""
    from safetensors import safe_open

    folder = os.path.expanduser(path)
    if not os.path.isdir(folder):
        from huggingface_hub import snapshot_download

        with utils.loading_errors(path):
            folder = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = {k: os.path.join(folder, f) for k, f in json.load(open(index))["weight_map"].items()}
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
            files = dict.fromkeys(f.keys(), os.path.join(folder, "model.safetensors"))
    else:
        files = {}
    if files and all(n in files for n in names):
        return lambda name: _DiskTensor(files[name], name)
    utils.print0(f"load: {path}: weights not in safetensors under the model's own names; rank 0 loads the model whole")
    whole = utils.load_model(path, "fp32", "cpu").state_dict()
    return whole.pop


MOVE_CHUNK_BYTES = 16 * 2**20
"""Load and export move a tensor between ranks in pieces of rows of about this many bytes."""


def _dim0_rows(t) -> list[tuple[int, int]]:
    """(first row, rows) of each rank's dim-0 shard of DTensor `t` as FSDP2 lays them out
    (torch.chunk: ceil(n / world) rows per rank, the last ranks fewer or none); checked
    against this rank's own shard."""
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise RuntimeError(f"expected FSDP2's dim-0 shards on one mesh dimension, got {t.placements}")
    n, world = t.shape[0], utils.world_size()
    c = -(-n // world)
    rows = [(k * c, max(0, min(c, n - k * c))) for k in range(world)]
    if t.to_local().shape[0] != rows[utils.rank()][1]:
        raise RuntimeError(f"shard of {t.to_local().shape[0]} rows on rank {utils.rank()}, expected {rows[utils.rank()][1]}")
    return rows


def _pieces(start: int, count: int, t) -> list[tuple[int, int]]:
    """(first row, rows) of rows [start, start + count) of DTensor `t` in pieces of about
    MOVE_CHUNK_BYTES (the same on every rank: from the global shape and dtype)."""
    row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
    step = max(1, MOVE_CHUNK_BYTES // max(1, row_bytes))
    return [(a, min(step, start + count - a)) for a in range(start, start + count, step)]


def _scatter_from_rank0(target, full) -> None:
    """Fill `target` (this rank's entry of a sharded state dict: a DTensor sharded on dim 0 by
    FSDP2, or a replicated plain tensor) from rank 0's `full` (None on the other ranks): a
    tensor, or a _DiskTensor that reads rows from disk when indexed. Rank 0 sends each
    rank its own rows, read and cast to the target's dtype a piece (_pieces) at a time; each
    rank receives into its shard. No rank holds a full copy of the tensor; rank 0 holds its
    shard plus one piece in flight."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        if full is not None:
            target.data.copy_(full[:] if target.dim() else full)
        utils.broadcast_(target.data, src=0)
        return
    local = target.to_local().data  # this rank's rows, a view of its shard
    if not local.is_contiguous():
        raise RuntimeError("expected a contiguous FSDP2 shard")
    for k, (start, count) in enumerate(_dim0_rows(target)):
        if k != utils.rank() and not utils.is_main():
            continue
        for a, m in _pieces(start, count, target):
            mine = local[a - start:a - start + m]  # (m, ...) rows a.. of the full tensor, in rank k's shard
            if utils.is_main():
                piece = full[a:a + m].to(local.device, target.dtype)  # (m, ...)
                if k == 0:
                    mine.copy_(piece)
                else:
                    utils.send(piece, dst=k)
                del piece
            else:
                utils.recv_(mine, src=0)


def _gather_to_rank0(t, dtype=None):
    """The full tensor of a state-dict entry on rank 0, in `dtype` (default: its own), None
    elsewhere: each rank sends its dim-0 rows (as in _scatter_from_rank0) to rank 0 only, a
    piece at a time, which casts each into place: no other rank holds more than its shard;
    rank 0 holds the full tensor in `dtype` plus one piece."""
    import torch
    from torch.distributed.tensor import DTensor

    local = t.to_local().detach() if isinstance(t, DTensor) else t.detach()
    dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
    if not isinstance(t, DTensor):
        return local.to("cpu", dtype, copy=True) if utils.is_main() else None
    full = torch.empty(t.shape, dtype=dtype, device="cpu") if utils.is_main() else None  # (n, ...)
    for k, (start, count) in enumerate(_dim0_rows(t)):
        if k != utils.rank() and not utils.is_main():
            continue
        for a, m in _pieces(start, count, t):
            if not utils.is_main():
                utils.send(local[a - start:a - start + m], dst=0)
            elif k == 0:
                full[a:a + m] = local[a - start:a - start + m].to("cpu", dtype)
            else:
                piece = torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=local.device)  # (m, ...)
                utils.recv_(piece, src=k)
                full[a:a + m] = piece.to("cpu", dtype)
                del piece
    return full


SYNC_BUCKET_BYTES = 256 * 2**20
"""iter_full_params gathers FSDP2 shards in buckets of about this many bytes (in the dtype it
yields): one all-gather per bucket; a larger tensor is a bucket of its own."""


def iter_full_params(model, dtype=None, bucket_bytes: int | None = None):
    """(name, full tensor) for each entry of the model's state dict, in its order; floating
    tensors in `dtype` when given (e.g. fp32 master weights into a bf16 engine). Tied weights are
    gathered once and yielded under each of their names, one after the other, at the first
    name's place.

    Under FSDP2 every rank must iterate to the end, in the same order: each rank casts its
    shards to `dtype` first (a bf16 engine moves half the bytes of fp32), and the shards are
    gathered in buckets of about `bucket_bytes` (default SYNC_BUCKET_BYTES), one all-gather per
    bucket (`_gather_bucket`). Memory: one bucket's full tensors at a time (twice that while it
    is unpacked), plus whatever the consumer keeps of what was yielded."""
    from torch.distributed.tensor import DTensor

    bucket_bytes = bucket_bytes or SYNC_BUCKET_BYTES
    entries = {}  # id -> (tensor, its names): tied weights are one object under several names
    for name, t in model.state_dict(keep_vars=True).items():
        entries.setdefault(id(t), (t, []))[1].append(name)
    bucket, size, bucket_dtype = [], 0, None
    for t, names in entries.values():
        out = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if not isinstance(t, DTensor):
            yield from _gather_bucket(bucket, bucket_dtype)
            bucket, size = [], 0
            full = t.detach().to(out)
            for name in names:
                yield name, full
            continue
        nbytes = t.numel() * out.itemsize
        if bucket and (size + nbytes > bucket_bytes or out != bucket_dtype):
            yield from _gather_bucket(bucket, bucket_dtype)
            bucket, size = [], 0
        bucket.append((t, names))
        size, bucket_dtype = size + nbytes, out
    yield from _gather_bucket(bucket, bucket_dtype)


def _gather_bucket(bucket: list, dtype):
    """(name, full tensor in `dtype`) for each (DTensor, names) of a bucket of FSDP2 dim-0
    shards, gathered with one all-gather: each rank packs its rows of every tensor, cast to
    `dtype`, into one flat buffer padded to ceil(rows / world) rows per tensor (_dim0_rows'
    layout, the same size on every rank), and the full tensors are cut from the gathered
    buffers. Every rank must call it with the same bucket."""
    import torch

    if not bucket:
        return
    world = utils.world_size()
    layout, length = [], 0  # (tensor, names, rows of each rank, elements per row, offset in a rank's buffer)
    for t, names in bucket:
        rows, per_row = _dim0_rows(t), math.prod(t.shape[1:])
        layout.append((t, names, rows, per_row, length))
        length += -(-t.shape[0] // world) * per_row
    device = bucket[0][0].to_local().device
    local = torch.zeros(length, dtype=dtype, device=device)  # (L,): this rank's rows, padded
    for t, _, rows, per_row, off in layout:
        mine = t.to_local().detach()  # (rows of this rank, ...)
        local[off:off + mine.numel()] = mine.reshape(-1)
    gathered = torch.empty(world * length, dtype=dtype, device=device)  # (world * L,): rank k's buffer at k * L
    utils.all_gather_into(gathered, local, group=bucket[0][0].device_mesh.get_group())
    del local
    if len(layout) == 1 and all(count == layout[0][2][0][1] for _, count in layout[0][2]):
        fulls = [gathered.view(layout[0][0].shape)]  # one tensor in equal shards: the buffer is the tensor
    else:
        fulls = []
        for t, _, rows, per_row, off in layout:
            full = torch.empty(t.shape, dtype=dtype, device=device)  # (n, ...)
            flat = full.view(-1)
            for k, (start, count) in enumerate(rows):
                src = k * length + off  # rank k's rows of this tensor in the gathered buffer
                flat[start * per_row:(start + count) * per_row] = gathered[src:src + count * per_row]
            fulls.append(full)
    del gathered
    for (_, names, *_), full in zip(layout, fulls):
        for name in names:
            yield name, full


def full_state_dict(model, cpu: bool = True) -> dict:
    """The full (unsharded) model state dict, on every rank. With cpu=True, a copy: later
    training steps do not change it (with or without FSDP)."""
    return {k: (v.to("cpu", copy=True) if cpu else v) for k, v in iter_full_params(model)}


EXPORT_SHARD_BYTES = 5 * 2**30
"""save_pretrained writes the weights in safetensors files of at most this many bytes each
(one larger tensor gets a file of its own): rank 0 holds one file's worth at a time."""


def save_pretrained(model, tokenizer, path: str, shard_bytes: int | None = None) -> None:
    """Save a Hugging Face checkpoint atomically (config, generation config, tokenizer,
    safetensors weights; loadable by transformers and vLLM), weights in the dtype the model's
    config file named when it was loaded (`model.save_dtype`, set by load_trainer; else the
    parameters' dtype). Every rank must call it.

    Memory: the weights are gathered to rank 0 one tensor at a time (`_gather_to_rank0`: the
    other ranks never hold more than their own shards), cast to the saved dtype, and written in
    files of at most `shard_bytes` (default EXPORT_SHARD_BYTES) as each fills, with the
    `model.safetensors.index.json` transformers writes for sharded checkpoints: rank 0 holds
    one file's worth, never the whole model. Tied weights are written once, under their first
    name (transformers ties them again from the config when it loads)."""
    import copy

    from safetensors.torch import save_file

    shard_bytes = shard_bytes or EXPORT_SHARD_BYTES
    save_dtype = getattr(model, "save_dtype", None) or next(model.parameters()).dtype
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(utils.atomic_dir(path)) if utils.is_main() else None
        files, shard, size, total = [], {}, 0, 0

        def flush():
            files.append((f"part-{len(files)}.safetensors", list(shard)))
            save_file(shard, os.path.join(tmp, files[-1][0]), metadata={"format": "pt"})
            shard.clear()

        for name, t in _state_entries(model):
            full = _gather_to_rank0(t, save_dtype)  # on rank 0, in the saved dtype; None elsewhere
            if full is None:
                continue
            if shard and size + full.nbytes > shard_bytes:
                flush()
                size = 0
            shard[name], size, total = full, size + full.nbytes, total + full.nbytes
            del full
        if utils.is_main():
            if shard:
                flush()
            names = ["model.safetensors"] if len(files) == 1 else \
                [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
            for (old, _), new in zip(files, names):
                os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
            if len(files) > 1:
                weight_map = {k: new for (_, keys), new in zip(files, names) for k in keys}
                utils.write_json(os.path.join(tmp, "model.safetensors.index.json"),
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
            cfg = copy.deepcopy(model.config)  # the parameters are fp32 masters: name the saved dtype
            cfg.dtype = save_dtype
            cfg.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    utils.barrier()


def save_model(model, tokenizer, model_dir: str, card: dict) -> None:
    """The trained model as a transformers folder (save_pretrained) with its mrt.json `card`, written by
    rank 0; every rank returns once both are written."""
    save_pretrained(model, tokenizer, model_dir)
    if utils.is_main():
        utils.write_json(os.path.join(model_dir, "mrt.json"), card)
    utils.barrier()


def gradient_sync(model, on: bool) -> None:
    """Whether the next backward passes of an FSDP2 model reduce-scatter its gradients over the
    ranks (on) or add them up unreduced on each rank (off). In an accumulation, off for every
    micro-batch but the last: the last backward reduces the sum once, instead of every
    micro-batch's share (the same gradient, up to the order of the additions). The cost: between
    syncs each rank holds the model's full gradient in FSDP2's reduce dtype (fp32 with mixed
    precision). A model that is not FSDP2-sharded (one process) is left as it is."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(on)


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if utils.has_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and utils.has_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def _latest_checkpoint(path: str) -> str | None:
    """The folder of the last complete save under a checkpoint folder (named by its
    `latest` file), or None when there is none."""
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        return None
    name = open(latest).read().strip()
    return os.path.join(path, name) if name and os.path.isdir(os.path.join(path, name)) else None


def has_checkpoint(path: str) -> bool:
    """True when `path` holds a complete checkpoint written by save_checkpoint."""
    return _latest_checkpoint(path) is not None


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, **extra) -> None:
    """A sharded checkpoint into the folder `path`: model and optimizer states with
    torch.distributed.checkpoint (DCP; each rank writes its own shards, nothing is gathered),
    every rank's RNG states (rng-<rank>.pt), and the scheduler state, world size and `extra`
    (step, data position, ...) from rank 0 (state.pt). Every rank must call it.

    Atomic: a save fills <path>/.tmp-<n>, is renamed to <path>/save-<n> once every rank has
    written, and only then does <path>/latest name it; the previous save is deleted after
    that. A process killed at any point leaves the last complete save in use."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])  # sharded (DTensors under FSDP2)
    n = [0]
    if utils.is_main():
        os.makedirs(path, exist_ok=True)
        done = [int(f[5:]) for f in os.listdir(path) if re.fullmatch(r"save-\d+", f)]
        n = [max(done, default=0) + 1]
        tmp = os.path.join(path, f".tmp-{n[0]}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if utils.is_distributed():
        dist.broadcast_object_list(n, src=0)
    tmp, final = os.path.join(path, f".tmp-{n[0]}"), os.path.join(path, f"save-{n[0]}")
    state = {"model": msd} if optimizer is None else {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(rng_state(), os.path.join(tmp, f"rng-{utils.rank()}.pt"))
    if utils.is_main():
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "world_size": utils.world_size(),
                    "extra": extra}, os.path.join(tmp, "state.pt"))
    utils.barrier()
    if utils.is_main():
        os.replace(tmp, final)
        with utils.atomic_path(os.path.join(path, "latest")) as t, open(t, "w") as f:
            f.write(os.path.basename(final) + "\n")
        for f in os.listdir(path):  # older saves and leftovers of killed ones
            if f not in ("latest", os.path.basename(final)) and (f.startswith("save-") or f.startswith(".tmp-")):
                shutil.rmtree(os.path.join(path, f), ignore_errors=True)
    utils.barrier()


def checkpoint_extra(path: str) -> dict:
    """The `extra` fields and world size of the last complete checkpoint under `path`."""
    import torch

    d = _latest_checkpoint(path)
    if d is None:
        raise utils.UserError(f"{path}: no complete checkpoint")
    meta = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    return {**meta["extra"], "world_size": meta["world_size"]}


def check_resume_args(path: str, args, free: Sequence[str] = ()) -> dict:
    """Refuse, in one line naming the differing flags, to resume the checkpoint under `path`
    with arguments that change the run's meaning (utils.resume_mismatch on its stored "args"; a
    checkpoint written without them is not checked). Returns the checkpoint's extra fields."""
    import dataclasses

    extra = checkpoint_extra(path)
    diff = utils.resume_mismatch(extra.get("args") or {}, dataclasses.asdict(args), free)
    if diff:
        raise utils.UserError(f"--resume: {path} was written with other arguments: {', '.join(diff)}; "
                              f"give the checkpoint's values or a new --out", every_rank=True)
    return extra


def load_checkpoint(path: str, model, optimizer=None, scheduler=None) -> dict:
    """Restore what save_checkpoint wrote (into a plain or FSDP2 model of the same shape;
    each rank reads the shards it needs) and return the extra fields with the world size.
    RNG states are restored per rank when the world size matches."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    d = _latest_checkpoint(path)
    if d is None:
        raise utils.UserError(f"{path}: no complete checkpoint")
    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])  # the shapes to fill
    state = {"model": msd} if optimizer is None else {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=d, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    meta = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if meta["world_size"] == utils.world_size():
        set_rng_state(torch.load(os.path.join(d, f"rng-{utils.rank()}.pt"), weights_only=False))
    return {**meta["extra"], "world_size": meta["world_size"]}


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False, dtype=None):
    """(B, T) tensor of the padded sequences (long ids, or `dtype`, e.g. float per-token
    values) and the (B, T) long mask of real entries."""
    import torch

    dtype = dtype or torch.long
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=dtype)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=dtype)
        mask[i, sl] = 1
    return ids, mask


@functools.lru_cache(maxsize=None)
def _sampled_logprob_fn():
    """The autograd function behind `sampled_logprobs` (built on first use: this module
    imports torch late)."""
    import torch

    class SampledLogprob(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets, temperature, chunk, inplace):
            B, T = targets.shape
            lse = torch.empty(B, T, dtype=torch.float32, device=logits.device)  # (B, T)
            out = torch.empty(B, T, dtype=torch.float32, device=logits.device)  # (B, T)
            for b in range(B):
                for s in range(0, T, chunk):
                    e = min(T, s + chunk)
                    z = logits[b, s:e].float() / temperature  # (c, V), fp32 chunk
                    lse[b, s:e] = torch.logsumexp(z, -1)  # (c,)
                    out[b, s:e] = z.gather(-1, targets[b, s:e, None]).squeeze(-1) - lse[b, s:e]
            ctx.save_for_backward(logits, targets, lse)
            ctx.temperature, ctx.chunk, ctx.inplace = temperature, chunk, inplace
            return out

        @staticmethod
        def backward(ctx, grad_out):  # d logp / d z = onehot(target) - softmax(z); z = logits / temperature
            logits, targets, lse = ctx.saved_tensors
            B, T = targets.shape
            # In place: each chunk of the logits is read, then overwritten by its gradient. An
            # autograd node that saved these logits too would fail its version check, loudly.
            grad = logits if ctx.inplace else torch.empty_like(logits)  # (B, T_logits, V)
            grad[:, T:] = 0
            for b in range(B):
                for s in range(0, T, ctx.chunk):
                    e = min(T, s + ctx.chunk)
                    z = logits[b, s:e].float() / ctx.temperature  # (c, V)
                    g = -(z - lse[b, s:e, None]).exp_()  # (c, V): -softmax
                    g.scatter_add_(-1, targets[b, s:e, None], torch.ones_like(g[:, :1]))
                    g *= grad_out[b, s:e, None] / ctx.temperature
                    grad[b, s:e] = g
            return grad, None, None, None, None

    return SampledLogprob


def sampled_logprobs(logits, targets, temperature: float = 1.0, chunk: int | None = None, inplace: bool = False):
    """log p(targets[b, t]) under softmax(logits[b, t] / temperature), in fp32: (B, T) for
    logits (B, T_logits, V) with T_logits >= T (positions past T are ignored). Computed as
    z[target] - logsumexp(z) over chunks of `chunk` positions (default `_chunk_positions`: on
    CPU about 2^20 logits, 8 positions at a vocabulary of 128,256; on CUDA sized by the device's
    free memory), so neither the forward nor the backward pass holds an fp32 (B, T, V)
    log-softmax: the backward recomputes softmax per chunk from the saved logits and writes
    the gradient in the logits' dtype. With
    inplace=True the backward writes that gradient into the logits tensor itself (no second
    (B, T, V) tensor): only for logits nobody reads after the backward pass."""
    chunk = chunk or _chunk_positions(logits.shape[-1], free_device_bytes(logits.device))
    return _sampled_logprob_fn().apply(logits, targets, float(temperature), int(chunk), bool(inplace))


CHUNK_TEMPORARIES = 4
"""fp32 (positions, vocabulary) temporaries a chunk of the log-prob loops holds at once, at most
(token_entropy: z, log p, p, p log p)."""
CHUNK_FREE_SHARE = 8
"""On CUDA a chunk's temporaries take at most 1/CHUNK_FREE_SHARE of the device's free memory."""
CHUNK_MAX_LOGITS = 1 << 26
"""The most logits per chunk (256 MiB in fp32): past this, bigger chunks only take memory."""


def _chunk_positions(vocab: int, free_bytes: int | None = None) -> int:
    """Positions per chunk of the log-prob loops. Without `free_bytes` (CPU): about 2^20 logits
    (4 MiB in fp32): small chunks matter on CPU, where the allocator keeps freed chunk buffers, so
    the peak grows with them. With the device's free bytes (CUDA): as many positions as keep the
    chunk's CHUNK_TEMPORARIES fp32 rows within 1/CHUNK_FREE_SHARE of them, at most
    CHUNK_MAX_LOGITS logits and never fewer positions than on CPU: a few large kernels per
    sequence instead of one small launch per handful of positions at a 128k vocabulary."""
    floor = max(1, (1 << 20) // vocab)
    if free_bytes is None:
        return floor
    fits = free_bytes // (CHUNK_FREE_SHARE * CHUNK_TEMPORARIES * 4 * vocab)
    return int(max(floor, min(fits, CHUNK_MAX_LOGITS // vocab)))


def free_device_bytes(device) -> int | None:
    """Bytes a CUDA device can still allocate: free in the driver plus what torch's caching
    allocator holds unused. None for any other device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def token_entropy(logits, T: int, temperature: float = 1.0, chunk: int | None = None):
    """(B, T) entropy of softmax(logits[:, t] / temperature) for t < T, in fp32 chunks of
    `chunk` positions (default as in sampled_logprobs), without gradient."""
    import torch

    chunk = chunk or _chunk_positions(logits.shape[-1], free_device_bytes(logits.device))
    B = logits.shape[0]
    ent = torch.empty(B, T, dtype=torch.float32, device=logits.device)  # (B, T)
    with torch.no_grad():
        for b in range(B):
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                z = logits[b, s:e].float() / temperature  # (c, V)
                logp = z - torch.logsumexp(z, -1, keepdim=True)  # (c, V)
                ent[b, s:e] = -(logp.exp() * logp).sum(-1)  # (c,)
    return ent


def completion_logprobs(model, ctx_ids, comp_ids, pad_id: int, temperature: float = 1.0, with_entropy: bool = False):
    """The log-probabilities that training uses: (B, Tc) log p of each completion token given
    its context, logits divided by the sampling temperature, the (B, Tc) completion mask
    built from the token counts and, if asked, the (B, Tc) entropy (no gradient; else None).
    Contexts are left-padded and completions right-padded, so logits are computed for the
    completion positions only; position ids count real tokens, as in the sampler. Memory:
    the model's logits (B, Tc + 1, V), which the backward pass overwrites with their
    gradient, plus chunk-sized temporaries (`sampled_logprobs`)."""
    import torch

    ctx, ctx_mask = pad_sequences(ctx_ids, pad_id, left=True)  # (B, Tp)
    comp, comp_mask = pad_sequences(comp_ids, pad_id)  # (B, Tc)
    device = next(model.parameters()).device
    ids = torch.cat([ctx, comp], 1).to(device)  # (B, Tp + Tc)
    attn = torch.cat([ctx_mask, comp_mask], 1).to(device)  # (B, Tp + Tc)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, Tp + Tc)
    Tc = comp.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=Tc + 1).logits  # (B, Tc + 1, V)
    comp = comp.to(device)
    logp = sampled_logprobs(logits, comp, temperature, inplace=True)  # (B, Tc): position t predicts token t
    entropy = token_entropy(logits.detach(), Tc, temperature) if with_entropy else None  # (B, Tc)
    return logp, comp_mask.to(device).float(), entropy


# ---- Export of a sharded checkpoint: `python training.py export` ------------------------


@dataclasses.dataclass
class ExportArgs:
    checkpoint: str = ""
    """checkpoint folder a run wrote (save_checkpoint: <out>/checkpoint of grpo.py, warmstart.py, star.py's SFT)"""
    base: str = ""
    """the model the run started from (its config, tokenizer and saved dtype; its weights are replaced)"""
    out: str = ""
    """transformers folder to write (config, tokenizer, safetensors, mrt.json)"""
    dtype: str = "auto"
    """compute dtype of the model while loading (the weights are written in the base config's dtype)"""


def export_checkpoint(checkpoint: str, base: str, out: str, dtype: str = "auto") -> dict:
    """Convert a sharded checkpoint (save_checkpoint's format) into a transformers folder at
    `out`, as the run's own end-of-run export writes it: the trainer model is built on `base`
    (load_trainer), the checkpoint's model state loaded into it (load_checkpoint, no optimizer)
    and written by save_pretrained, so no rank holds more than that export already needs. The
    model card (mrt.json) is the one the run stored in the checkpoint ("card"), else the base's,
    with the checkpoint's step and arguments added. Under torchrun every rank calls it (any
    world size: DCP reshards). Returns the card."""
    for flag, value in (("--checkpoint", checkpoint), ("--base", base), ("--out", out)):
        if not value:
            raise utils.UserError(f"export needs {flag}", every_rank=True)
    if not has_checkpoint(checkpoint):
        raise utils.UserError(f"{checkpoint}: no complete checkpoint", every_rank=True)
    _, _, device = utils.init_distributed()
    extra = checkpoint_extra(checkpoint)
    model, _ = load_trainer(base, dtype, device)
    load_checkpoint(checkpoint, model)
    tokenizer = utils.load_tokenizer(base)
    save_pretrained(model, tokenizer, out)
    base_card = os.path.join(base, "mrt.json")
    card = dict(extra.get("card") or (json.load(open(base_card)) if os.path.isfile(base_card) else {}))
    card.update(checkpoint=os.path.abspath(checkpoint), step=extra.get("step"),
                **({"args": extra["args"]} if "args" in extra else {}))
    if utils.is_main():
        utils.write_json(os.path.join(out, "mrt.json"), card)
    utils.barrier()
    return card


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "export":
        raise utils.UserError("usage: python training.py export --checkpoint DIR --base MODEL --out DIR")
    args = utils.parse_args(ExportArgs, argv[1:])
    card = export_checkpoint(args.checkpoint, args.base, args.out, args.dtype)
    utils.print0(f"wrote {args.out} (step {card.get('step')} of {args.checkpoint})")
    return card


if __name__ == "__main__":
    utils.run_main(main)


# ---- SFT: loss on completion tokens only (warmstart.py, star.py) ---------------------


def check_sft_args(args, world: int) -> None:
    """The SFT fields shared with star.py: batch_size must split into micro-batches on every rank."""
    if args.lr <= 0 or args.epochs < 1 or args.max_length < 2 or not 0 <= args.warmup_ratio < 1:
        raise utils.UserError("--lr > 0, --epochs >= 1, --max-length >= 2 and 0 <= --warmup-ratio < 1 are needed")
    if args.micro_batch_size < 1 or args.batch_size % (world * args.micro_batch_size):
        raise utils.UserError(f"--batch-size {args.batch_size} must be a multiple of world size {world} x "
                              f"--micro-batch-size {args.micro_batch_size}")


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int] | None:
    """(ids, prompt length): prompt ids as the engine sees them, then the completion and EOS,
    cut to max_length. None when the prompt alone does not leave room for a completion token."""
    p = utils.encode(tokenizer, prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) >= max_length:
        return None
    return (p + c)[:max_length], len(p)


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int):
    """(B, T) ids, (B, T) attention mask and (B, T-1) loss mask over next-token targets: target
    t+1 carries loss iff it is a completion token, i.e. prompt_len <= t+1 < len. Built from the
    lengths, never from pad ids (pad may equal EOS, and EOS is a completion token)."""
    import torch

    ids, attn = pad_sequences([s for s, _ in examples], pad_id)  # (B, T)
    pos = torch.arange(1, ids.shape[1])[None, :]  # (1, T-1) index of each target
    plen = torch.tensor([p for _, p in examples])[:, None]  # (B, 1)
    slen = torch.tensor([len(s) for s, _ in examples])[:, None]  # (B, 1)
    loss_mask = ((pos >= plen) & (pos < slen)).float()  # (B, T-1)
    return ids, attn, loss_mask


def completion_nll_sum(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                       inplace: bool = False) -> torch.Tensor:
    """Sum of -log p(target) over masked positions: logits (B, T_logits, V) with T_logits >=
    T - 1 (the position t predicts targets[:, t]; later positions are ignored), targets and
    loss_mask (B, T-1). Computed by sampled_logprobs in chunks (no fp32 (B, T, V)
    log-softmax at a 128k vocabulary); inplace=True lets the backward pass write the gradient
    into the logits (for model outputs nobody reads afterwards)."""
    return -(sampled_logprobs(logits, targets, inplace=inplace) * loss_mask).sum()


def sft(model_path: str, examples: list[tuple[str, str]], args, *, model_dir: str, log_path: str, ckpt_path: str,
        card: dict, resume: bool = False, log_extra: dict | None = None, report_to: str = "none"):
    """Fine-tune `model_path` on (prompt, completion) pairs; save it (HF checkpoint + mrt.json
    `card`) to model_dir and return the trained (FSDP2-sharded under torchrun) model.

    `args` carries lr, epochs, batch_size (global), micro_batch_size, max_length, warmup_ratio,
    weight_decay, max_grad_norm, save_every, dtype, gradient_checkpointing, seed. The loss of
    an optimizer step is the token mean over the completion tokens of its whole batch (every
    rank, every micro-batch). Logs {step, epoch, loss, tokens, lr, grad_norm} per step (also
    to the `report_to` dashboard)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    rank, world, device = utils.rank(), utils.world_size(), utils.default_device()
    tok = utils.load_tokenizer(model_path)
    data = [e for e in (tokenize_example(tok, p, c, args.max_length) for p, c in examples) if e is not None]
    if len(data) < len(examples):
        utils.print0(f"sft: dropped {len(examples) - len(data)} examples whose prompt fills --max-length")
    if not data:
        raise utils.UserError("sft: no training example (every prompt is longer than --max-length, or none was built)")
    utils.seed_everything(args.seed)
    model, _ = load_trainer(model_path, args.dtype, device, args.gradient_checkpointing)
    model.train()
    B, M = args.batch_size, args.micro_batch_size
    per_rank, steps_per_epoch = B // world, math.ceil(len(data) / B)
    total = steps_per_epoch * args.epochs
    opt, sched = adamw(model, args, total)
    start, tokens_seen = 0, 0
    if resume and has_checkpoint(ckpt_path):
        extra = load_checkpoint(ckpt_path, model, opt, sched)
        start, tokens_seen = extra["step"], extra["tokens"]
        utils.print0(f"sft: resumed {ckpt_path} at step {start}/{total}")
    logger = utils.JsonlLogger(log_path, resume_step=start if resume else None, report_to=report_to,
                               config=dataclasses.asdict(args) if report_to != "none" else None)

    def batch_indices(step: int) -> list[int]:  # this rank's share of the global batch of `step`
        epoch, j = divmod(step, steps_per_epoch)
        perm = np.random.RandomState(utils.derive_seed(args.seed, "sft order", epoch)).permutation(len(data))
        perm = np.resize(perm, steps_per_epoch * B)  # wrap around to whole batches
        return perm[j * B:(j + 1) * B][rank::world].tolist()

    bar = tqdm(range(start, total), desc="sft", disable=not utils.is_main(), initial=start, total=total)
    for step in bar:
        mine = [data[i] for i in batch_indices(step)]  # per_rank examples
        n_items = utils.all_reduce(torch.tensor(float(sum(len(s) - p for s, p in mine)), device=device))  # global batch
        nll_local = 0.0
        for k in range(0, per_rank, M):
            ids, attn, loss_mask = sft_batch(mine[k:k + M], tok.pad_token_id)
            ids, attn, loss_mask = ids.to(device), attn.to(device), loss_mask.to(device)
            logits = model(input_ids=ids, attention_mask=attn).logits  # (M, T, V)
            nll = completion_nll_sum(logits, ids[:, 1:], loss_mask, inplace=True)
            gradient_sync(model, k + M >= per_rank)  # FSDP2 reduces the gradients once, after the last
            # token mean over the global batch; FSDP averages gradients over ranks, hence * world
            (nll / n_items * world).backward()
            nll_local = nll_local + nll.detach().double()  # as the float sum was; read once per step, below
        nll_local = float(nll_local)
        gn = optimizer_step(model, opt, sched, args.max_grad_norm)
        tokens_seen += int(n_items.item())
        rec = {"step": step + 1, "epoch": step // steps_per_epoch, "loss": sum(utils.all_gather(nll_local)) / n_items.item(),
               "tokens": tokens_seen, "lr": sched.get_last_lr()[0], "grad_norm": float(gn), **(log_extra or {})}
        logger.log(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if (args.save_every and (step + 1) % args.save_every == 0) or step + 1 == total:
            save_checkpoint(ckpt_path, model, opt, sched, step=step + 1, tokens=tokens_seen,
                                     args=dataclasses.asdict(args), card=card)
    model.eval()
    save_model(model, tok, model_dir, card)
    return model


def sft_example(trace: dict, z0_loss: bool) -> tuple[str, str]:
    """(prompt, completion) of a trace; without z0_loss the attempt z0 moves into the prompt."""
    if z0_loss or "z0" not in trace:
        return trace["prompt"], trace["completion"]
    return trace["prompt"] + trace["z0"], trace["completion"][len(trace["z0"]):]


# ---- Helpers of grpo.py: loss metrics read to the host at once, the metrics line of a step ----


def read_metrics(metrics: list[dict]) -> list[dict]:
    """The same dicts with every value a float: their 0-d tensors (on one device) read to the
    host with one transfer, so a step waits for the device once, not once per value."""
    import torch

    flat = [v for m in metrics for v in m.values()]
    device = next((v.device for v in flat if torch.is_tensor(v)), "cpu")
    values = iter(torch.stack([torch.as_tensor(v, device=device).float().reshape(()) for v in flat]).tolist()
                  if flat else [])
    return [{k: next(values) for k in m} for m in metrics]


def step_record(step: int, rewards: dict, rows: list[dict], stats: list[dict], grad_norm: float, lr: float,
                times: dict, args, mu_tokens: int | None = None) -> dict:
    """One metrics line of grpo.py. `rewards`: outcome, gain, reward, tokens, each (B * world,) over
    all ranks; `stats`: this rank's per-micro-batch loss metrics (first pass first), token-weighted
    here, then averaged over ranks; `times`: this rank's seconds, the slowest rank's reported.
    Backtrack format (rows carry "episodes"): unparsed_share, the share of continuations with no
    episodes. With a meta-prover, `mu_tokens` (the tokens it decoded on this rank this step) gives
    mu_tokens_per_problem, summed over ranks per problem of the step. `args`: grpo.Args."""
    import numpy as np

    n_micro = len(rows) // args.micro_batch_size
    first = stats[:n_micro]  # entropy and the engine/trainer gap are taken on the first pass

    def wmean(key, ss):
        return sum(s[key] * s["tokens"] for s in ss) / max(1.0, sum(s["tokens"] for s in ss))

    keys = ("clip_low", "clip_high", "clip_region", "ratio", "kl", "is_weight")
    local = {"entropy": wmean("entropy", first), "logprob_gap": wmean("logprob_gap", first),
             **{k: wmean(k, stats) for k in keys}, "truncated": sum(r["truncated"] for r in rows),
             "unparsed": sum("episodes" in r and r["episodes"] is None for r in rows),
             "ratio_max": max(s["ratio_max"] for s in stats), "mu_tokens": mu_tokens or 0, **times}
    ranks = utils.all_gather(local)
    mean = {k: float(np.mean([r[k] for r in ranks])) for k in ("entropy", "logprob_gap", *keys)}
    slowest = {k: max(r[k] for r in ranks) for k in times}
    out, gain, reward, ntok = rewards["outcome"], rewards["gain"], rewards["reward"], rewards["tokens"]
    return {"step": step, "reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
            "accuracy": out.mean().item(), "info_gain_mean": gain.mean().item(),
            "zero_std_groups": (reward.view(-1, args.group_size).std(1) == 0).float().mean().item(),
            "completion_len_mean": ntok.mean().item(), "completion_len_max": ntok.max().item(),
            "truncated_share": sum(r["truncated"] for r in ranks) / len(ntok),
            **({"unparsed_share": sum(r["unparsed"] for r in ranks) / len(ntok)} if "episodes" in rows[0] else {}),
            "entropy": mean["entropy"], "logprob_gap": mean["logprob_gap"], "clip_low": mean["clip_low"],
            "clip_high": mean["clip_high"], "clip_region": mean["clip_region"], "kl": mean["kl"],
            "is_weight": mean["is_weight"], "ratio_mean": mean["ratio"],
            "ratio_max": max(r["ratio_max"] for r in ranks), "grad_norm": grad_norm, "lr": lr,
            "loss": float(np.mean([s["loss"] for s in stats])),
            "tokens_per_s": ntok.sum().item() / max(1e-9, slowest["time_sample"]),
            **({"mu_tokens_per_problem": sum(r["mu_tokens"] for r in ranks) * args.group_size / len(ntok)}
               if mu_tokens is not None else {}), **slowest}
