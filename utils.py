"""utils.py: the small shared module of mrt.

Sections: constants and prompts; command line and errors; data I/O (records, problems,
atomic writes); answer grading; model loading; sampling (vLLM, with a transformers fallback)
and in-place weight sync; distributed training helpers (torchrun, FSDP2, checkpoints,
seeds); log-probabilities.

The module graph, on purpose: utils.py imports nothing of the project (toy.py only inside
`default_model`). toy.py (the embedded task and model) imports utils. Each stage script
imports utils and toy, plus the one stage whose algorithm it builds on: grpo.py and star.py
import infogain.py (episodes, the meta-prover, information gain: the method's core), star.py
imports warmstart.py (the SFT loop it reruns each iteration), r1_analysis.py imports
evaluate.py and infogain.py (pass@k/maj@k and episode values), study.py runs them all.
A helper that two stages need lives here, never in a second copy.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import dataclasses
import functools
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
import warnings
from dataclasses import dataclass
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
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def parse_args(cls, argv: Sequence[str] | None = None):
    """The filled dataclass `cls` from the command line, through transformers'
    `HfArgumentParser` (argparse: `--flag-name` or `--flag_name`; bools take `--flag`,
    `--flag false` or `--no-flag`; errors are argparse's one `error:` line). The help texts
    are the attribute docstrings under each field, as cleanrl writes them: HfArgumentParser
    reads help only from field metadata, so the fields are handed to it with that metadata."""
    import typing

    from transformers import HfArgumentParser

    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                      metadata={"help": docs.get(f.name, "").replace("%", "%%")}))
            for f in dataclasses.fields(cls)]
    parser = HfArgumentParser(dataclasses.make_dataclass(cls.__name__, spec),
                              description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0])
    return cls(**vars(parser.parse_args(argv)))


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


def read_records(path: str, fields: Sequence[str] = (), rename: dict[str, str] | None = None,
                 with_lines: bool = False) -> list:
    """Records from a .jsonl or .parquet file. `rename` maps file field names to the names
    the caller wants (e.g. {"question": "problem"}); every name in `fields` (after renaming)
    must be present. Errors name the file and line: `data.jsonl:7: missing field 'answer'`,
    `data.jsonl:3: not UTF-8`. With `with_lines`, (line, record) pairs (a Parquet row's
    "line" is its row number, from 1). A path that is no local file but reads as a hub
    dataset, "org/name" or "org/name:split" (default split: train), is loaded through the
    optional `datasets` package (e.g. --train-data AI-MO/NuminaMath-CoT:train)."""
    rename = rename or {}
    if not os.path.isfile(path) and hub_dataset(path):
        rows = _hub_rows(path)
    elif not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        rows = [(i + 1, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = []
        with open(path, "rb") as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{i}: not UTF-8") from None
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
        out.append((i, r) if with_lines else r)
    return out


def hub_dataset(path: str) -> tuple[str, str] | None:
    """(name, split) when `path` names a hub dataset ("org/name[:split]"): two parts, the
    first no local folder, no data-file ending. None for anything that reads as a local path."""
    name, _, split = path.partition(":")
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name) or os.path.isdir(name.split("/")[0]):
        return None
    if name.endswith((".jsonl", ".json", ".parquet")):
        return None
    return name, split or "train"


def _hub_rows(path: str) -> list[tuple[int, dict]]:
    name, split = hub_dataset(path)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: no such file, and reading it as a hub dataset needs the datasets package "
                        f"(pip install datasets)") from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as e:  # hub, network and split errors come as many types; each is one line here
        raise UserError(f"{path}: cannot load hub dataset {name!r} split {split!r}: "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    return [(i + 1, dict(r)) for i, r in enumerate(table)]


def check_answer(answer, where: str) -> str:
    """A gold answer as a stripped string; one that grading could never match (empty, or
    braces that do not balance inside \\boxed{}) is a UserError naming `where`."""
    answer = str(answer).strip()
    if not answer or extract_boxed("\\boxed{" + answer + "}") != answer:
        raise UserError(f"{where}: unparsable answer {answer!r}")
    return answer


def load_problems(path: str, problem_field: str = "problem", answer_field: str = "answer", limit: int = 0,
                  tokenizer=None, instruction: str = DEFAULT_INSTRUCTION, max_prompt_tokens: int | None = None,
                  too_long: str = "") -> list[dict]:
    """The problems of a data file as {id, problem, answer} (id: the record's index), the
    first `limit` of them (0: all); every stage reads its problems here. Answers are checked
    (check_answer). With a tokenizer, each also gets its `prompt` (build_prompt) and, with
    `max_prompt_tokens`, problems whose prompt is longer are dropped and counted; `too_long`
    says in the error what to change when none is left."""
    rows = read_records(path, [problem_field, answer_field], with_lines=True)
    if not rows:
        raise UserError(f"{path}: holds no problems")
    rows = rows[:limit] if limit else rows
    out = [{"id": i, "problem": str(r[problem_field]), "answer": check_answer(r[answer_field], f"{path}:{line}")}
           for i, (line, r) in enumerate(rows)]
    if tokenizer is None:
        return out
    for p in out:
        p["prompt"] = build_prompt(tokenizer, p["problem"], instruction)
        p["prompt_tokens"] = len(encode(tokenizer, p["prompt"]))
    if max_prompt_tokens is None:
        return out
    fit = [p for p in out if p["prompt_tokens"] <= max_prompt_tokens]
    if not fit:
        raise UserError(f"{path}: no problem's prompt fits in {max_prompt_tokens} tokens{'; ' + too_long if too_long else ''}")
    if len(fit) < len(out):
        print0(f"{path}: dropped {len(out) - len(fit)} problems whose prompt is longer than {max_prompt_tokens} tokens")
    return fit


def encode(tokenizer, text: str) -> list[int]:
    """Token ids as the engine sees the text: special tokens added, except a second BOS
    when the text (a chat template) already starts with one."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def model_format(path: str) -> str:
    """"backtrack" or "direct": the trace format a model was trained on, from <model>/mrt.json
    (written by warmstart.py, star.py, grpo.py); a model without a card (a base or hub model)
    is direct. A malformed card is a UserError."""
    card = os.path.join(path, "mrt.json")
    if not os.path.isfile(card):
        return "direct"
    try:
        fmt = json.load(open(card)).get("format", "direct")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{card}: malformed model card ({e})") from None
    if fmt not in ("backtrack", "direct"):
        raise UserError(f"{card}: format must be 'backtrack' or 'direct', got {fmt!r}")
    return fmt


def default_model() -> tuple[str, dict]:
    """The embedded default of the stages that train: runs/warmstart/model if it exists,
    else the toy base (built if missing); and the toy's paths (toy.paths)."""
    import toy

    paths = toy.ensure_built()
    return ("runs/warmstart/model" if os.path.isdir("runs/warmstart/model") else paths["base"]), paths


def derive_seed(seed: int, *parts) -> int:
    """The seed of one use of a run's seed (e.g. derive_seed(seed, "z0", "train", rank)):
    the same for the same parts on every machine, unrelated for different parts, below 2**31.
    Every stage derives its sampling and data-order seeds here, never by magic offsets."""
    import hashlib

    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


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


REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
"""Live-metrics backends of --report-to (optional packages, imported only when asked for)."""


class JsonlLogger:
    """Appends one JSON line per call (metrics as they come), on rank 0 only. With
    resume_step, lines of steps after it (written by a run killed later) are dropped.
    With report_to (tensorboard, wandb or trackio), the numeric fields of each record also go
    to that live dashboard, at the record's "step", under the run name `name`."""

    def __init__(self, path: str | None, resume_step: int | None = None, report_to: str = "none",
                 name: str = "", config: dict | None = None):
        self.path = path if (path and is_main()) else None
        self.tracker = _open_tracker(report_to, name or os.path.basename(os.path.dirname(os.path.abspath(path or "."))),
                                     os.path.dirname(os.path.abspath(path or ".")), config or {}) if is_main() else None
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
        if self.tracker:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.tracker(numbers, numbers.pop("step", None))


def _open_tracker(report_to: str, name: str, folder: str, config: dict):
    """A function (metrics, step) -> None that sends metrics to the --report-to backend, or
    None for "none". A backend that is not installed is a UserError naming the package."""
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return None
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}[report_to]
    try:
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(folder, "tensorboard"))
            atexit.register(writer.close)
            return lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()] and writer.flush()
        tracker = __import__(package)
    except ImportError:
        raise UserError(f"--report-to {report_to} needs the {package} package (pip install {package})") from None
    tracker.init(project="mrt", name=name, config=config)
    atexit.register(tracker.finish)
    return lambda m, step: tracker.log(m, step=step) if step is not None else tracker.log(m)


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

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name not in names:
        raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    return names[name]


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
        self.model_path, self.dtype = model, dtype
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
            vllm_dtype = str(torch_dtype(dtype, default_device())).removeprefix("torch.")  # bf16 -> bfloat16
            kwargs = dict(seed=engine_seed, dtype=vllm_dtype,
                          enable_prefix_caching=enable_prefix_caching, logprobs_mode="processed_logprobs",
                          gpu_memory_utilization=gpu_memory_utilization)
            if max_model_len:
                kwargs["max_model_len"] = max_model_len
            if not _has_cuda() and "OMP_NUM_THREADS" not in os.environ:
                # vLLM means to serve with one torch thread on CPU (its spinning OpenMP
                # workers cost far more than they give on a shared CPU), but 0.32 blocks its
                # own set_num_threads call: set it first.
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
                 seed: int | Sequence[int] | None = None, logprobs: bool = True,
                 use_tqdm: bool = False) -> list[list[Sample]]:
        """n samples for each prompt (a string, or token ids used as they are). Returns one
        list of n Samples per prompt, in order. With a seed, results are reproducible: an int
        seeds each prompt by its position in this call; a list gives each prompt its own seed
        (so a prompt's samples do not depend on which other prompts share the call or rank)."""
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
            weights = iter_full_params(model, torch_dtype(self.dtype, default_device()))  # in the engine's dtype
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache after a weight sync")
        else:
            self.model.load_state_dict(dict(iter_full_params(model)))


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


def all_gather(obj) -> list:
    """Every rank's picklable object, in rank order (a list of one object in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True when the flag is true on any rank (so that every rank loops the same number of times)."""
    return any(all_gather(bool(flag)))


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
    if not is_distributed():
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

    The weights are read from disk once: in one process, by this process (the reference is a
    copy); under torchrun, by rank 0 only (`_weights_of`: rows read from the safetensors
    files when needed), while every rank builds the model on the meta device and shards it;
    rank 0 sends each rank its rows of each tensor, cast to fp32, a piece at a time
    (`_scatter_from_rank0`). No rank ever holds a full copy, not even of one tensor: each
    holds its shards, rank 0 also one piece in flight."""
    import copy

    import torch
    from transformers import AutoConfig

    _check_model_path(path)
    device = device or default_device()
    compute = torch_dtype(dtype, device)
    with _loading(path):
        cfg = AutoConfig.from_pretrained(path)
    save_dtype = getattr(cfg, "dtype", None) or torch.float32
    save_dtype = torch_dtype(save_dtype, "cpu") if isinstance(save_dtype, str) else save_dtype
    if not is_distributed():
        model = load_model(path, "fp32", device)
        ref = copy.deepcopy(model) if reference else None
        models = [shard_model(model, gradient_checkpointing, compute)]
        if ref is not None:
            models.append(shard_model(ref, False, compute))
    else:
        models = [_sharded_on_meta(path, cfg, device, gradient_checkpointing and k == 0, compute)
                  for k in range(2 if reference else 1)]
        entries = [dict(_state_entries(m)) for m in models]
        weights = _weights_of(path, list(entries[0])) if is_main() else None
        for name in entries[0]:
            full = weights(name) if weights is not None else None  # rank 0: the whole tensor, from disk
            for e in entries:
                _scatter_from_rank0(e[name], full)
            del full
    for m in models:
        m.save_dtype = save_dtype
    model, ref = models[0], (models[1].eval().requires_grad_(False) if reference else None)
    return model, ref


def _sharded_on_meta(path: str, cfg, device: str, activation_checkpointing: bool, compute_dtype):
    """The model built on the meta device (no memory), sharded with FSDP2, then given
    uninitialized storage for its shards on `device`. Its non-persistent buffers (the rotary
    frequencies, computed from the config, never in a checkpoint) are computed here by
    transformers' own initializer of the module that holds them; the parameters and persistent
    buffers are left for load_trainer to fill."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    shard_model(model, activation_checkpointing, compute_dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)
    return model


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

        with _loading(path):
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
    print0(f"load: {path}: weights not in safetensors under the model's own names; rank 0 loads the model whole")
    whole = load_model(path, "fp32", "cpu").state_dict()
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
    n, world = t.shape[0], world_size()
    c = -(-n // world)
    rows = [(k * c, max(0, min(c, n - k * c))) for k in range(world)]
    if t.to_local().shape[0] != rows[rank()][1]:
        raise RuntimeError(f"shard of {t.to_local().shape[0]} rows on rank {rank()}, expected {rows[rank()][1]}")
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
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        if full is not None:
            target.data.copy_(full[:] if target.dim() else full)
        dist.broadcast(target.data, src=0)
        return
    local = target.to_local().data  # this rank's rows, a view of its shard
    if not local.is_contiguous():
        raise RuntimeError("expected a contiguous FSDP2 shard")
    for k, (start, count) in enumerate(_dim0_rows(target)):
        if k != rank() and not is_main():
            continue
        for a, m in _pieces(start, count, target):
            mine = local[a - start:a - start + m]  # (m, ...) rows a.. of the full tensor, in rank k's shard
            if is_main():
                piece = full[a:a + m].to(local.device, target.dtype)  # (m, ...)
                if k == 0:
                    mine.copy_(piece)
                else:
                    dist.send(piece.contiguous(), dst=k)
                del piece
            else:
                dist.recv(mine, src=0)


def _gather_to_rank0(t, dtype=None):
    """The full tensor of a state-dict entry on rank 0, in `dtype` (default: its own), None
    elsewhere: each rank sends its dim-0 rows (as in _scatter_from_rank0) to rank 0 only, a
    piece at a time, which casts each into place: no other rank holds more than its shard;
    rank 0 holds the full tensor in `dtype` plus one piece."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    local = t.to_local().detach() if isinstance(t, DTensor) else t.detach()
    dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
    if not isinstance(t, DTensor):
        return local.to("cpu", dtype, copy=True) if is_main() else None
    full = torch.empty(t.shape, dtype=dtype, device="cpu") if is_main() else None  # (n, ...)
    for k, (start, count) in enumerate(_dim0_rows(t)):
        if k != rank() and not is_main():
            continue
        for a, m in _pieces(start, count, t):
            if not is_main():
                dist.send(local[a - start:a - start + m].contiguous(), dst=0)
            elif k == 0:
                full[a:a + m] = local[a - start:a - start + m].to("cpu", dtype)
            else:
                piece = torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=local.device)  # (m, ...)
                dist.recv(piece, src=k)
                full[a:a + m] = piece.to("cpu", dtype)
                del piece
    return full


def iter_full_params(model, dtype=None):
    """(name, full tensor) for each entry of the model's state dict, gathering FSDP2
    shards one parameter at a time (every rank must iterate, in the same order); floating
    tensors cast to `dtype` when given (e.g. fp32 master weights into a bf16 engine)."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        t = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
        yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)


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
        tmp = stack.enter_context(atomic_dir(path)) if is_main() else None
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
        if is_main():
            if shard:
                flush()
            names = ["model.safetensors"] if len(files) == 1 else \
                [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
            for (old, _), new in zip(files, names):
                os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
            if len(files) > 1:
                weight_map = {k: new for (_, keys), new in zip(files, names) for k in keys}
                write_json(os.path.join(tmp, "model.safetensors.index.json"),
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
            cfg = copy.deepcopy(model.config)  # the parameters are fp32 masters: name the saved dtype
            cfg.dtype = save_dtype
            cfg.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
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
    if is_main():
        os.makedirs(path, exist_ok=True)
        done = [int(f[5:]) for f in os.listdir(path) if re.fullmatch(r"save-\d+", f)]
        n = [max(done, default=0) + 1]
        tmp = os.path.join(path, f".tmp-{n[0]}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if is_distributed():
        dist.broadcast_object_list(n, src=0)
    tmp, final = os.path.join(path, f".tmp-{n[0]}"), os.path.join(path, f"save-{n[0]}")
    state = {"model": msd} if optimizer is None else {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank()}.pt"))
    if is_main():
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "world_size": world_size(),
                    "extra": extra}, os.path.join(tmp, "state.pt"))
    barrier()
    if is_main():
        os.replace(tmp, final)
        with atomic_path(os.path.join(path, "latest")) as t, open(t, "w") as f:
            f.write(os.path.basename(final) + "\n")
        for f in os.listdir(path):  # older saves and leftovers of killed ones
            if f not in ("latest", os.path.basename(final)) and (f.startswith("save-") or f.startswith(".tmp-")):
                shutil.rmtree(os.path.join(path, f), ignore_errors=True)
    barrier()


def checkpoint_extra(path: str) -> dict:
    """The `extra` fields and world size of the last complete checkpoint under `path`."""
    import torch

    d = _latest_checkpoint(path)
    if d is None:
        raise UserError(f"{path}: no complete checkpoint")
    meta = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    return {**meta["extra"], "world_size": meta["world_size"]}


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
        raise UserError(f"{path}: no complete checkpoint")
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
    if meta["world_size"] == world_size():
        set_rng_state(torch.load(os.path.join(d, f"rng-{rank()}.pt"), weights_only=False))
    return {**meta["extra"], "world_size": meta["world_size"]}


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
    z[target] - logsumexp(z) over chunks of `chunk` positions (default: about 2^20 logits
    per chunk, 8 positions at a vocabulary of 128,256), so neither the forward nor
    the backward pass holds an fp32 (B, T, V) log-softmax: the backward recomputes softmax
    per chunk from the saved logits and writes the gradient in the logits' dtype. With
    inplace=True the backward writes that gradient into the logits tensor itself (no second
    (B, T, V) tensor): only for logits nobody reads after the backward pass."""
    chunk = chunk or _chunk_positions(logits.shape[-1])
    return _sampled_logprob_fn().apply(logits, targets, float(temperature), int(chunk), bool(inplace))


def _chunk_positions(vocab: int) -> int:
    """Positions per chunk of the log-prob loops: about 2^20 logits (4 MiB in fp32). Small
    chunks matter on CPU: the allocator keeps freed chunk buffers, so the peak grows with them."""
    return max(1, (1 << 20) // vocab)


def token_entropy(logits, T: int, temperature: float = 1.0, chunk: int | None = None):
    """(B, T) entropy of softmax(logits[:, t] / temperature) for t < T, in fp32 chunks of
    `chunk` positions (default as in sampled_logprobs), without gradient."""
    import torch

    chunk = chunk or _chunk_positions(logits.shape[-1])
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
