"""utils.py: the small shared module of mrt: what every script needs.

Sections: constants and prompts; command line and errors (`DataArgs`: the flags every stage shares;
`parse_args`, `check_flags`); data I/O (records, problems,
atomic writes, metrics logs); answer grading; model and tokenizer loading; the process group
(torchrun ranks, rank-0 printing, gathering objects, seeds).

The module graph, on purpose: utils.py imports nothing of the project, not even inside a
function. Two shared modules sit on it, one per seam a stage script crosses:
sampling.py (the vLLM Sampler and in-place weight sync) and training.py (the FSDP2 trainer
model: sharded load and export, checkpoints, log-probabilities), used by the stages that
train. toy.py (the embedded task) imports utils; toy_pretrain.py (its build) imports toy,
sampling and utils. A stage script imports those it uses, and from another stage only pure
functions: warmstart.py, star.py and grpo.py take infogain.py's episodes and gain, r1_analysis.py
evaluate.py's maj@k and regret (tests/test_toy.py checks it); study.py runs them all as
commands and aggregates with evaluate.py's curve functions. A helper that two scripts need
lives in one of the three shared modules, never in a second copy.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import random
import re
import shutil
import sys
import tempfile
import textwrap
import threading
from typing import Any, Callable, Iterable, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ---- Constants and prompts -----------------------------------------------------------

BACKTRACK_MARKER = "Wait, this seems off. Let's try something else."
"""Opens the backtrack episode z1 of MRT-B (paper Sec. 6.1, Fig. 4)."""

BACKTRACK_CUE = "\n" + BACKTRACK_MARKER + "\nStep"
"""What follows an attempt when the policy is to backtrack (RL, STaR, linearized evaluation): the
marker and "Step", so the model writes " k: ..." (the restart) and the revised attempt."""

MU_SUFFIX = "\nTime is up. The answer is \\boxed{"
"""Default forced suffix that steers the meta-prover mu to stop and answer now. The toy
model is pretrained to answer after it; `--mu-suffix` replaces it for other models."""

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(tokenizer, problem: str, instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The prompt for a problem: the tokenizer's chat template (one user turn holding the
    problem and the instruction, DEFAULT_INSTRUCTION when None; generation prompt added) or,
    for tokenizers without one (base models, the toy model), the plain form
    "Problem: ...\\nSolution:\\n"."""
    instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        content = f"{problem}\n\n{instruction}" if instruction else problem
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return f"Problem: {problem}\nSolution:\n"


# ---- Command line and errors ---------------------------------------------------------


class UserError(Exception):
    """Bad input (missing file, malformed line, missing field, bad path): reported in one
    line and a non-zero exit by `run_main`, never as a traceback. `every_rank=True` marks an
    error every torchrun rank meets alike: only rank 0 prints it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


@dataclasses.dataclass
class DataArgs:
    """Flags of every stage: how a data record is read and graded, the prompt's instruction, the
    compute dtype. A stage's `Args` lists its own flags and names the groups it inherits (this one;
    training.TrainerArgs, sampling.MuArgs): one spelling and one help text per flag everywhere."""

    problem_field: str = "problem"
    """field of a data record holding the problem text"""
    answer_field: str = "answer"
    """field of a data record holding the gold answer"""
    answer_from: str = ""
    """field of a worked solution whose last \\boxed{} is the gold answer (e.g. solution, NuminaMath style;
    --answer-field is then not read); empty: --answer-field as is"""
    instruction: str | None = None
    """user-turn instruction of a chat-template model (default: the one in the model's mrt.json when this
    project wrote it, else the standard one)"""
    reward: str = ""
    """custom reward, module:function or path/to/file.py:function: (completion text, gold answer, problem
    record) -> float in [0, 1], replacing the math-verify grader at every grading site, the meta-prover's
    included (empty: utils.grade)"""
    dtype: str = "auto"
    """compute dtype of the model and its vLLM engine: auto (bf16 on a GPU with bf16, else fp16; fp32 on
    CPU) | bf16 | fp16 | fp32; a trainer's weights and optimizer state stay fp32"""


def check_flags(args, choices: dict | None = None, at_least: dict | None = None, why: dict | None = None):
    """A one-line UserError for the first field of `args` whose value is not in `choices[name]` ("--loss-type
    must be one of (...), got 'sum'") or is below `at_least[name]` ("--steps must be at least 1, got 0", with
    `why[name]` after the bound)."""
    flag, why = (lambda name: "--" + name.replace("_", "-")), why or {}
    for name, allowed in (choices or {}).items():
        if getattr(args, name) not in allowed:
            raise UserError(f"{flag(name)} must be one of {tuple(allowed)}, got {getattr(args, name)!r}")
    for name, least in (at_least or {}).items():
        if getattr(args, name) < least:
            raise UserError(f"{flag(name)} must be at least {least}{why.get(name, '')}, got {getattr(args, name)}")


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), its bases' included
    (a field a class declares again takes that class's)."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        with contextlib.suppress(OSError, TypeError, SyntaxError):
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
            for node, nxt in zip(body, body[1:]):
                if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                        and isinstance(nxt.value, ast.Constant)):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _declared_by(cls, name: str) -> int:
    """Position in cls's MRO of the first class that declares the field `name` (0: cls itself)."""
    return next(i for i, k in enumerate(cls.__mro__) if name in k.__dict__.get("__annotations__", {}))


def parse_args(cls, argv: Sequence[str] | None = None):
    """The filled dataclass `cls` from the command line, through transformers'
    `HfArgumentParser` (argparse: `--flag-name` or `--flag_name`; bools take `--flag`,
    `--flag false` or `--no-flag`; errors are argparse's one `error:` line). The help texts
    are the attribute docstrings under each field, as cleanrl writes them: HfArgumentParser
    reads help only from field metadata, so the fields are handed to it with that metadata. `--help` lists
    the stage's own flags first, then the inherited groups (DataArgs, ...)."""
    import typing

    from transformers import HfArgumentParser

    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    spec = [(f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                      metadata={"help": docs.get(f.name, "").replace("%", "%%")}))
            for f in sorted(dataclasses.fields(cls), key=lambda f: _declared_by(cls, f.name))]
    parser = HfArgumentParser(dataclasses.make_dataclass(cls.__name__, spec),
                              description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0])
    return cls(**vars(parser.parse_args(argv)))


def run_main(fn: Callable, *args, **kwargs):
    """Call fn; a UserError becomes one line on stderr and exit status 2. Under torchrun, an
    error marked every_rank is said by rank 0 only; any other names the rank that met it
    ("error: rank 3: ..."), so that a failure of one rank is never hidden behind rank 0."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if is_main() or not getattr(e, "every_rank", False):  # the same error on every rank: rank 0 says it
            print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)


def error_line(e: UserError) -> str:
    """What run_main prints after "error: ": the message, after "rank k: " when the process
    is one of several torchrun ranks and the error is not one every rank meets alike."""
    return f"rank {rank()}: {e}" if is_distributed() and not getattr(e, "every_rank", False) else str(e)


def stage_instruction(given: str | None, model_path: str) -> str:
    """The instruction of a stage's prompts: --instruction when given; else the one the model
    was trained with when this project wrote it (its mrt.json's args.instruction), said in one
    line; else DEFAULT_INSTRUCTION. So a model fine-tuned with one instruction is trained and
    evaluated on the same prompt by the stages after it."""
    if given is not None:
        return given
    if not model_path:
        return DEFAULT_INSTRUCTION
    card = os.path.join(str(model_path), "mrt.json")
    args = json_field(card, "args") if os.path.isfile(card) else None
    used = args.get("instruction") if isinstance(args, dict) else None
    if isinstance(used, str):
        if used != DEFAULT_INSTRUCTION:
            print0(f"instruction: {used!r}, the one {card} was trained with (--instruction to change it)")
        return used
    return DEFAULT_INSTRUCTION


def resume_mismatch(saved: dict, current: dict, free: Sequence[str] = ()) -> list[str]:
    """The flags whose values differ between a run's stored arguments (`saved`: its
    dataclasses.asdict, e.g. under "args" in training.save_checkpoint's extra) and this call's, as
    "--flag-name <now> (checkpoint: <then>)", in field order; fields in `free` (those that
    do not change what the run computes: output folder, logging, memory settings, ...) and
    fields the checkpoint does not know are left out."""
    return [f"--{k.replace('_', '-')} {v!r} (checkpoint: {saved[k]!r})" for k, v in current.items()
            if k not in free and k in saved and saved[k] != v]


# ---- Data I/O: validated reading, atomic writing -------------------------------------


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


HUB_NAME = re.compile(r"[\w-][\w.-]*/[\w.-]+")
"""A model or data set name on the hub, "org/name"."""


def hub_dataset(path: str) -> tuple[str, str] | None:
    """(name, split) when `path` names a hub dataset ("org/name[:split]"): two parts, the
    first no local folder, no data-file ending. None for anything that reads as a local path."""
    name, _, split = path.partition(":")
    if not HUB_NAME.fullmatch(name) or os.path.isdir(name.split("/")[0]):
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


def gold_answer(record: dict, answer_field: str, answer_from: str, where: str) -> str:
    """The checked gold answer of a record: its `answer_field` value, or with `answer_from`
    (a field holding a worked solution, NuminaMath style) the content of that field's last
    \\boxed{}; a solution without a complete box is a UserError naming `where`."""
    if not answer_from:
        return check_answer(record[answer_field], where)
    boxed = extract_boxed(str(record[answer_from]))
    if boxed is None:
        raise UserError(f"{where}: field {answer_from!r} holds no complete \\boxed{{}} answer (--answer-from)")
    return check_answer(boxed, where)


def load_problems(path: str, problem_field: str = "problem", answer_field: str = "answer", limit: int = 0,
                  tokenizer=None, instruction: str = DEFAULT_INSTRUCTION, max_prompt_tokens: int | None = None,
                  too_long: str = "", answer_from: str = "", keep_record: bool = False) -> list[dict]:
    """The problems of a data file as {id, problem, answer} (id: the record's index), the
    first `limit` of them (0: all); every stage reads its problems here. With `keep_record`
    each also holds its `record`, the file's record as read (what a custom reward is handed:
    stages keep it when --reward is set). Answers are checked (check_answer); with
    `answer_from` the answer is the last \\boxed{} of that field (gold_answer) and
    `answer_field` is not read. With a tokenizer, each also gets its `prompt` (build_prompt)
    and, with `max_prompt_tokens`, problems whose prompt is longer are dropped and counted;
    `too_long` says in the error what to change when none is left."""
    rows = read_records(path, [problem_field, answer_from or answer_field], with_lines=True)
    if not rows:
        raise UserError(f"{path}: holds no problems")
    rows = rows[:limit] if limit else rows
    out = [{"id": i, "problem": str(r[problem_field]),
            "answer": gold_answer(r, answer_field, answer_from, f"{path}:{line}"),
            **({"record": r} if keep_record else {})} for i, (line, r) in enumerate(rows)]
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


def json_field(path: str, key: str):
    """obj[key] of the JSON object in the file at path; None when the file is missing or
    unreadable, is not a JSON object, or lacks the key (a file that may or may not be there,
    read for a hint: toy.built_fingerprint, default_model)."""
    try:
        with open(path) as f:
            return json.load(f).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


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


# ---- Answer extraction and grading ---------------------------------------------------


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


def last_episode(text: str) -> str:
    """The last episode of a generation: the text after the last backtrack marker (the
    restart line and z2 of a backtrack trace), or all of it when there is no marker. Its last
    box is the graded answer, so z0's box is never credited (evaluate.py, infogain.py)."""
    cut = text.rfind(BACKTRACK_MARKER)
    return text if cut < 0 else text[cut + len(BACKTRACK_MARKER):]


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


def load_reward(spec: str) -> Callable:
    """The callable a --reward names: "module:function" (imported by module path, as
    `python -c "import module"` would from the working folder) or "path/to/file.py:function".
    A spec that is malformed, cannot be imported, lacks the function or names something not
    callable is a UserError in one line naming the reward."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UserError(f"--reward must be module:function or path/to/file.py:function, got {spec!r}")
    try:
        if where.endswith(".py") or os.sep in where or "/" in where:
            if not os.path.isfile(where):
                raise UserError(f"--reward {spec}: no such file {where}")
            loader = importlib.util.spec_from_file_location(f"_mrt_reward_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # a module beside the run, as `python -c` finds it
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # ImportError, SyntaxError or any error the module raises while loading
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"--reward {spec}: cannot import {where} ({type(e).__name__}: {first})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"--reward {spec}: {where} has no {name!r}")
    if not callable(fn):
        raise UserError(f"--reward {spec}: {name} is not callable (a {type(fn).__name__})")
    return fn


def reward_value(value, spec: str) -> float:
    """A custom reward's return value as a float; anything but a real number in [0, 1] (NaN
    included) is a UserError naming the reward and the value."""
    if not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"--reward {spec} returned {value!r}; a reward must be a number in [0, 1]")
    return float(value)


def _default_grade(text: str | None, gold: str, record: dict | None = None) -> float:
    return grade(text, gold)


@functools.lru_cache(maxsize=None)
def make_grader(spec: str = "") -> Callable[[str | None, str, dict | None], float]:
    """The grading function of a run, grade(text, gold, record) -> float in [0, 1]: every
    grading call site of every stage goes through it. spec "" is the math-verify grader
    (`grade`, the record unused); "module:function" or "file.py:function" is a custom reward
    called as function(completion_text, gold_answer, problem_record) (load_reward), whose
    value is checked (reward_value). `text` is what the call site grades (a completion, its
    last episode, or mu's answer; None becomes ""); `record` is the data file's record of the
    problem, or {"answer": gold} where the caller holds only the gold answer (the
    meta-prover). Cached per spec: the module is imported once."""
    if not spec:
        return _default_grade
    fn = load_reward(spec)

    def custom(text: str | None, gold: str, record: dict | None = None) -> float:
        return reward_value(fn("" if text is None else text, gold, {"answer": gold} if record is None else record), spec)

    return custom


def _warn_gold(gold: str) -> None:
    if gold not in _GOLD_WARNED:
        _GOLD_WARNED.add(gold)
        print(f"warning: gold answer {gold!r} does not parse; never rewarded", file=sys.stderr)


# ---- Model and tokenizer loading -----------------------------------------------------


def check_model_path(path: str) -> None:
    """A local folder must exist; a bare hub name ("org/name") is left to the hub. A name
    whose first part is a local folder (e.g. "runs/base") is a local path, not a hub name."""
    if os.path.isdir(os.path.expanduser(path)):
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise UserError(f"{path}: not a model folder (no config.json)")
        return
    if HUB_NAME.fullmatch(path) and not os.path.isdir(path.split("/")[0]):
        return
    raise UserError(f"model path does not exist: {path}")


@contextlib.contextmanager
def loading_errors(path: str):
    """A model folder or hub name that transformers cannot load becomes a one-line error."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {path}: {str(e).strip().splitlines()[0]}") from e


def load_tokenizer(path: str):
    """Tokenizer with a pad token (eos if it has none: masks never come from pad ids)."""
    from transformers import AutoTokenizer

    check_model_path(path)
    with loading_errors(path):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_SAID: set[str] = set()


def torch_dtype(name: str, device: str):
    """'auto' is bfloat16 on a GPU that supports it (torch.cuda.is_bf16_supported: Ampere and
    later), float16 on an older GPU (V100, T4; vLLM refuses bf16 there), said in one line, and
    float32 on CPU. float16 compute in the trainer has no loss scaling (gradients are reduced
    and kept in fp32): where its gradients underflow, --dtype fp32."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if "fp16" not in _SAID:
            _SAID.add("fp16")
            print0(f"--dtype auto: float16, since this GPU ({device}) has no bfloat16 (--dtype fp32 for full precision)")
        return torch.float16
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if name not in names:
        raise UserError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    return names[name]


def load_model(path: str, dtype: str = "auto", device: str | None = None):
    """Any Hugging Face causal LM by local path or hub name, on `device` (default: this
    rank's device), in `dtype` ('auto': see torch_dtype)."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    device = device or default_device()
    with loading_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device))
    return model.to(device)


GPU_MEMORY_SHARE = 0.85
"""The share of GPU memory the sampling engines of an evaluation process (evaluate.py,
r1_analysis.py) take together by default: each engine gets its part (engine_memory_share)."""


def engine_memory_share(given: float, engines: int, total: float = GPU_MEMORY_SHARE) -> float:
    """--gpu-memory-utilization of each engine of a process that holds `engines` of them at
    once: `given` when set (> 0; then the user sizes them), else `total` split evenly. vLLM
    checks at start that the share is still free on the GPU, so N engines at 0.85 each cannot
    all start."""
    if given < 0 or given > 1:
        raise UserError(f"--gpu-memory-utilization must be in (0, 1] (0: {total} over the engines), got {given}")
    return given if given > 0 else round(total / max(1, engines), 4)


# ---- Distributed training helpers ----------------------------------------------------


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: fewer than the machine's under
    taskset or a cgroup's cpuset), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def has_cuda() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    check_gpu_visibility()
    return False


def check_gpu_visibility(smi_probe: Callable[[], str] | None = None,
                         torch_probe: Callable[[], tuple[int, str | None]] | None = None) -> None:
    """Raise a UserError (one line, every rank alike) when `nvidia-smi` lists GPUs but torch sees
    none, so that a GPU machine never trains silently on the CPU (gloo, fp32). The usual causes:
    an NVIDIA driver older than torch's CUDA build needs (PyPI's torch 2.13 is a CUDA 13 build:
    driver >= 580), or a CPU build of torch. Nothing is checked under MRT_ALLOW_CPU=1 (a CPU run
    on purpose) or with CUDA_VISIBLE_DEVICES empty or -1 (GPUs hidden on purpose).
    `smi_probe` returns `nvidia-smi --query-gpu=name,driver_version --format=csv,noheader`'s
    output ("" where the command is missing or fails); `torch_probe` returns torch's device
    count and `torch.version.cuda` (None for a CPU build). Both default to the real ones."""
    if os.environ.get("MRT_ALLOW_CPU", "0") not in ("", "0"):
        return
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return
    if smi_probe is None:
        def smi_probe() -> str:
            import subprocess

            cmd = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
            if shutil.which(cmd[0]) is None:
                return ""
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
            except (OSError, subprocess.SubprocessError):  # no driver loaded, hung: no GPU to miss
                return ""
    if torch_probe is None:
        def torch_probe() -> tuple[int, str | None]:
            import torch

            return torch.cuda.device_count(), torch.version.cuda
    gpus = [line.rsplit(",", 1) for line in smi_probe().splitlines() if line.strip()]  # [name, driver]
    if not gpus:
        return
    count, cuda = torch_probe()
    if count > 0:
        return
    driver = gpus[0][-1].strip() if len(gpus[0]) == 2 else "unknown"
    if cuda is None:
        why = ("torch is a CPU build: remove .venv and run bash install.sh again (it then takes "
               "requirements-gpu.txt)")
    else:
        need = {"12": "525", "13": "580"}.get(cuda.split(".")[0])
        why = (f"torch is a CUDA {cuda} build{f', which needs driver >= {need}' if need else ''}: update the "
               f"driver, or install torch and vLLM built for its CUDA (requirements-gpu.txt names the pins)")
    raise UserError(f"nvidia-smi lists {len(gpus)} GPU(s) (driver {driver}) but torch sees none; {why}; "
                    f"MRT_ALLOW_CPU=1 runs on the CPU anyway", every_rank=True)


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
    if has_cuda():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


DIST_TIMEOUT_HOURS = 8
"""How long a rank waits in a collective before the process group gives up (torch's default is
10 minutes under NCCL). Ranks wait that long on purpose: in object collectives while other
ranks finish their share of sampling (evaluate.py, r1_analysis.py, warmstart.py's search), and
while rank 0 reads and scatters a large model (training.load_trainer)."""


def init_distributed() -> tuple[int, int, str]:
    """Start the process group when run under torchrun: nccl on GPU (bound to this rank's
    device, `device_id`), gloo on CPU, both with a timeout of DIST_TIMEOUT_HOURS.
    Returns (rank, world_size, device); a plain `python` run is rank 0 of 1."""
    import datetime

    import torch
    import torch.distributed as dist

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        kwargs = {"timeout": datetime.timedelta(hours=DIST_TIMEOUT_HOURS)}
        if has_cuda():
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)  # object collectives under NCCL use the current device
            kwargs["device_id"] = torch.device("cuda", local)
        dist.init_process_group("nccl" if has_cuda() else "gloo", **kwargs)
    return rank(), world_size(), default_device()


def collective_device(group=None):
    """The device a tensor must be on for a collective of `group` (default: the world): this
    rank's CUDA device under NCCL (which takes no CPU tensor), the CPU under any other backend
    (gloo; a "cpu:gloo,cuda:nccl" group takes CPU tensors through gloo). Every tensor
    collective of the project goes through the helpers below, which put tensors there."""
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def has_group() -> bool:
    """Whether a torch.distributed group exists (torchrun's, of any world size, or the one of
    a vLLM engine in a plain process). The tensor helpers use it whenever it exists, so that
    `torchrun --nproc_per_node 1` on one GPU puts every collective through NCCL."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_reduce(tensor, op: str = "sum"):
    """A new tensor: `tensor` reduced ("sum" or "max") over the ranks, on `tensor`'s device and
    dtype; moved to the group's device for the collective (collective_device). Without a
    process group, a copy."""
    import torch.distributed as dist

    if not has_group():
        return tensor.clone()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    t = tensor.to(collective_device(), copy=True)
    dist.all_reduce(t, op=ops[op])
    return t.to(tensor.device)


def broadcast_(tensor, src: int = 0) -> None:
    """Fill `tensor` in place with rank `src`'s (through the group's device)."""
    import torch.distributed as dist

    dev = collective_device()
    t = tensor if tensor.device == dev else tensor.to(dev)
    dist.broadcast(t, src=src)
    if t is not tensor:
        tensor.copy_(t)


def all_gather_into(output, tensor, group=None) -> None:
    """Fill `output` (world x `tensor`'s elements, concatenated in rank order) with every rank's
    `tensor`, through the group's device (FSDP2 shards already live there: no copy then)."""
    import torch.distributed as dist

    dev = collective_device(group)
    out = output if output.device == dev else output.new_empty(output.shape, device=dev)
    dist.all_gather_into_tensor(out, tensor.to(dev).contiguous(), group=group)
    if out is not output:
        output.copy_(out)


def send(tensor, dst: int) -> None:
    """Send `tensor` to rank `dst` (point to point, through the group's device)."""
    import torch.distributed as dist

    dist.send(tensor.to(collective_device()).contiguous(), dst=dst)


def recv_(tensor, src: int) -> None:
    """Fill `tensor` in place with what rank `src` sends (through the group's device)."""
    import torch.distributed as dist

    dev = collective_device()
    t = tensor if tensor.device == dev and tensor.is_contiguous() else tensor.new_empty(tensor.shape, device=dev)
    dist.recv(t, src=src)
    if t is not tensor:
        tensor.copy_(t)


def all_gather(obj) -> list:
    """Every rank's picklable object, in rank order (a list of one object in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_shares(share: dict) -> dict:
    """Every rank's `share` (lists and counts) merged in rank order, lists concatenated and counts summed;
    a collective, called while torchrun's process group lives."""
    if not is_distributed():
        raise RuntimeError("torchrun's process group ended before the ranks' results were merged")
    parts = all_gather(share)
    return {k: sum(p[k] for p in parts) if isinstance(v, int) else [x for p in parts for x in p[k]]
            for k, v in share.items()}


def any_rank(flag: bool) -> bool:
    """True when the flag is true on any rank (so that every rank loops the same number of times)."""
    return any(all_gather(bool(flag)))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


# ---- Figures: matplotlib without a display, PNGs written atomically ------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str, dpi: int = 110, *, rect=None, bbox_inches=None) -> None:
    """Lay a figure out (tight_layout, within `rect` when given), write it as a PNG (atomically; bbox_inches
    "tight" crops it to what is drawn), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches=bbox_inches)
    plt.close(fig)


# ---- Helpers of evaluate.py: a model folder's fingerprint, this process's resident memory ----


def folder_fingerprint(path: str) -> str:
    """Names, sizes and modification times of a model folder's files (a retrained model at
    the same path gets a new fingerprint, so its old samples are not reused)."""
    import glob
    import hashlib

    h = hashlib.sha1()
    for f in sorted(glob.glob(os.path.join(path, "*"))):
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def rss_gib() -> float | None:
    """Resident memory of this process (Linux), to check that engines are freed."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return None


# ---- Helpers of infogain.py: models named on the command line, rows of completions, a histogram grid ----


def model_path_ok(path: str) -> bool:
    """Whether `path` is a local folder or reads as a hub model name ("org/name")."""
    return os.path.isdir(path) or bool(HUB_NAME.fullmatch(path))


def named_models(specs: Sequence[str], flag: str = "--model") -> dict[str, str]:
    """{name: path} from name=path specs (a bare path is named by its folder); a malformed spec,
    a name given twice or a path that is no folder and no hub name is an error."""
    runs = {}
    for spec in specs:
        bare = (os.path.basename(os.path.normpath(spec)), "", spec)
        name, _, path = spec.partition("=") if "=" in spec else bare
        if not name or not path:
            raise UserError(f"{flag}: expected name=path or a path, got {spec!r}")
        if name in runs:
            raise UserError(f"{flag}: name {name!r} given twice (use name=path)")
        if not model_path_ok(path):
            raise UserError(f"{flag} {name}: model path does not exist: {path}")
        runs[name] = path
    return runs


def completion_rows(path: str, problem_field: str, answer_field: str, completion_field: str,
                    answer_from: str = ""):
    """(line, where, row, gold, finish_reason) per row of a file of sampled completions
    (read_records; the row's fields renamed "problem", "answer", "completion"; where: file:line):
    problem and completion must be strings, the gold comes from answer_field or from the last box
    of answer_from (gold_answer), and an optional "finish_reason" ("stop" or "length"; default
    "stop") says whether the sample was cut at the token limit. A row that breaks these is an error."""
    rename = {problem_field: "problem", answer_from or answer_field: "answer", completion_field: "completion"}
    for line, r in read_records(path, ["problem", "answer", "completion"], rename, with_lines=True):
        where = f"{path}:{line}"
        if not isinstance(r["completion"], str) or not isinstance(r["problem"], str):
            raise UserError(f"{where}: fields {problem_field!r} and {completion_field!r} must be strings")
        answer = gold_answer(r, "answer", "answer" if answer_from else "", where)  # answer_from: its box
        reason = r.get("finish_reason", "stop")
        if reason not in ("stop", "length"):
            raise UserError(f"{where}: field 'finish_reason' must be 'stop' or 'length', got {reason!r}")
        yield line, where, r, answer, reason


def split_hist_grid(panels: dict, value: str, split: str, path: str, edges, labels: Sequence[str],
                    xlabel: str, unit: str) -> None:
    """A PNG of one histogram per entry of `panels` ({name: rows}, rows: dicts) of the rows' `value`
    in a grid of up to 3 columns with shared axes and one legend: rows whose `split` is > 0 stacked
    under labels[0], the others under labels[1], the mean (labels[2]) as a dashed line."""
    import numpy as np

    plt = pyplot()
    ncols = min(3, int(np.ceil(np.sqrt(len(panels)))))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows + 0.4), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (name, rows) in zip(axes.flat, panels.items()):
        g = np.array([r[value] for r in rows])
        ok = np.array([r[split] for r in rows]) > 0
        ax.hist([g[ok], g[~ok]], bins=edges, stacked=True, label=list(labels[:2]),
                color=["tab:green", "tab:gray"])
        ax.axvline(g.mean(), color="k", ls="--", lw=1, label=labels[2])
        ax.set_title(f"{name}: {len(g)} {unit}, mean {g.mean():+.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
        elif i + ncols >= len(panels):  # the lowest panel of its column: x labels
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel, fontsize=8)
    for row in axes:
        row[0].set_ylabel(unit)
    handles, legend = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, legend, loc="lower center", ncol=3, fontsize=8, frameon=False)
    save_png(fig, path, rect=(0, 0.4 / (3.2 * nrows + 0.4), 1, 1), bbox_inches="tight")


# ---- Helpers of star.py: --resume at an iteration boundary, the statistics of an iteration ----


def finished_iterations(out: str) -> tuple[list[dict], list[dict]]:
    """(records, kept examples) of the iterations a run in `out` finished: the records of
    iterations.jsonl numbered 1, 2, ... in order whose data_iter<k>.jsonl exists, and the
    examples of those files in iteration order (the accumulated SFT data)."""
    path = os.path.join(out, "iterations.jsonl")
    history, examples = [], []
    for rec in read_records(path) if os.path.isfile(path) else []:
        data = os.path.join(out, f"data_iter{len(history) + 1}.jsonl")
        if rec.get("iteration") != len(history) + 1 or not os.path.isfile(data):
            break
        history.append(rec)
        examples += read_records(data)
    return history, examples


def resume_iterations(out: str, own_args: dict, free: Sequence[str] = ()) -> tuple[list[dict], list[dict]]:
    """finished_iterations(out) of a run that --resume continues, after refusing the arguments
    that differ from its <out>/args.json outside `free` (resume_mismatch)."""
    history = finished_iterations(out)
    path = os.path.join(out, "args.json")
    diff = resume_mismatch(json.load(open(path)), own_args, free) if os.path.isfile(path) else []
    if diff:
        raise UserError(f"--resume: {out} was run with other arguments: {', '.join(diff)}; "
                        f"give the run's values or a new --out", every_rank=True)
    return history


def iteration_stats(records: list[dict], method: str, select: Callable) -> dict:
    """Statistics of one iteration's records (star.rollout_chunk's): kept fraction, sample
    accuracy and (a method other than "star") the shares of continuations that parse and that
    do not, r0, r_i, the mean gain r_i - r0 of the kept continuations vs all the others, the
    mean restart step kept, and the fraction of problems that `select` (star.select_continuation,
    MRT's filter) keeps under each reading: gain > 0 (Alg. 1, kept_fraction_gain_pos) and gain >= 0
    (Fig. 4, kept_fraction_gain_nonneg), whatever filter the run used."""
    import numpy as np

    mean = lambda xs: round(float(np.mean(xs)), 4) if len(xs) else None  # noqa: E731
    kept = [r for r in records if r["kept"] is not None]
    samples = [s for r in records for s in r["samples"]]
    out = {"problems": len(records), "samples": len(samples), "kept": len(kept),
           "kept_fraction": mean([r["kept"] is not None for r in records]),
           "sample_accuracy": mean([s["correct"] for s in samples])}
    if method != "star":
        reading = lambda bar: mean([select(r["r0"], [s["r"] for s in r["samples"]],  # noqa: E731
                                           [s["correct"] for s in r["samples"]], bar) is not None
                                    for r in records])
        out.update({"parsed_fraction": mean([s["parsed"] for s in samples]),
                    "unparsed_fraction": mean([not s["parsed"] for s in samples]),
                    "kept_fraction_gain_pos": reading(None), "kept_fraction_gain_nonneg": reading(0.0),
                    "r0_mean": mean([r["r0"] for r in records]), "r_mean": mean([s["r"] for s in samples]),
                    "gain_kept_mean": mean([r["samples"][r["kept"]]["gain"] for r in kept]),
                    "gain_discarded_mean": mean([s["gain"] for r in records
                                                 for i, s in enumerate(r["samples"]) if i != r["kept"]]),
                    "restart_step_mean": mean([r["example"]["restart_step"] for r in kept])})
    return out


# ---- Helpers of grpo.py: the order of the endless data stream, sampled tokens covering a text ----


def problem_index(position: int, n: int, seed: int, gone: frozenset = frozenset()) -> int:
    """The problem at a position of the endless data stream: a fresh permutation of the n
    problems per epoch, the indices in `gone` left out (the others keep their order, so
    leaving a problem out shifts the stream by one place instead of reshuffling it)."""
    epoch, i = divmod(position, n - len(gone))
    return int(_stream_order(n, seed, epoch, gone)[i])


def step_problems(train: list[dict], position: int, args, rank: int,
                  skip: frozenset = frozenset()) -> list[dict]:
    """The args.prompts_per_step problems of one rank in the grpo.py step that starts at `position` of the
    data stream (each step takes P x world consecutive positions; rank r takes the r-th share, problem_index).
    `skip`: ids of problems left out of the stream (no usable z0, sampling.prepare_z0)."""
    P = args.prompts_per_step
    gone = frozenset(i for i, p in enumerate(train) if p["id"] in skip) if skip else frozenset()
    return [train[problem_index(position + rank * P + j, len(train), args.seed, gone)] for j in range(P)]


@functools.lru_cache(maxsize=4)
def _stream_permutation(n: int, seed: int, epoch: int):
    import numpy as np

    return np.random.RandomState(derive_seed(seed, "data order", epoch)).permutation(n)


@functools.lru_cache(maxsize=4)
def _stream_order(n: int, seed: int, epoch: int, gone: frozenset):
    import numpy as np

    perm = _stream_permutation(n, seed, epoch)  # (n,)
    return perm[~np.isin(perm, list(gone))] if gone else perm


def tokens_covering(tokenizer, token_ids: list[int], n_chars: int) -> int:
    """The fewest leading sampled tokens whose decoded text covers the first n_chars
    characters (binary search over decoded prefixes of the ids)."""
    if n_chars <= 0:
        return 0
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(token_ids[:mid], skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def record_heldout(path: str, evals: dict, key: str, accuracy: float, note: str) -> None:
    """evals[key] = accuracy (grpo.py: "start" or "end"), said on rank 0 with every accuracy so far
    ("held-out accuracy: start a -> end b (note)") and written by rank 0 to `path` (eval.json)."""
    evals[key] = accuracy
    print0("held-out accuracy: " + " -> ".join(f"{k} {v:.4f}" for k, v in evals.items()) + f" ({note})")
    if is_main():
        write_json(path, evals)


def group_sample(step: int, rows: list[dict], z0s: dict, reward, advantage) -> dict:
    """A samples.jsonl line of grpo.py: the step; the problem of `rows` (one group of its rollout rows),
    its gold answer and z0 ('' without); each completion's text, outcome, gain, reward and advantage
    (`reward`, `advantage`: tensors whose first len(rows) entries are the group's)."""
    first = rows[0]["problem"]
    return {"step": step, "problem": first["problem"], "gold": first["answer"], "z0": z0s.get(first["id"], ""),
            "completions": [{"text": r["text"], "outcome": r["outcome"], "gain": r["gain"],
                             "reward": reward[i].item(), "advantage": advantage[i].item()}
                            for i, r in enumerate(rows)]}


def rl_problems(args, tokenizer, toy_paths: dict | None) -> tuple[list[dict], list[dict]]:
    """The training problems and the first --eval-problems held-out problems of grpo.py (`args`), from
    --train-data / --test-data or the toy's splits (`toy_paths`); a problem whose prompt is longer than
    --max-prompt-length tokens is dropped (load_problems). A --reward that cannot be imported fails first."""
    data = dict(problem_field=args.problem_field, answer_field=args.answer_field, tokenizer=tokenizer,
                instruction=args.instruction, max_prompt_tokens=args.max_prompt_length,
                too_long="raise --max-prompt-length", answer_from=args.answer_from,
                keep_record=bool(args.reward))
    make_grader(args.reward)  # a --reward that cannot be imported fails here, before any model loads
    train = load_problems(args.train_data or toy_paths["train"], **data)
    return train, load_problems(args.test_data or toy_paths["test"], **data)[: args.eval_problems]


# ---- Helpers of r1_analysis.py: a lazy log, figure panels, trace files, model flags, tables ----


class LazyJsonlLogger:
    """JsonlLogger that creates its file at the first record, so that bad input found while a stage's
    first step runs (r1_analysis.py: a trace too long for the meta-prover) leaves no output."""

    def __init__(self, path: str):
        self.path, self.logger = path, None

    def log(self, record: dict) -> None:
        if self.logger is None:
            self.logger = JsonlLogger(self.path)
        self.logger.log(record)


def read_traces(path: str, problem_field: str = "problem", answer_field: str = "answer",
                trace_field: str = "trace", id_field: str = "id", answer_from: str = "",
                limit: int = 0) -> list[dict]:
    """Rows {id, problem, answer, trace, where} of a JSONL or Parquet file of a model's outputs (the first
    `limit`; 0: all); errors name the file's fields. A row without `id_field` gets its line number."""
    rows = []
    fields = list(dict.fromkeys([problem_field, answer_from or answer_field, trace_field]))
    for line, r in read_records(path, fields, with_lines=True):
        where, problem, trace = f"{path}:{line}", r[problem_field], r[trace_field]
        if not isinstance(problem, str) or not isinstance(trace, str):
            raise UserError(f"{where}: fields {problem_field!r} and {trace_field!r} must be strings")
        rows.append({"id": r.get(id_field, line), "problem": problem,
                     "answer": gold_answer(r, answer_field, answer_from, where), "trace": trace,
                     "where": where})
    if not rows[:limit or None]:
        raise UserError(f"{path}: no traces")
    return rows[:limit or None]


def check_model_flag(path: str, flag: str) -> None:
    """check_model_path, its error naming `flag`."""
    try:
        check_model_path(path)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None


def panels(n: int, cols: int, size: tuple[float, float]):
    """(figure, its first n axes) of a grid of n panels, at most `cols` a row, each `size` inches; the
    grid's spare axes are off."""
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def bar_chart(heights: dict, path: str, *, xlabel: str, ylabel: str, title: str, dashed=(),
              size: tuple[float, float] = (6, 3.8)) -> None:
    """Bars {x: height}, dashed vertical lines at `dashed`, written as a PNG (save_png)."""
    fig, ax = pyplot().subplots(figsize=size)
    ax.bar(list(heights), list(heights.values()), width=0.8, color="tab:blue")
    for x in dashed:
        ax.axvline(x, color="k", ls="--", lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    save_png(fig, path)


def markdown_table(header: list, rows: list) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row (cells as str() writes them)."""
    return ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"] + [
        "| " + " | ".join(map(str, row)) + " |" for row in rows]
