"""utils.py: the small shared module of mrt.

Sections: constants and prompts; command line and errors; data I/O; answer grading;
model loading; sampling (vLLM, with a transformers fallback) and in-place weight sync;
distributed training helpers (torchrun, FSDP2, checkpoints); log-probabilities.
Every stage script imports this module and nothing else of the project but toy.py.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

# vLLM runs its engine in this process: weight sync passes tensors, not pickles, and one
# engine per torchrun rank shares the rank's process group.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# --------------------------------------------------------------------------------------
# Constants and prompts
# --------------------------------------------------------------------------------------

BACKTRACK_MARKER = "Wait, this seems off. Let's try something else."
"""Opens the backtrack episode z1 of MRT-B (paper Sec. 6.1, Fig. 4)."""

MU_SUFFIX = "\nTime is up. The answer is \\boxed{"
"""Default forced suffix that steers the meta-prover mu to stop and answer now. The toy
model is pretrained to answer after it; `--mu-suffix` replaces it for other models."""

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(tokenizer, problem: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt for a problem: the tokenizer's chat template (one user turn holding the
    problem and the instruction, generation prompt added) or, for tokenizers without one
    (base models, the toy model), the plain form "Problem: ...\\nSolution:\\n"."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        content = f"{problem}\n\n{instruction}" if instruction else problem
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"Problem: {problem}\nSolution:\n"


# --------------------------------------------------------------------------------------
# Command line and errors
# --------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input (missing file, malformed line, missing field, bad path): reported in one
    line and a non-zero exit by `run_main`, never as a traceback. `every_rank=True` marks an
    error every torchrun rank meets alike: only rank 0 prints it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field)."""
    docs = {}
    with contextlib.suppress(OSError, TypeError, SyntaxError):
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def parse_args(cls, argv: Sequence[str] | None = None):
    """Build an argparse parser from a dataclass of arguments (field docstrings are the
    help texts; bools take true/false) and return the filled dataclass."""
    docs = _field_docs(cls)
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0])
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, type) else eval(f.type, sys.modules[cls.__module__].__dict__)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {default!r})"
        if kind is bool:
            parser.add_argument(flag, type=_str2bool, default=default, nargs="?", const=True, help=help_text)
        elif getattr(kind, "__origin__", None) is list or kind is list:
            item = (getattr(kind, "__args__", None) or (str,))[0]
            parser.add_argument(flag, type=item, nargs="*", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_optional(kind), default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _optional(kind):
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    inner = args[0] if args else kind
    return lambda s: None if s.lower() == "none" else inner(s)


def run_main(fn: Callable, *args, **kwargs):
    """Call fn; a UserError becomes one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if is_main() or not getattr(e, "every_rank", False):  # the same error on every rank: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------
# Data I/O: validated reading, atomic writing
# --------------------------------------------------------------------------------------


def read_records(path: str, fields: Sequence[str] = (), rename: dict[str, str] | None = None) -> list[dict]:
    """Records from a .jsonl or .parquet file. `rename` maps file field names to the names
    the caller wants (e.g. {"question": "problem"}); every name in `fields` (after renaming)
    must be present. Errors name the file and line: `data.jsonl:7: missing field 'answer'`."""
    rename = rename or {}
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        rows = [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: malformed JSON ({e.msg})") from None
                if not isinstance(r, dict):
                    raise UserError(f"{path}:{i}: expected a JSON object, got {type(r).__name__}")
                rows.append((i, r))
    original = {v: k for k, v in rename.items()}  # errors name the field as the file spells it
    out = []
    for i, r in rows:
        r = {rename.get(k, k): v for k, v in r.items()}
        for name in fields:
            if name not in r or r[name] is None:
                raise UserError(f"{path}:{i}: missing field {original.get(name, name)!r}")
        out.append(r)
    return out


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block
    finishes without an exception (nothing half-written is ever left under `path`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Like atomic_path for a folder: fill the yielded folder, then it replaces `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=".old-")
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


class JsonlLogger:
    """Appends one JSON line per call (metrics as they come), on rank 0 only. With
    resume_step, lines of steps after it (written by a run killed later) are dropped."""

    def __init__(self, path: str | None, resume_step: int | None = None):
        self.path = path if (path and is_main()) else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if resume_step is None or not os.path.exists(self.path):
                open(self.path, "w").close()
            else:
                keep = [l for l in open(self.path) if _step_of(l) is not None and _step_of(l) <= resume_step]
                with atomic_path(self.path) as tmp, open(tmp, "w") as f:
                    f.writelines(keep)

    def log(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int | None:
    """The "step" of a metrics line (0 if it has none); None for a blank or cut line."""
    try:
        return json.loads(line).get("step", 0) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None


# --------------------------------------------------------------------------------------
# Answer extraction and grading
# --------------------------------------------------------------------------------------


def extract_boxed(text: str | None) -> str | None:
    """Content of the last complete \\boxed{...} (or \\fbox{...}) in text, nested braces
    handled. An unterminated last box gives None, never an earlier box."""
    if not text:
        return None
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start, depth = starts[-1], 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None


_GOLD_WARNED: set[str] = set()
_GRADE_POOL = None
_GRADE_POOL_LOCK = threading.Lock()


def _normalize(s: str) -> str:
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,!;: ]|\s+|\$", "", s)
    return s.rstrip(".").lower()


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return False
    return depth == 0


def _math_equal(pred: str, gold: str, timeout: int | None) -> bool | None:
    """math-verify equivalence of two answers (gold first: `verify` is asymmetric).
    None when the gold answer does not parse as math."""
    from math_verify import LatexExtractionConfig, ExprExtractionConfig, parse, verify

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    g = parse(f"${gold}$", extraction_config=cfg, parsing_timeout=timeout)
    if not g:
        return None
    p = parse(f"${pred}$", extraction_config=cfg, parsing_timeout=timeout)
    return bool(p) and bool(verify(g, p, timeout_seconds=timeout))


def _math_equal_worker(pred, gold):  # runs in the grading subprocess (its main thread)
    return _math_equal(pred, gold, timeout=None)


def _math_equal_with_timeout(pred: str, gold: str, timeout: float) -> bool | None:
    """math-verify's own timeout uses SIGALRM, which works only on a main thread. Off the
    main thread, the comparison runs in a spawned subprocess that is killed on timeout.
    Calls are serialised (one worker) and the worker is warmed up before the clock starts,
    so neither its start-up nor another thread's slow comparison eats this one's timeout."""
    global _GRADE_POOL
    if threading.current_thread() is threading.main_thread():
        return _math_equal(pred, gold, timeout=max(1, int(math.ceil(timeout))))
    import concurrent.futures as cf
    import multiprocessing as mp

    with _GRADE_POOL_LOCK:
        if _GRADE_POOL is None:
            _GRADE_POOL = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))
            atexit.register(_GRADE_POOL.shutdown)
            _GRADE_POOL.submit(_math_equal_worker, "1", "1").result()  # imports math-verify there
        try:
            return _GRADE_POOL.submit(_math_equal_worker, pred, gold).result(timeout=timeout)
        except cf.TimeoutError:
            for p in list(getattr(_GRADE_POOL, "_processes", {}).values()):
                p.kill()
            _GRADE_POOL.shutdown(wait=True, cancel_futures=True)  # quick: its worker is dead
            _GRADE_POOL = None
            return False


def grade(text: str | None, gold: str, timeout: float = 5.0) -> float:
    """1.0 if the last \\boxed{} answer of `text` equals `gold`, else 0.0. Never raises.

    Order: no box -> 0. A gold answer that is empty or has unbalanced braces is reported
    (a warning once per gold) and never rewarded. Exact match after light normalisation
    (spaces, \\text{}, $, case) -> 1; this is the fallback for non-math answers. Otherwise
    math-verify decides (so \\frac{1}{2} equals 0.5), under `timeout` seconds. Pass the
    completion only: text from the prompt must never earn credit."""
    pred = extract_boxed(text)
    if pred is None:
        return 0.0
    gold = "" if gold is None else str(gold).strip()
    if not gold or not _balanced(gold):
        _warn_gold(gold)
        return 0.0
    if _normalize(pred) == _normalize(gold):
        return 1.0
    try:
        same = _math_equal_with_timeout(pred, gold, timeout)
    except Exception:  # math-verify on garbage: any failure is a wrong answer, not a crash
        return 0.0
    if same is None:
        _warn_gold(gold)
    return 1.0 if same else 0.0


def _warn_gold(gold: str) -> None:
    if gold not in _GOLD_WARNED:
        _GOLD_WARNED.add(gold)
        print(f"warning: gold answer {gold!r} does not parse; never rewarded", file=sys.stderr)


# --------------------------------------------------------------------------------------
# Model and tokenizer loading
# --------------------------------------------------------------------------------------


def _check_model_path(path: str) -> None:
    """A local folder must exist; a bare hub name ("org/name") is left to the hub. A name
    whose first part is a local folder (e.g. "runs/base") is a local path, not a hub name."""
    if os.path.isdir(os.path.expanduser(path)):
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise UserError(f"{path}: not a model folder (no config.json)")
        return
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) and not os.path.isdir(path.split("/")[0]):
        return
    raise UserError(f"model path does not exist: {path}")


@contextlib.contextmanager
def _loading(path: str):
    """A model folder or hub name that transformers cannot load becomes a one-line error."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path}: {str(e).strip().splitlines()[0]}") from e


def load_tokenizer(path: str):
    """Tokenizer with a pad token (eos if it has none: masks never come from pad ids)."""
    from transformers import AutoTokenizer

    _check_model_path(path)
    with _loading(path):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str, device: str):
    """'auto' is bfloat16 on GPU, float32 on CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]


def load_model(path: str, dtype: str = "auto", device: str | None = None):
    """Any Hugging Face causal LM by local path or hub name, on `device` (default: this
    rank's device), in `dtype` ('auto': bf16 on GPU, fp32 on CPU)."""
    from transformers import AutoModelForCausalLM

    _check_model_path(path)
    device = device or default_device()
    with _loading(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device))
    return model.to(device)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


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
    state whenever an engine shuts down, which breaks any other engine still in use."""

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
        self.model_path = model
        _check_model_path(model)
        self.sleep_mode, self.asleep = False, False
        self.tokenizer = load_tokenizer(model)
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

            engine_seed = seed + rank() // engine_kwargs.get("tensor_parallel_size", 1)  # TP ranks share one
            kwargs = dict(seed=engine_seed, dtype=dtype if dtype != "auto" else ("bfloat16" if _has_cuda() else "float32"),
                          enable_prefix_caching=enable_prefix_caching, logprobs_mode="processed_logprobs",
                          gpu_memory_utilization=gpu_memory_utilization)
            if max_model_len:
                kwargs["max_model_len"] = max_model_len
            if not _has_cuda() and "OMP_NUM_THREADS" not in os.environ:
                # vLLM means to serve with one torch thread on CPU (its spinning OpenMP
                # workers cost far more than they give; measured 5-60x slower on 2 shared
                # cores), but 0.32 blocks its own set_num_threads call: set it first.
                import torch

                torch.set_num_threads(1)
            if not _has_cuda():
                # vLLM 0.32 on CPU fails on seeded requests that are prefilled in chunks
                # ("CPU Generator does not use offset"): prefill each prompt whole.
                kwargs["enable_chunked_prefill"] = False
            if os.environ.get("MRT_VLLM_EAGER") == "1":  # faster start, slower decode (tests)
                kwargs["enforce_eager"] = True
            if is_distributed():
                kwargs["distributed_executor_backend"] = "external_launcher"
            if self.sleep_mode:
                kwargs["enable_sleep_mode"] = True
            kwargs.update(engine_kwargs)
            try:
                self.llm = LLM(model, **kwargs)
            except (ValueError, RuntimeError, MemoryError) as e:  # vLLM's reasons: too little memory, bad sizes
                reason = " ".join(str(e).split()) or type(e).__name__
                raise UserError(f"vLLM engine for {model} could not start: {reason}; lower the run's --max-* lengths "
                                f"(max_model_len {kwargs.get('max_model_len', 'the model')}), or raise VLLM_CPU_KVCACHE_SPACE (CPU) / "
                                f"--gpu-memory-utilization (GPU)", every_rank=True) from e
        else:
            self.model = load_model(model, dtype)
            self.model.eval()

    # -- generation --------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | list[int]], n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: list[str] | None = None,
                 seed: int | None = None, logprobs: bool = True, use_tqdm: bool = False) -> list[list[Sample]]:
        """n samples for each prompt (a string, or token ids used as they are). Returns one
        list of n Samples per prompt, in order. With a seed, results are reproducible."""
        if not prompts:
            return []
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
                                     seed=seed * 1_000_003 + i * n, logprobs=0 if logprobs else None)
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
                torch.manual_seed(seed * 1_000_003 + i * n)
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

    def sleep(self) -> None:
        """Level-1 sleep: the engine's weights go to CPU memory and its KV cache is freed, so
        a training step has the GPU. No-op without sleep mode."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        """Back on the GPU (weights and KV cache); call before sync_weights and sampling."""
        if self.sleep_mode and self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # -- weights -----------------------------------------------------------------------

    def sync_weights(self, model) -> None:
        """Push a trainer model's current weights (plain or FSDP2-sharded) into this
        sampler in place: no restart, no disk round trip. Then reset the prefix cache, since
        KV blocks computed with the old weights would otherwise be reused. Under torchrun,
        every rank must call this (shards are gathered parameter by parameter)."""
        if self.backend == "vllm":
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter_full_params(model)})
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        else:
            self.model.load_state_dict(dict(iter_full_params(model)))


def sync_weights(sampler: Sampler, model) -> None:
    """Module-level alias of `Sampler.sync_weights`."""
    sampler.sync_weights(model)


def update_asleep(sampler: Sampler, update: Callable[[], Any], model=None):
    """One training update with the engine asleep: sampler.sleep(), update(), wake_up(),
    then the new weights of `model` (default: what update() returns) go into the engine.
    Returns update()'s result. The engine wakes up even if the update raises. A sampler
    without sleep mode (or a stand-in without sleep/wake_up) is only synced."""
    sleeps = getattr(sampler, "sleep_mode", False)
    if sleeps:
        sampler.sleep()
    try:
        result = update()
    finally:
        if sleeps:
            sampler.wake_up()
    sampler.sync_weights(result if model is None else model)
    return result


def resolve_sleep_mode(value: str | bool) -> bool:
    """--sleep-mode auto|on|off (or a bool) -> whether the vLLM engine runs with sleep mode:
    auto is on with CUDA, off without (vLLM 0.32's CPU build rejects it)."""
    if isinstance(value, bool):
        on = value
    elif str(value).lower() in ("auto", "on", "off", "true", "false"):
        v = str(value).lower()
        on = _has_cuda() if v == "auto" else v in ("on", "true")
    else:
        raise UserError(f"--sleep-mode must be auto, on or off, got {value!r}")
    if on and not _has_cuda():
        raise UserError("--sleep-mode on needs vLLM on CUDA: vLLM's CPU build has no sleep mode (use auto or off)")
    return on


def engine_length(model: str, need: int) -> int:
    """max_model_len for an engine on `model` whose sequences hold at most `need` tokens:
    `need`, capped at the model's max_position_embeddings (vLLM refuses more). Never the
    model's whole context when the run needs less (a 1M-position config would ask the KV
    cache for 1M tokens per sequence)."""
    from transformers import AutoConfig

    with _loading(model):
        cfg = AutoConfig.from_pretrained(model)
    limit = getattr(cfg, "max_position_embeddings", None) or need
    return int(max(1, min(need, limit)))


# --------------------------------------------------------------------------------------
# Distributed training helpers
# --------------------------------------------------------------------------------------


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def is_distributed() -> bool:
    """True under torchrun with more than one process. (A vLLM engine in a plain process
    starts a process group of one: that is not distributed training.)"""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def default_device() -> str:
    if _has_cuda():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def init_distributed() -> tuple[int, int, str]:
    """Start the process group when run under torchrun (nccl on GPU, gloo on CPU).
    Returns (rank, world_size, device); a plain `python` run is rank 0 of 1."""
    import torch
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if _has_cuda():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if _has_cuda() else "gloo")
    return rank(), world_size(), default_device()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def decoder_layers(model):
    """The list of decoder blocks of a Hugging Face causal LM."""
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        with contextlib.suppress(AttributeError):
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def shard_model(model, activation_checkpointing: bool = False, mixed_precision: bool = False):
    """FSDP2: `fully_shard` each decoder layer, then the root. With one process (no
    process group) the model is returned as it is. Activation checkpointing wraps each
    layer first (recompute in backward, to trade compute for memory)."""
    import torch

    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not is_distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kw = {"mp_policy": mp} if mp else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def iter_full_params(model):
    """(name, full tensor) for each entry of the model's state dict, gathering FSDP2
    shards one parameter at a time (every rank must iterate, in the same order)."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def full_state_dict(model, cpu: bool = True) -> dict:
    """The full (unsharded) model state dict, on every rank. With cpu=True, a copy: later
    training steps do not change it (with or without FSDP)."""
    return {k: (v.to("cpu", copy=True) if cpu else v) for k, v in iter_full_params(model)}


def save_pretrained(model, tokenizer, path: str) -> None:
    """Save a Hugging Face checkpoint (gathered from shards) atomically; rank 0 writes."""
    sd = full_state_dict(model)
    if is_main():
        with atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=sd)
            tokenizer.save_pretrained(tmp)
    barrier()


def barrier() -> None:
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if _has_cuda():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and _has_cuda():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, **extra) -> None:
    """Model, optimizer and scheduler states (gathered to full tensors), every rank's RNG
    states and `extra` (step, data position, ...) into one file, written atomically."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=opts)
    else:
        msd, osd = get_state_dict(model, [], options=opts)[0], None
    rngs = [None] * world_size()
    if is_distributed():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if is_main():
        blob = {"model": msd, "optimizer": osd, "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": rngs, "world_size": world_size(), **extra}
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)
    barrier()


def load_checkpoint(path: str, model, optimizer=None, scheduler=None) -> dict:
    """Restore what save_checkpoint wrote (into a plain or FSDP2 model) and return the
    extra fields. RNG states are restored per rank when the world size matches."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=blob["model"],
                   optim_state_dict=blob["optimizer"] if optimizer is not None else {}, options=opts)
    if scheduler is not None and blob["scheduler"] is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if blob["world_size"] == world_size():
        set_rng_state(blob["rng"][rank()])
    return {k: v for k, v in blob.items() if k not in ("model", "optimizer", "scheduler", "rng")}


# --------------------------------------------------------------------------------------
# Log-probabilities of completions under a trainer model
# --------------------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False):
    """(B, T) long tensor of padded ids and the (B, T) attention mask of real tokens."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probability of each next token, logits divided by the sampling temperature.
    Returns (B, T-1) log p(input_ids[:, t+1] | input_ids[:, :t+1]) and, if asked, the
    (B, T-1) entropy of each next-token distribution."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (B, T-1, V)
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)  # (B, T-1, V)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, T-1)
    return logp, entropy
