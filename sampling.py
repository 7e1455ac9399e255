"""sampling.py: one sampling interface for every stage, and in-place weight sync.

`Sampler` wraps vLLM when it is installed (CPU or GPU; one engine in this process per
torchrun rank) and `transformers.generate` otherwise, behind one `generate` call that returns
`Sample`s (text, token ids, sampled log-probabilities). `Sampler.sync_weights` pushes a trainer's
weights (plain or FSDP2-sharded, see training.py) into the engine in place; `update_asleep`
frees the engine's GPU memory during an update (vLLM sleep mode, CUDA only); `engine_length`
sizes an engine from what a run needs, never from the model's whole context; on CPU its KV
cache is sized from the same lengths (`model_kv_cache_bytes`, unless VLLM_CPU_KVCACHE_SPACE is set).

Below the sampler, what every stage shares and no stage owns: engines built or reused (`engine`,
`READY`, `make_sampler`, `close_engine`) and sized (`trace_need`, `mu_need`); the rules for the
attempt z0 and a sample's outcome (`sample_z0`, `sample_outcome`); the meta-prover mu that
estimates J(mu | c) (`MetaProver`, its flags `MuArgs`, paper Sec. 5); parallel and linearized sampling
(`run_parallel`, `run_linearized`, paper Sec. 7). This module imports no stage.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

import training
import utils

# vLLM runs its engine in this process: weight sync passes tensors, not pickles, and one
# engine per torchrun rank shares the rank's process group.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CPU_KV_CAP = 2 << 30
"""The most KV cache (bytes) a CPU engine takes when VLLM_CPU_KVCACHE_SPACE (GiB) is unset; below
it, what the run's lengths need (`cpu_kv_cache_bytes`)."""
CPU_BLOCK = 128
"""vLLM's KV block size on CPU unless an engine is given another (`block_size`), in tokens."""
CPU_ENGINE_BLOCK = 32
"""The KV block size of this project's CPU engines unless given another (`block_size`), in
tokens: vLLM shares a prefix (prefix caching, and the n samples of one request) in whole blocks
only, and at its CPU default (CPU_BLOCK) a context of a hundred tokens shares nothing, so mu's
m answers to one context would each prefill it. 32 is the smallest vLLM's CPU attention takes."""
CPU_MAX_SEQS = 256
"""vLLM's most sequences in flight for an offline engine on CPU unless given `max_num_seqs`."""


def prompt_seed(seed: int | Sequence[int], i: int, n: int) -> int:
    """The sampling seed of the i-th prompt of a generate call: seed[i] when a list is given,
    else one derived from the call's seed and the prompt's position."""
    return int(seed[i]) if isinstance(seed, Sequence) else seed * 1_000_003 + i * n


@dataclass
class Sample:
    """One sampled completion. `token_ids` are the generated ids (EOS included when the
    model stopped on it), `num_tokens` their count, `logprobs` the sampled tokens'
    log-probabilities under the sampling distribution (temperature applied)."""

    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: list[float] | None
    prompt_tokens: int


class Sampler:
    """One sampling interface for every stage: vLLM when installed (CPU or GPU), else
    `transformers.generate`. Prefix caching is on, so n samples of one prompt and prompts
    that share a long context pay its prefill once.

    Under torchrun each rank builds its own engine on its own prompts (vLLM's
    "external_launcher" backend: the engine lives in this process and uses its device).
    Engines of different ranks get different seeds (seed + rank), so unseeded requests do
    not repeat each other's samples; a `generate(..., seed=s)` call is reproducible as is.
    Keep one vLLM engine alive per process: vLLM 0.32 tears down its process-wide parallel
    state whenever an engine shuts down, which breaks any other engine still in use.
    `max_model_len` is the most tokens one sequence may hold: the engine's (vLLM), or the
    model's positions (transformers)."""

    def __init__(self, model: str, *, backend: str = "auto", dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3,
                 sleep_mode: str | bool = "auto", enable_prefix_caching: bool = True, **engine_kwargs):
        """max_model_len: tokens one sequence may hold (prompt + generation); callers pass
        what their run needs (`engine_length`), never the model's whole context.
        gpu_memory_utilization: the share of GPU memory vLLM may take (weights + KV cache).
        sleep_mode: "auto" (on with vLLM on CUDA, off elsewhere: vLLM 0.32's CPU build has
        none), "on"/"off" or a bool; with it, `sleep()` frees the engine's GPU memory while
        the trainer updates (see `update_asleep`). An engine that cannot start (e.g. its KV
        cache cannot hold one sequence) is a one-line UserError."""
        self.model_path, self.dtype = model, dtype
        utils.check_model_path(model)
        self.sleep_mode, self.asleep, self.asleep_parts, self.weights_dropped = False, False, set(), False
        self.tokenizer = utils.load_tokenizer(model)
        if backend == "auto":
            backend = os.environ.get("MRT_SAMPLER", "auto")  # "hf": transformers.generate even with vLLM installed
        if backend == "auto":
            try:
                import vllm  # noqa: F401

                backend = "vllm"
            except ImportError:
                backend = "hf"
        self.backend = backend
        if backend == "vllm":
            from vllm import LLM

            self.sleep_mode = resolve_sleep_mode(sleep_mode)

            engine_seed = seed + utils.rank() // engine_kwargs.get("tensor_parallel_size", 1)  # TP ranks share one
            vllm_dtype = str(utils.torch_dtype(dtype, utils.default_device())).removeprefix("torch.")  # bf16 -> bfloat16
            kwargs = dict(seed=engine_seed, dtype=vllm_dtype,
                          enable_prefix_caching=enable_prefix_caching, logprobs_mode="processed_logprobs",
                          gpu_memory_utilization=gpu_memory_utilization)
            if max_model_len:
                kwargs["max_model_len"] = max_model_len
            if not utils.has_cuda() and "OMP_NUM_THREADS" not in os.environ:
                # vLLM means to serve with one torch thread on CPU (its spinning OpenMP
                # workers cost far more than they give on a shared CPU), but 0.32 blocks its
                # own set_num_threads call: set it first.
                import torch

                torch.set_num_threads(1)
            if not utils.has_cuda() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                # the KV cache the run's lengths need (vLLM's CPU engine is told its size; the
                # memory is touched at start, so a bigger one only costs start time and memory)
                kwargs["kv_cache_memory_bytes"] = model_kv_cache_bytes(
                    model, max_model_len, vllm_dtype, engine_kwargs.get("max_num_seqs") or CPU_MAX_SEQS,
                    engine_kwargs.get("block_size") or CPU_ENGINE_BLOCK)
            if not utils.has_cuda():
                kwargs["block_size"] = CPU_ENGINE_BLOCK  # engine_kwargs may name another
                # vLLM 0.32 on CPU fails on seeded requests that are prefilled in chunks
                # ("CPU Generator does not use offset"): prefill each prompt whole.
                kwargs["enable_chunked_prefill"] = False
            kwargs["enforce_eager"] = resolve_eager(os.environ.get("MRT_VLLM_EAGER"), utils.has_cuda())
            if utils.is_distributed():
                kwargs["distributed_executor_backend"] = "external_launcher"
            if self.sleep_mode:
                kwargs["enable_sleep_mode"] = True
            kwargs.update(engine_kwargs)
            try:
                self.llm = LLM(model, **kwargs)
            except (ValueError, RuntimeError, MemoryError) as e:  # vLLM's reasons: too little memory, bad sizes
                reason = " ".join(str(e).split()) or type(e).__name__
                # not every_rank: one rank may fail alone (its GPU busy); run_main names the rank
                raise utils.UserError(f"vLLM engine for {model} could not start: {reason}; "
                                      f"{engine_start_hint(reason, kwargs.get('max_model_len'))}") from e
            self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        else:
            self.model = utils.load_model(model, dtype)
            self.model.eval()
            self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", None) or 1 << 30)

    # -- generation --------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: list[str] | None = None,
                 seed: int | Sequence[int] | None = None, logprobs: bool = True,
                 use_tqdm: bool = False) -> list[list[Sample]]:
        """n samples for each prompt (a string, or token ids used as they are). Returns one
        list of n Samples per prompt, in order. With a seed, results are reproducible: an int
        seeds each prompt by its position in this call; a list gives each prompt its own seed
        (so a prompt's samples do not depend on which other prompts share the call or rank)."""
        if not prompts:
            return []
        if getattr(self, "weights_dropped", False):
            raise RuntimeError("the engine's weights were dropped in its sleep and not synced since: "
                               "sync_weights before sampling")
        if self.backend == "vllm":
            return self._generate_vllm(prompts, n, temperature, top_p, max_tokens, stop, seed, logprobs, use_tqdm)
        return self._generate_hf(prompts, n, temperature, top_p, max_tokens, stop, seed, logprobs)

    def _generate_vllm(self, prompts, n, temperature, top_p, max_tokens, stop, seed, logprobs, use_tqdm):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=list(p)) if not isinstance(p, str) else p for p in prompts]
        if seed is None:
            params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                    stop=stop, logprobs=0 if logprobs else None)
        else:  # a seed per prompt, so results do not depend on how prompts are batched
            params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                                     seed=prompt_seed(seed, i, n), logprobs=0 if logprobs else None)
                      for i in range(len(prompts))]
        outs = self.llm.generate(inputs, params, use_tqdm=use_tqdm)
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                lps = None
                if logprobs and c.logprobs is not None:
                    lps = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)]
                group.append(Sample(c.text, list(c.token_ids), len(c.token_ids),
                                    "length" if c.finish_reason == "length" else "stop", lps,
                                    len(out.prompt_token_ids)))
            result.append(group)
        return result

    def _generate_hf(self, prompts, n, temperature, top_p, max_tokens, stop, seed, logprobs):
        import torch

        tok, model = self.tokenizer, self.model
        eos = tok.eos_token_id
        result = []
        for i, p in enumerate(prompts):
            ids = tok(p, return_tensors="pt")["input_ids"] if isinstance(p, str) else torch.tensor([list(p)])
            ids = ids.to(model.device)
            if seed is not None:
                torch.manual_seed(prompt_seed(seed, i, n))
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None,
                                     top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                                     max_new_tokens=max_tokens, num_return_sequences=n,
                                     stop_strings=stop, tokenizer=tok, pad_token_id=tok.pad_token_id,
                                     output_scores=logprobs, return_dict_in_generate=True)
            seqs = gen.sequences[:, ids.shape[1]:]  # (n, T)
            group = []
            for j in range(n):
                toks = seqs[j].tolist()
                if eos in toks:
                    toks = toks[: toks.index(eos) + 1]
                elif tok.pad_token_id != eos:  # a sequence stopped by a stop string is padded
                    while toks and toks[-1] == tok.pad_token_id:
                        toks.pop()
                text = tok.decode(toks, skip_special_tokens=True)
                cut = [text.index(s) for s in stop or () if s in text]
                text = text[: min(cut)] if cut else text
                finish = "stop" if (eos in toks or cut or len(toks) < max_tokens) else "length"
                lps = None
                if logprobs:
                    lps = [torch.log_softmax(gen.scores[t][j].float(), -1)[toks[t]].item() for t in range(len(toks))]
                group.append(Sample(text, toks, len(toks), finish, lps, ids.shape[1]))
            result.append(group)
        return result

    # -- sleep mode (vLLM on CUDA) ------------------------------------------------------

    def sleep(self, keep_weights: bool = True) -> None:
        """Frees the engine's GPU memory for a training step: the KV cache is dropped, and the
        weights go to CPU memory (keep_weights: vLLM's level 1; wake_up brings them back) or
        are dropped too (level 2: for weights about to be overwritten, which then need no copy
        to the host and back; see update_asleep). An engine whose weights were dropped refuses
        to sample until sync_weights has given it new ones. No-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if keep_weights else 2)
            self.asleep, self.asleep_parts, self.weights_dropped = True, {"weights", "kv_cache"}, not keep_weights

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Back on the GPU: all of the engine (tags None), or the parts named by vLLM's tags
        ("weights", "kv_cache"), e.g. the weights alone, to load new ones into before the KV
        cache takes its memory again. Call before sync_weights and sampling."""
        if self.sleep_mode and self.asleep:
            woken = self.asleep_parts if tags is None else self.asleep_parts & set(tags)
            if woken:
                self.llm.wake_up(tags=None if tags is None else sorted(woken))
            self.asleep_parts = self.asleep_parts - woken
            self.asleep = bool(self.asleep_parts)

    # -- weights -----------------------------------------------------------------------

    def sync_weights(self, model) -> None:
        """Push a trainer model's current weights (plain or FSDP2-sharded) into this
        sampler in place: no restart, no disk round trip, tensor by tensor (no full copy of the
        model is made), in the sampler's own dtype (`training.iter_full_params`: shards cast
        first, gathered in buckets). vLLM then resets its prefix cache, since KV blocks computed
        with the old weights would otherwise be reused. Under torchrun, every rank must call
        this (the shards are gathered collectively)."""
        import torch

        if self.backend == "vllm":
            dtype = utils.torch_dtype(self.dtype, utils.default_device())  # the engine's
            weights = training.iter_full_params(model, dtype)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        else:
            own = self.model.state_dict()  # views of this model's tensors: copied into in place
            seen, unknown = set(), []
            with torch.no_grad():
                for name, t in training.iter_full_params(model, next(self.model.parameters()).dtype):
                    if name in own:
                        own[name].copy_(t)
                        seen.add(name)
                    else:  # raised after the loop: under torchrun every rank must finish the gathers
                        unknown.append(name)
            missing = sorted(set(own) - seen)
            if unknown or missing:
                raise RuntimeError(f"sync_weights: the trainer's weights do not match the sampler's model "
                                   f"(not in it: {unknown[:3]}, missing: {missing[:3]})")
        self.weights_dropped = False


def update_asleep(sampler: Sampler, update: Callable[[], Any], model=None):
    """One training update with the engine asleep, then its new weights in the engine: with
    sleep mode, sampler.sleep(keep_weights=False) (vLLM's level 2: weights and KV cache dropped,
    nothing copied to the host), update(), wake_up(["weights"]), sync_weights(model) into the
    woken weights' memory, then wake_up(["kv_cache"]). `model` defaults to what update()
    returns; update()'s result is returned. If the update raises, the engine wakes up whole,
    its weights undefined: it refuses to sample until synced. A sampler without sleep mode
    (or a stand-in without sleep/wake_up) is only synced."""
    sleeps = getattr(sampler, "sleep_mode", False)
    if sleeps:
        sampler.sleep(keep_weights=False)
    try:
        result = update()
    except BaseException:
        if sleeps:
            sampler.wake_up()
        raise
    try:
        if sleeps:
            sampler.wake_up(["weights"])
        sampler.sync_weights(result if model is None else model)
    finally:
        if sleeps:
            sampler.wake_up(["kv_cache"])
    return result


def load_on_host(path: str, dtype: str = "auto"):
    """A model folder's weights for `Sampler.sync_weights`, loaded on the CPU in the dtype an
    engine of `dtype` runs in on this process's device ('auto': bf16 on a GPU): no second copy
    of the model on the GPU that the engine shares, and no fp32 copy on the host."""
    return utils.load_model(path, utils.torch_dtype(dtype, utils.default_device()), "cpu")


def engine_start_hint(reason: str, max_model_len: int | None) -> str:
    """What to change when a vLLM engine does not start, from vLLM's reason: when the GPU has
    less free memory than --gpu-memory-utilization asks for (other engines or processes hold
    it), lower that share; otherwise (the KV cache cannot hold one sequence, ...) lower the
    run's lengths or give the cache more room."""
    if "Free memory on device" in reason or "less than desired GPU memory utilization" in reason:
        return ("lower --gpu-memory-utilization: this GPU has less free memory than the share asks for "
                "(other engines or processes hold the rest)")
    return (f"lower the run's --max-* lengths (max_model_len {max_model_len or 'the model'}), or raise "
            f"VLLM_CPU_KVCACHE_SPACE (CPU, GiB) / --gpu-memory-utilization (GPU, while memory is free)")


def resolve_eager(value: str | None, cuda: bool) -> bool:
    """MRT_VLLM_EAGER ("1": vLLM without torch.compile, "0": with it, unset or "": eager on CPU
    and compiled on CUDA) -> vLLM's enforce_eager. On CUDA compilation and CUDA graphs pay for
    their start; on CPU the compile adds seconds to every engine start, which the toy's runs
    (many engines, small calls) do not win back from its faster decoding; a long CPU job of
    large calls may (`python bench/vllm_engine.py`, bench/README.md)."""
    if value in (None, ""):
        return not cuda
    if value not in ("0", "1"):
        raise utils.UserError(f"MRT_VLLM_EAGER must be 0 or 1 (or unset), got {value!r}")
    return value == "1"


def resolve_sleep_mode(value: str | bool) -> bool:
    """--sleep-mode auto|on|off (or a bool) -> whether the vLLM engine runs with sleep mode:
    auto is on with CUDA, off without (vLLM 0.32's CPU build rejects it)."""
    if isinstance(value, bool):
        on = value
    elif str(value).lower() in ("auto", "on", "off", "true", "false"):
        v = str(value).lower()
        on = utils.has_cuda() if v == "auto" else v in ("on", "true")
    else:
        raise utils.UserError(f"--sleep-mode must be auto, on or off, got {value!r}")
    if on and not utils.has_cuda():
        raise utils.UserError("--sleep-mode on needs vLLM on CUDA: vLLM's CPU build has no sleep mode (use auto or off)")
    return on


def engine_length(model: str, need: int) -> int:
    """max_model_len for an engine on `model` whose sequences hold at most `need` tokens:
    `need`, capped at the model's max_position_embeddings (vLLM refuses more). Never the
    model's whole context when the run needs less (a 1M-position config would ask the KV
    cache for 1M tokens per sequence)."""
    from transformers import AutoConfig

    with utils.loading_errors(model):
        cfg = AutoConfig.from_pretrained(model)
    limit = getattr(cfg, "max_position_embeddings", None) or need
    return int(max(1, min(need, limit)))


ENGINE_SLACK = 16
"""Extra engine tokens per sequence: a context re-encoded from text (z0, z1) may take a few more
tokens than were sampled."""


def mu_need(tokenizer, mode: str, suffix: str, max_tokens: int, rollout_tokens: int) -> int:
    """Tokens the meta-prover adds to a context: its forced suffix and answer (mode "forced"), or
    the B tokens it writes (mode "rollout")."""
    if mode == "rollout":
        return rollout_tokens
    return len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) + max_tokens


def trace_need(tokenizer, prompt_tokens: int, max_tokens: int, backtrack: bool, mu_tokens: int = 0) -> int:
    """Tokens one engine sequence may hold when it samples from a prompt of `prompt_tokens`:
    direct, prompt + completion; backtrack, prompt + z0 + cue + continuation (z0 and the
    continuation each at most `max_tokens`) plus `mu_tokens` when the meta-prover samples from
    this engine (its longest context is x + z0 + z1, mu_need); plus ENGINE_SLACK.
    `engine_length` turns it into the engine's max_model_len."""
    need = prompt_tokens + max_tokens + ENGINE_SLACK
    if backtrack:
        need += max_tokens + len(tokenizer(utils.BACKTRACK_CUE, add_special_tokens=False)["input_ids"]) + mu_tokens
    return need


def model_positions(model: str) -> int:
    """The most tokens a sequence of `model` may take: its config's max_position_embeddings
    (2**30 when the config names none)."""
    from transformers import AutoConfig

    with utils.loading_errors(model):
        cfg = AutoConfig.from_pretrained(model)
    return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def cpu_kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, max_model_len: int,
                       max_num_seqs: int = CPU_MAX_SEQS, block_size: int = CPU_BLOCK, cap: int = CPU_KV_CAP) -> int:
    """KV-cache bytes of a CPU engine: room for `max_num_seqs` sequences of `max_model_len`
    tokens at once (each in whole blocks of `block_size`, plus one), so that vLLM never has to
    preempt a sequence for lack of blocks; at most `cap`. A token holds K and V in every layer:
    2 x layers x kv_heads x head_dim x dtype_bytes."""
    per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    blocks = -(-max_model_len // block_size) + 1  # ceil, and one more
    return int(min(cap, max_num_seqs * blocks * block_size * per_token))


def model_kv_cache_bytes(model: str, max_model_len: int | None, dtype: str, max_num_seqs: int = CPU_MAX_SEQS,
                         block_size: int = CPU_BLOCK) -> int:
    """`cpu_kv_cache_bytes` for a model folder's config (its text config for a multimodal one)
    and an engine of `max_model_len` tokens (None: the model's max_position_embeddings, as vLLM
    takes) in `dtype` ("float32", "bfloat16", ...). A config without the attention sizes gets
    CPU_KV_CAP."""
    import torch
    from transformers import AutoConfig

    with utils.loading_errors(model):
        cfg = AutoConfig.from_pretrained(model)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(cfg, "num_attention_heads", None)
    layers, hidden = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
    length = max_model_len or getattr(cfg, "max_position_embeddings", None)
    if not (heads and layers and hidden and length):
        return CPU_KV_CAP
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return cpu_kv_cache_bytes(layers, kv_heads, head_dim, getattr(torch, dtype).itemsize, length, max_num_seqs,
                              block_size)


# ---- Engines: built here or reused, freed, sized from the run's lengths --------------


READY: dict = {}
"""Engines built before a stage runs, by model path, that `engine` hands out instead of building
one (`ready_engines` fills it; tests do, since an engine takes about 20 s to start). A ready
engine may hold another checkpoint's weights of the same architecture: a trainer syncs its own
into it first, and a stage never frees an engine it did not build."""


@contextlib.contextmanager
def ready_engines(engines: dict):
    """READY holds `engines` ({model path: sampler}) inside the block, and what it held before after it."""
    saved = dict(READY)
    READY.update(engines)
    try:
        yield
    finally:
        READY.clear()
        READY.update(saved)


def engine(path: str, **kwargs) -> Sampler:
    """The engine of model `path`: READY's when one is there, else make_sampler(path, **kwargs)."""
    return READY[path] if path in READY else make_sampler(path, **kwargs)


def make_sampler(path: str, **kwargs) -> Sampler:
    """Sampler, also as the second engine of a plain (non-torchrun) process: the first
    vLLM engine leaves its own one-process group behind, which makes utils pick the
    "external_launcher" executor (it needs torchrun's RANK); such an engine gets "uni"."""
    if "RANK" not in os.environ and utils.is_distributed():
        kwargs.setdefault("distributed_executor_backend", "uni")
    return Sampler(path, **kwargs)


def group_exists() -> bool:
    """Whether a torch.distributed group exists now (torchrun's, or one a live vLLM engine
    started). Taken before building an engine, it tells close_engine whether to tear down."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def close_engine(sampler, had_group: bool) -> None:
    """Free an engine this script built. The engine attribute is dropped explicitly: vLLM
    0.32 pins the frame of the first Sampler.__init__ in a process (so `del sampler` alone
    left one 2 GiB KV cache alive). vLLM also starts a one-process torch.distributed group;
    unless one existed before, tear it down (vLLM's public cleanup_dist_env_and_memory), or
    the next engine mistakes it for a torchrun group. If a group existed (torchrun's, or one
    that another live engine uses), it is left alone: tearing it down breaks that engine."""
    backend = sampler.backend
    for attr in ("llm", "model"):
        if hasattr(sampler, attr):
            delattr(sampler, attr)
    del sampler
    gc.collect()
    if backend == "vllm" and not had_group:
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


# ---- Attempts z0 and outcomes: the rules every stage shares --------------------------


def sample_attempts(sampler, prompts: list[str], n: int = 1, *, temperature: float, top_p: float = 1.0,
                    max_tokens: int, seed) -> list[list]:
    """n plain attempts per prompt (Sample lists), cut before the backtrack marker if
    the model writes one: MRT-B's initial attempt z0 (n = 1, from the base), a warmstart's or
    STaR's direct attempts."""
    if not prompts:
        return []
    return sampler.generate([utils.encode(sampler.tokenizer, p) for p in prompts], n=n, temperature=temperature,
                            top_p=top_p, max_tokens=max_tokens, stop=["\n" + utils.BACKTRACK_MARKER], seed=seed,
                            logprobs=False)


Z0_TRIES = 4
"""Attempts sample_z0 samples per problem at most before it drops the problem."""


def usable_z0(sample) -> bool:
    """Whether a sampled attempt can be z0: it ended by itself (not cut at the token limit;
    cut at the backtrack marker counts as ended) and holds a complete boxed answer."""
    return sample.finish_reason != "length" and utils.extract_boxed(sample.text) is not None


def sample_z0(sampler, problems: list[dict], *, temperature: float, top_p: float = 1.0, max_tokens: int,
              seed_parts: tuple, tries: int = Z0_TRIES) -> tuple[dict[int, str], dict[int, str]]:
    """({problem id: z0}, {problem id: last try}) for problems (each with its "prompt"): one
    attempt per problem from the engine's current weights (the base's, in Alg. 1 and 2), in
    shares over the ranks, gathered on every rank. The rule of every stage (grpo.py, star.py,
    infogain.py's CLI): an attempt that is not usable_z0 (cut at --max-tokens, or no box) is
    resampled, up to `tries` attempts in all, and a problem whose every try failed is dropped:
    it is left out of the first dict and its last try (right-stripped) goes to the second, for
    the caller to count and log. Rank r's first try is seeded utils.derive_seed(*seed_parts, r),
    its t-th retry utils.derive_seed(*seed_parts, "retry", t, r). z0 is right-stripped."""
    rank, world = utils.rank(), utils.world_size()
    kept, last, todo = {}, {}, problems[rank::world]
    for t in range(tries):
        if not todo:
            break
        seed = utils.derive_seed(*seed_parts, rank) if t == 0 else utils.derive_seed(*seed_parts, "retry", t, rank)
        outs = sample_attempts(sampler, [p["prompt"] for p in todo], temperature=temperature, top_p=top_p,
                               max_tokens=max_tokens, seed=seed)
        failed = []
        for p, g in zip(todo, outs):
            if usable_z0(g[0]):
                kept[p["id"]] = g[0].text.rstrip()
            else:
                last[p["id"]] = g[0].text.rstrip()
                failed.append(p)
        todo = failed
    dropped = {p["id"]: last[p["id"]] for p in todo}
    parts = utils.all_gather((kept, dropped))
    return ({i: z for k, _ in parts for i, z in k.items()}, {i: z for _, d in parts for i, z in d.items()})


def sample_outcome(text: str | None, gold: str, finish_reason: str, reward: str = "",
                   record: dict | None = None) -> float:
    """The outcome of a sampled answer (a revised attempt z2, or a direct attempt): the rule
    of every stage (grpo.py, star.py, infogain.py's CLI) is the run's grader
    (utils.make_grader(reward): utils.grade, 0/1, by default; a custom --reward gets the
    problem's `record`), and 0 when the sample was cut at the token limit (finish_reason
    "length"), whatever box it holds: only an attempt that ended by itself is graded."""
    return 0.0 if finish_reason == "length" or text is None else utils.make_grader(reward)(text, gold, record)


# ---- The meta-prover mu and J(mu | c) (MRT paper Sec. 5) -----------------------------


def mu_context(context: str, suffix: str) -> str:
    """The text mu continues: context + suffix, trailing newlines of the context dropped
    when the suffix starts with one (no blank line before the forced answer)."""
    if suffix.startswith(("\n", "\r\n")):
        context = context.rstrip("\r\n")
    return context + suffix


@functools.lru_cache(maxsize=1 << 16)
def _grade_answer(pred: str, gold: str) -> float:
    return utils.grade("\\boxed{" + pred + "}", gold)


def grade_cached(text: str, gold: str) -> float:
    """utils.grade(text, gold), cached on (extracted answer, gold): mu's short answers
    repeat a lot, and a mismatch costs about a millisecond of math-verify."""
    pred = utils.extract_boxed(text)
    return 0.0 if pred is None else _grade_answer(pred, str(gold))


MU_MODES = ("forced", "rollout")


@dataclass
class MuArgs:
    """Flags of the meta-prover mu (MetaProver), shared by the stages that estimate J(mu | context)."""

    mu_model: str = ""
    """meta-prover model (empty: the model being trained or measured is its own mu, in the same engine)"""
    mu_suffix: str = utils.MU_SUFFIX
    """forced suffix after the context that makes mu answer now (answer prefix or instruction; bash: $'...')"""
    mu_samples: int = 8
    """m: mu's sampled answers per context for J(mu | context)"""
    mu_temperature: float = 1.0
    """mu's sampling temperature"""
    mu_max_tokens: int = 16
    """max tokens of a mu answer (raise it for an instruction suffix or an empty one)"""
    mu_mode: str = "forced"
    """forced: mu answers after the context + --mu-suffix; rollout: mu writes --mu-rollout-tokens on, its
    last box graded (MetaProver)"""
    mu_rollout_tokens: int = 128
    """B: tokens mu writes per sample in --mu-mode rollout"""


def check_mu_args(args: MuArgs) -> None:
    """One-line UserError for a --mu-* value a MetaProver would refuse (a stage checks before any engine)."""
    utils.check_flags(args, {"mu_mode": MU_MODES},
                      dict.fromkeys(("mu_samples", "mu_max_tokens", "mu_rollout_tokens"), 1))


BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def opens_box(suffix: str) -> bool:
    """Whether a forced suffix ends inside a box it opens (utils.MU_SUFFIX: "... \\boxed{")."""
    return any(m.end() == len(suffix.rstrip(" ")) for m in BOX_OPEN.finditer(suffix))


def first_box(text: str) -> str | None:
    """Content of the first \\boxed{...} (or \\fbox{...}) of text when that box is closed
    (braces counted, so nested braces stay inside), else None: a first box left open is no
    answer, whatever boxes follow inside it."""
    m = BOX_OPEN.search(text)
    if m is None:
        return None
    depth = 1
    for i in range(m.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[m.end():i].strip()
    return None


class MetaProver:
    """mu: the meta-prover estimating J(mu | c), in one of two modes.

    forced   mu is the model steered to stop and answer now: the suffix (a forced answer
             prefix, default utils.MU_SUFFIX) is appended to the context and mu writes up to
             max_tokens. When the suffix opens a box (it ends in "\\boxed{"), mu's answer is
             that box: the first closed box of suffix + completion (first_box), braces
             counted; it is graded, and whatever mu writes after closing it is not its answer.
             (Until this rule the last complete box of suffix + completion was graded, so a
             second box written after the first one replaced it and an unclosed second box
             voided a closed first one: the rule changes the estimator in those cases only.)
             With stop_at_box (default) mu stops writing at that box's closing brace: a
             vLLM stop at "}" ends each answer at its first closing brace, and an answer whose
             box is still open there (a nested brace, as in \\frac{1}{2}) is continued from its
             own tokens, one request per such answer, until its box closes or max_tokens are
             written. The stop changes no grade: an answer with no nested brace is the same
             tokens as without the stop up to the closing brace (seeded sampling draws token
             by token), and one continued after a nested brace is drawn from the same
             distribution (new draws). A suffix that opens no box (e.g. "", warmstart's value
             estimate, where mu completes the solution) is graded on the last complete box of
             the completion, with no stop.
    rollout  mu continues the context as it is, in the trace's own format, for up to
             rollout_tokens tokens; its answer is the last boxed answer of the last episode
             of context + completion (utils.last_episode: the text after the last backtrack
             marker, all of it when there is none; the rule of the GRPO outcome and
             evaluate.py), and no box there counts as no answer (so does a box it opens and
             does not close). J is a Monte-Carlo value of the context: after a finished
             attempt it is that attempt's answer unless mu goes on to revise it; after a
             backtrack episode only a box mu writes after the marker counts, never the answer
             the episode abandoned. The suffix is not used, and no stop applies (mu may revise
             after a box). The paper allows any mu ("the same LLM", "another LLM told to
             estimate the answer"); this mode is our choice for small models that cannot
             answer without writing the steps.

    `sampler` is the policy's own Sampler (mu = the current policy, so it follows
    weight syncs) or one built on another model. With suffix "" the forced mode completes
    the solution from the context too (warmstart's value estimate), but grades only the
    completion. In both modes the m samples of one context come from one request with n=m
    (its prefill is shared), and all contexts of a call go to the engine together. `seconds`
    accumulates the time spent in mu's calls, `tokens` the tokens mu decoded.

    `reward` (a --reward spec; "" the math-verify grader) grades mu's answers too: J is the
    success rate under the task's reward, so a custom reward is the meta-prover's as well. It
    is handed the answer text (as `answers` gives it) and the record {"answer": gold} (mu sees
    contexts and gold answers only); a non-binary reward makes J a mean reward rather than a
    success rate."""

    def __init__(self, sampler: Sampler, suffix: str = utils.MU_SUFFIX, m: int = 8,
                 temperature: float = 1.0, max_tokens: int = 16, top_p: float = 1.0,
                 mode: str = "forced", rollout_tokens: int = 128, stop_at_box: bool = True,
                 reward: str = ""):
        if mode not in MU_MODES:
            raise ValueError(f"MetaProver mode must be one of {MU_MODES}, got {mode!r}")
        if m < 1 or max_tokens < 1 or rollout_tokens < 1:
            raise ValueError(f"MetaProver needs m, max_tokens and rollout_tokens >= 1, got m={m}, "
                             f"max_tokens={max_tokens}, rollout_tokens={rollout_tokens}")
        self.sampler, self.m, self.mode = sampler, m, mode
        self.suffix = suffix if mode == "forced" else ""
        self.temperature, self.top_p = temperature, top_p
        self.max_tokens = max_tokens if mode == "forced" else rollout_tokens
        """tokens mu writes per sample (the forced answer's limit, or B in rollout mode)"""
        self.boxed = mode == "forced" and opens_box(self.suffix)
        """the answer is the box the suffix opens (first_box)"""
        self.stop_at_box = stop_at_box and self.boxed
        self.seconds, self.tokens = 0.0, 0
        """time spent in success_rates and tokens decoded, since the engine was given to mu"""
        self._lapped = (0.0, 0)
        self.reward = utils.make_grader(reward) if reward else None
        """the custom reward's grade(text, gold, record), None for the math-verify grader"""

    def lap(self) -> tuple[float, int]:
        """(seconds, tokens) of mu since the last lap (or since it was made): grpo.py's per-step share."""
        (s0, t0), self._lapped = self._lapped, (self.seconds, self.tokens)
        return self.seconds - s0, self.tokens - t0

    def answers(self, contexts: list[str], seed: int | None = None) -> list[list[str]]:
        """(C, m) texts mu's answers are graded on: suffix + completion (forced) or the last
        episode of context + completion (rollout). Adds the decoded tokens to `tokens`."""
        tok = self.sampler.tokenizer
        prompts = [utils.encode(tok, mu_context(c, self.suffix)) for c in contexts]
        outs = self.sampler.generate(prompts, n=self.m, temperature=self.temperature, top_p=self.top_p,
                                     max_tokens=self.max_tokens, seed=seed, logprobs=False,
                                     **({"stop": ["}"]} if self.stop_at_box else {}))
        self.tokens += sum(s.num_tokens for group in outs for s in group)
        if self.mode == "rollout":
            return [[utils.last_episode(c + s.text) for s in group] for group, c in zip(outs, contexts)]
        if not self.stop_at_box:
            return [[self.suffix + s.text for s in group] for group in outs]
        return self._close_boxes(prompts, outs, seed)

    def _close_boxes(self, prompts: list[list[int]], outs, seed: int | None) -> list[list[str]]:
        """suffix + completion of answers stopped at "}". vLLM leaves the stop string out of the
        text, so an answer's text is decoded from its sampled ids (the closing token included)
        where that decoding extends the text (else the text is taken as it is: a sampler that
        writes the brace itself); an answer whose box is still open after a brace goes on
        from prompt + its ids, in rounds."""
        tok = self.sampler.tokenizer
        ids = [[list(s.token_ids) for s in group] for group in outs]
        texts = []
        for group, group_ids in zip(outs, ids):
            decoded = [tok.decode(i, skip_special_tokens=True) if i else "" for i in group_ids]
            texts.append([d if i and d.startswith(s.text) else s.text for s, i, d in zip(group, group_ids, decoded)])
        for rnd in itertools.count(1):
            todo = [(i, j) for i, group in enumerate(outs) for j, s in enumerate(group)
                    if s.finish_reason == "stop" and ids[i][j] and len(ids[i][j]) < self.max_tokens
                    and "}" in tok.decode(ids[i][j][-1:], skip_special_tokens=True)
                    and first_box(self.suffix + texts[i][j]) is None]
            if not todo:
                break
            for i, j in todo:  # one request each: their token budgets differ
                s = self.sampler.generate([prompts[i] + ids[i][j]], n=1, temperature=self.temperature,
                                          top_p=self.top_p, max_tokens=self.max_tokens - len(ids[i][j]),
                                          seed=None if seed is None else [utils.derive_seed(seed, "box", rnd, i, j)],
                                          logprobs=False, stop=["}"])[0][0]
                ids[i][j] += list(s.token_ids)
                outs[i][j] = s
                texts[i][j] = tok.decode(ids[i][j], skip_special_tokens=True)
                self.tokens += s.num_tokens
        return [[self.suffix + t for t in group] for group in texts]

    def grade(self, answer: str, gold: str) -> float:
        """0/1 grade of one of mu's answer texts (answers): the box the suffix opened when it
        opens one, else the last complete box (grade_cached); with a custom reward, its value
        of the answer text."""
        if self.reward is not None:
            return self.reward(answer, gold, {"answer": gold})
        if self.boxed:
            pred = first_box(answer)
            return 0.0 if pred is None else _grade_answer(pred, str(gold))
        return grade_cached(answer, gold)

    def correct(self, contexts: list[str], golds: list[str], seed: int | None = None) -> np.ndarray:
        """(C, m) 0/1 grades of mu's m answers per context (answers, grade)."""
        if len(contexts) != len(golds):
            raise ValueError(f"{len(contexts)} contexts but {len(golds)} gold answers")
        if not contexts:
            return np.zeros((0, self.m))
        t0 = time.time()
        texts = self.answers(contexts, seed)
        grades = np.array([[self.grade(a, g) for a in group] for group, g in zip(texts, golds)],
                          dtype=np.float64)  # (C, m)
        self.seconds += time.time() - t0
        return grades

    def success_rates(self, contexts: list[str], golds: list[str], seed: int | None = None) -> np.ndarray:
        """(C,) estimates of J(mu | c) for each full-text context (prompt + episodes so far)."""
        return self.correct(contexts, golds, seed).mean(axis=1)


# ---- Parallel and linearized sampling (evaluate.py, r1_analysis.py; paper Sec. 7) ----


def final_answer(text: str) -> str | None:
    """Extracted answer of a generation (last box of its last episode); None if unparsable."""
    return utils.extract_boxed(utils.last_episode(text)) or None


def graded(text: str, gold: str, reward: str = "", record: dict | None = None) -> dict:
    """Per-sample fields of one generation: its answer, 0/1 grade (the run's grader,
    utils.make_grader(reward), on the last episode; a custom reward's value counts as correct
    only when it is 1, since pass@k and maj@k need 0/1 outcomes) and the number of backtrack
    markers it wrote."""
    value = utils.make_grader(reward)(utils.last_episode(text), gold, record)
    return {"answer": final_answer(text), "correct": value if not reward else float(value == 1.0),
            "backtracks": text.count(utils.BACKTRACK_MARKER)}


def run_parallel(sampler, prompt_ids, records, ids: list[int], *, samples: int, temperature: float, top_p: float,
                 max_tokens: int, seed: int, reward: str = "") -> list[dict]:
    """`samples` independent traces per problem (prompt_ids, with its record: "answer", and
    "record" for a custom `reward`); one row per trace. `ids`: the problems' indices in the whole
    data set (this rank's share under torchrun), which also seed their samples."""
    outs = sampler.generate(prompt_ids, n=samples, temperature=temperature, top_p=top_p,
                            max_tokens=max_tokens, use_tqdm=utils.is_main(),
                            seed=[utils.derive_seed(seed, "parallel", i) for i in ids])
    rows = []
    for i, group, rec in zip(ids, outs, records):
        for j, s in enumerate(group):
            rows.append({"problem": i, "sample": j, "gold": rec["answer"],
                         **graded(s.text, rec["answer"], reward, rec.get("record")),
                         "gen_tokens": s.num_tokens, "context_tokens": s.prompt_tokens,
                         "finish_reason": s.finish_reason, "text": s.text})
    return rows


def run_linearized(sampler, prompt_ids, records, ids: list[int], *, rounds: int, window: int, max_len: int,
                   temperature: float, top_p: float, max_tokens: int, seed: int, reward: str = "") -> list[dict]:
    """`rounds` sequential rounds per problem, round r+1 conditioned on the prompt, the latest
    `window` transcript tokens and the continuation cue (utils.BACKTRACK_CUE), all within
    `max_len` tokens; one row per round. `ids` and `records` as run_parallel's."""
    from tqdm import tqdm

    tok = sampler.tokenizer
    eos = tok.eos_token_id
    cue = tok(utils.BACKTRACK_CUE, add_special_tokens=False)["input_ids"]
    windows = [min(window, max_len - len(p) - len(cue) - max_tokens) for p in prompt_ids]
    if min(windows) < 1:
        i = int(np.argmin(windows))
        raise utils.UserError(f"problem {ids[i]}: prompt ({len(prompt_ids[i])} tokens) + max_tokens "
                              f"({max_tokens}) leave no room for a window in {max_len} tokens of "
                              f"context")
    if min(windows) < window:
        utils.print0(f"warning: window capped at {min(windows)} tokens by the {max_len}-token context")
    transcripts = [[] for _ in prompt_ids]  # (P, growing) sampled ids: r1, cue, r2, cue, ...
    rows = []
    for r in tqdm(range(rounds), desc="linearized rounds", disable=not utils.is_main()):
        contexts = [p if r == 0 else p + t[-w:] + cue for p, t, w in zip(prompt_ids, transcripts, windows)]
        outs = sampler.generate(contexts, n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                seed=[utils.derive_seed(seed, "round", r, i) for i in ids])
        for k, (i, group, rec, ctx) in enumerate(zip(ids, outs, records, contexts)):
            s = group[0]
            new = s.token_ids[:-1] if s.token_ids and s.token_ids[-1] == eos else s.token_ids
            transcripts[k] += (cue if r else []) + list(new)
            rows.append({"problem": i, "round": r + 1, "gold": rec["answer"],
                         **graded(s.text, rec["answer"], reward, rec.get("record")),
                         "gen_tokens": s.num_tokens, "context_tokens": len(ctx),
                         "window_tokens": len(ctx) - len(prompt_ids[k]) - (len(cue) if r else 0),
                         "finish_reason": s.finish_reason, "text": s.text})
    return rows


# ---- Helpers of star.py: the base's z0 for named splits of problems; an SFT with the engine asleep ----


def sample_z0_splits(sampler, splits: dict[str, list[dict]], path: str, *, seed: int, temperature: float,
                     top_p: float, max_tokens: int) -> tuple[dict, dict]:
    """sample_z0 on each split of problems in turn ({name: problems}, seed_parts (seed, "z0", name)):
    ({name: {id: z0}}, {name: {id: last try of a dropped problem}}). A UserError when the first
    split (the training problems) keeps none; else rank 0 writes `path`, a JSON row per problem:
    split, id, problem, answer, z0 (the kept attempt, or a dropped problem's last try), dropped."""
    z0s, lost = {}, {}
    for name, problems in splits.items():
        z0s[name], lost[name] = sample_z0(sampler, problems, temperature=temperature, top_p=top_p,
                                          max_tokens=max_tokens, seed_parts=(seed, "z0", name))
    if not next(iter(z0s.values())):
        raise utils.UserError(f"no training problem has a usable attempt z0 (every one cut at --max-tokens "
                              f"{max_tokens} or without a box in {Z0_TRIES} tries): raise --max-tokens")
    if utils.is_main():
        utils.write_jsonl(path, [{"split": s, "id": p["id"], "problem": p["problem"], "answer": p["answer"],
                                  "z0": z0s[s][p["id"]] if p["id"] in z0s[s] else lost[s][p["id"]],
                                  "dropped": p["id"] in lost[s]} for s, ps in splits.items() for p in ps])
    return z0s, lost


def sft_asleep(sampler, model_path: str, examples: list[tuple[str, str]], args, *, model_dir: str, log_path: str,
               ckpt_path: str, card: dict, log_extra: dict) -> dict:
    """training.sft of `model_path` on (prompt, completion) examples while the engine sleeps, its
    result synced into the engine (update_asleep); the SFT checkpoint is deleted once the model is
    saved. Returns {sft_steps, sft_loss_first, sft_loss_last} of the SFT log on rank 0, {} elsewhere."""
    import shutil

    update_asleep(sampler, lambda: training.sft(model_path, examples, args, model_dir=model_dir, log_path=log_path,
                                                ckpt_path=ckpt_path, card=card, log_extra=log_extra))
    gc.collect()
    if not utils.is_main():
        return {}
    if os.path.exists(ckpt_path):
        shutil.rmtree(ckpt_path)
    losses = [r["loss"] for r in utils.read_records(log_path, ["loss"])]
    return {"sft_steps": len(losses), "sft_loss_first": losses[0], "sft_loss_last": losses[-1]}


# ---- Helpers of grpo.py: the attempts z0 of a run, sampled once from the base and stored ----


def prepare_z0(sampler, train: list[dict], test: list[dict], path: str, args, reuse: bool,
               positions: list[int], world: int) -> tuple[frozenset, list[dict], dict, dict]:
    """z0 (Alg. 2: the frozen base's attempt, sampled while the engine holds the base weights) for every
    training problem of the grpo.py steps that start at `positions`, every rank's share (utils.step_problems),
    and every held-out problem, in shares over the ranks (sample_z0: a cut or box-less attempt is resampled,
    then its problem dropped). A dropped training problem leaves the stream and the problems after it move
    up, so those that newly enter get their z0 too (rounds until none is missing); a dropped held-out
    problem leaves the held-out set. Everything, the dropped problems included (with their last try and
    "dropped": true), is stored in `path`, which a resumed run (`reuse`) reads back. Returns (skip: the
    dropped training ids; the kept held-out problems; {id: z0} of train; {id: z0} of test)."""
    def wanted(skip: frozenset) -> set:
        return {p["id"] for pos in positions for r in range(world)
                for p in utils.step_problems(train, pos, args, r, skip)}

    z0s, lost = {}, {}  # (split, id) -> z0, or the last try of a dropped problem
    if reuse and os.path.exists(path):
        for r in utils.read_records(path, ["split", "id", "z0"]):
            (lost if r.get("dropped") else z0s)[(r["split"], r["id"])] = r["z0"]
    skip = lambda: frozenset(i for s, i in lost if s == "train")  # noqa: E731
    t0, sampled = time.time(), {"train": 0, "test": 0}
    for rnd in itertools.count():  # a round that drops nothing covers every problem the run uses
        if len(skip()) == len(train):
            raise utils.UserError(f"no training problem has a usable attempt z0 (every one cut at "
                                  f"--max-tokens {args.max_tokens} or without a box in {Z0_TRIES} tries): "
                                  "raise --max-tokens")
        want = wanted(skip())
        todo = {"train": [p for p in train if p["id"] in want and ("train", p["id"]) not in z0s],
                "test": [p for p in test if ("test", p["id"]) not in z0s and ("test", p["id"]) not in lost]}
        if not (todo["train"] or todo["test"]):
            break
        if reuse:
            raise utils.UserError(f"{path}: attempts missing for a resumed run (the base weights are gone)")
        for split, probs in todo.items():
            parts = (args.seed, "z0", split, *([rnd] if rnd else []))  # round 0 seeded as before drops existed
            kept, dropped = sample_z0(sampler, probs, temperature=args.temperature, top_p=args.top_p,
                                      max_tokens=args.max_tokens, seed_parts=parts)
            z0s.update({(split, i): z for i, z in kept.items()})
            lost.update({(split, i): z for i, z in dropped.items()})
            sampled[split] += len(probs)
    if sampled["train"] or sampled["test"]:
        if utils.is_main():
            utils.write_jsonl(path, [{"split": s, "id": i, "z0": z, "dropped": (s, i) in lost}
                                     for (s, i), z in sorted({**z0s, **lost}.items())])
        utils.print0(f"sampled z0 for {sampled['train']} train and {sampled['test']} held-out problems in "
                     f"{time.time() - t0:.0f}s")
    n_lost = {name: sum(s == name for s, _ in lost) for name in ("train", "test")}
    if n_lost["train"] or n_lost["test"]:
        utils.print0(f"dropped {n_lost['train']} train and {n_lost['test']} held-out problems: no usable "
                     f"attempt z0 in {Z0_TRIES} tries (cut at --max-tokens or no box); stored in {path}")
    split = lambda name: {i: z for (s, i), z in z0s.items() if s == name}  # noqa: E731
    return skip(), [p for p in test if ("test", p["id"]) not in lost], split("train"), split("test")


def rl_need(tokenizer, longest: int, args, backtrack: bool, with_mu: bool) -> int:
    """Tokens an RL run's engine sequence may hold (trace_need) from its longest prompt (`longest`
    tokens), with mu's part (mu_need) when mu samples from that engine. `args`: grpo.Args."""
    mu = mu_need(tokenizer, args.mu_mode, args.mu_suffix, args.mu_max_tokens, args.mu_rollout_tokens)
    return trace_need(tokenizer, longest, args.max_tokens, backtrack, mu if with_mu else 0)


def rl_engine(path: str, tokenizer, longest: int, args, backtrack: bool, with_mu: bool) -> Sampler:
    """The policy's engine of an RL run (grpo.Args): `engine(path)` sized by rl_need; a new one is
    described on rank 0 (READY's is not)."""
    ready, max_len = path in READY, engine_length(path, rl_need(tokenizer, longest, args, backtrack, with_mu))
    sampler = engine(path, max_model_len=max_len, sleep_mode=args.sleep_mode, seed=args.seed,
                     dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)
    if not ready:
        utils.print0(f"sampler: {sampler.backend}, max_model_len {max_len} (longest prompt {longest} "
                     f"tokens), gpu_memory_utilization {args.gpu_memory_utilization}, "
                     f"sleep mode {sampler.sleep_mode}")
    return sampler


def rl_meta_prover(sampler, tokenizer, longest: int, args, backtrack: bool) -> MetaProver:
    """mu of an RL run (grpo.Args): the policy's engine `sampler`, or with --mu-model a new engine on it
    (no sleep mode) sized by rl_need with mu's part."""
    need = rl_need(tokenizer, longest, args, backtrack, True)
    mu = sampler if not args.mu_model else Sampler(
        args.mu_model, max_model_len=engine_length(args.mu_model, need), sleep_mode="off", seed=args.seed,
        dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization)
    return MetaProver(mu, suffix=args.mu_suffix, m=args.mu_samples, temperature=args.mu_temperature,
                      max_tokens=args.mu_max_tokens, mode=args.mu_mode, rollout_tokens=args.mu_rollout_tokens,
                      reward=args.reward)


# ---- Helpers of r1_analysis.py: a pool of engines, one model path each ---------------


class EnginePool:
    """Engines by model path, built with `engine` (READY's are used as they are and never closed), each
    sized from `needs` (tokens a sequence may hold, engine_length) unless max_model_len is given. One at
    a time: asking for a new path closes the engines built here, except under torchrun, where closing a
    vLLM engine ends vLLM's process-wide state and torchrun's process group with it: there every engine
    stays up until close() (gpu_memory_utilization 0 splits the default share over them all)."""

    def __init__(self, needs: dict, *, seed: int, dtype: str = "auto", max_model_len: int = 0,
                 gpu_memory_utilization: float = 0.0):
        self.needs, self.owned, self.seed, self.dtype = dict(needs), {}, seed, dtype
        self.max_model_len = max_model_len
        held = len(set(needs) - set(READY)) if utils.is_distributed() else 1  # engines up at once
        self.share = utils.engine_memory_share(gpu_memory_utilization, held)

    def get(self, path: str) -> Sampler:
        if path not in self.owned and path not in READY:
            if not utils.is_distributed():
                self.close()
            had_group = group_exists()
            max_len = self.max_model_len or engine_length(path, self.needs[path])
            self.owned[path] = (engine(path, seed=self.seed, dtype=self.dtype, max_model_len=max_len,
                                       gpu_memory_utilization=self.share), had_group)
        return self.owned[path][0] if path in self.owned else engine(path)

    def close(self) -> None:
        for path in list(self.owned):
            close_engine(*self.owned.pop(path))
        gc.collect()
