"""bench/solution_fields.py: which part of a toy solution line a base model gets right, teacher-forced.

For each model folder, the toy's clean solutions of the first --problems test problems (of the
build that wrote the folder: its build.json's seed and value range) are fed
after their prompts, and for each field of every step line ("Step k: v op a = r": step number,
operand v, operation, argument a, result r) it prints the share of lines whose field the model
predicts exactly (argmax at every token of the field). A slow-learning build shows which
lookup it has not learned yet, e.g. copying the k-th operation and its argument from the
problem text, against the arithmetic of the result.

    python bench/solution_fields.py runs/toy/base /tmp/toy800/base
    python bench/solution_fields.py M --problems 200 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import toy  # noqa: E402

FIELDS = toy.STEP_FIELDS


def field_hits(right: list[bool], offsets: list[tuple[int, int]], solution: str) -> dict[str, list[bool]]:
    """{field: [all tokens of that field right, per step line]} for one solution, from the per-token
    `right` flags and the tokens' character offsets in it (a token belongs to the field its last
    character falls in)."""
    hits: dict[str, list[bool]] = {f: [] for f in FIELDS}
    for m in toy.STEP_LINE.finditer(solution):
        for i, f in enumerate(FIELDS):
            a, b = m.span(i + 1)
            hits[f].append(all(r for r, (s, e) in zip(right, offsets) if a <= e - 1 < b))
    return hits


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="model folders (toy builds' base/)")
    p.add_argument("--problems", type=int, default=200, help="test problems of the toy split")
    p.add_argument("--seed", type=int, default=0, help="the test split's seed for a model folder without a toy build.json")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import utils

    if a.threads:
        torch.set_num_threads(a.threads)
    for path in a.models:
        if not os.path.isdir(path):
            raise SystemExit(f"solution_fields: no such model folder: {path}")
        _, test = toy.build_splits(path, a.seed)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        hits: dict[str, list[bool]] = {f: [] for f in FIELDS}
        for prob in test[: a.problems]:
            solution = toy.render_solution(*toy.solution_steps(prob["start"], prob["ops"]))
            ctx = tok(utils.build_prompt(tok, prob["problem"]))["input_ids"]
            enc = tok(solution, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor([ctx + enc["input_ids"]])  # (1, T)
            with torch.no_grad():
                pred = model(input_ids=ids).logits[0, len(ctx) - 1:-1].argmax(-1)  # (T_solution,)
            right = (pred == torch.tensor(enc["input_ids"])).tolist()
            for f, xs in field_hits(right, enc["offset_mapping"], solution).items():
                hits[f] += xs
        print(path, {f: round(sum(v) / len(v), 3) for f, v in hits.items()}, flush=True)


if __name__ == "__main__":
    main()
