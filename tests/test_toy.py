"""The toy task and its build: the pretraining documents and their packing (pure), the optimizers,
the build's flags and fingerprint, the shipped build, first use under torchrun, the import graph,
and the bench helpers that read toy builds or time its recipes."""

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

import toy
import toy_pretrain
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_marker_never_in_a_solution_document():
    """The base model must never see the backtrack marker after an attempt (only in notes)."""
    rng = random.Random(2)
    for i in range(2000):
        context, completion = toy_pretrain.pretraining_example(toy.make_problem(random.Random(i)), rng, slip=0.2,
                                                               mu_frac=0.15, retry_frac=0.2)
        assert utils.BACKTRACK_MARKER not in context + completion
    assert utils.BACKTRACK_MARKER in toy_pretrain.NOTE


def test_meta_prover_examples_score_the_answer_only():
    rng, p = random.Random(0), toy.make_problem(random.Random(7))
    for _ in range(50):
        context, completion = toy_pretrain.pretraining_example(p, rng, slip=0.0, mu_frac=1.0)
        assert context.endswith(utils.MU_SUFFIX) and completion == p["answer"] + "}"


def test_retry_examples_redo_the_attempt_from_a_random_step():
    """A retry example: a full attempt and a retry line in the (loss-free) head; as the
    completion, the attempt redone from some Step k on the attempt's own value after step k-1
    (what a backtrack trace's revised attempt looks like); every k occurs; retry_frac 0 never
    makes one."""
    p = {"start": 10, "ops": [("+", 5), ("*", 2), ("-", 3)], "problem": "x", "answer": "27"}
    rng, seen = random.Random(0), set()
    for _ in range(200):
        head, completion = toy_pretrain.pretraining_example(p, rng, slip=0.5, mu_frac=0.0, retry_frac=1.0)
        *attempt, line, rest = head.split("\n")
        assert line in toy_pretrain.RETRY_LINES and rest == "" and attempt[-1].startswith("The answer is")
        k = int(completion.split(":")[0].removeprefix("Step "))
        value = 10 if k == 1 else int(attempt[k - 2].rsplit("= ", 1)[1])
        redo = completion.split("\n")
        assert redo[0].startswith(f"Step {k}: {value} {p['ops'][k - 1][0]} {p['ops'][k - 1][1]} = ")
        assert len(redo) == 3 - k + 2 and redo[-2].startswith("Step 3: ") and redo[-1].startswith("The answer is")
        seen.add(k)
    assert seen == {1, 2, 3}
    head, completion = toy_pretrain.pretraining_example(p, random.Random(1), slip=0.0, mu_frac=0.0,
                                                        retry_frac=1.0)
    assert completion.endswith("\\boxed{27}") and head.split("\n")[-3] == "The answer is \\boxed{27}"
    heads = {toy_pretrain.pretraining_example(p, rng, slip=0.1, mu_frac=0.15)[0] for _ in range(200)}
    assert not any(h.endswith(line + "\n") for h in heads for line in toy_pretrain.RETRY_LINES)


def test_recall_examples_look_up_the_attempts_operands():
    """A recall example: a full (slipped) attempt and RECALL_LINE in the head; as the completion,
    RECALL_STEPS distinct step labels of the attempt, each with the operand the attempt's line
    starts from (the value a restart at that step starts from); recall_frac 0 never makes one."""
    p = {"start": 10, "ops": [("+", 5), ("*", 2), ("-", 3), ("+", 4)], "problem": "x", "answer": "31"}
    rng, seen = random.Random(0), set()
    for _ in range(100):
        head, completion = toy_pretrain.pretraining_example(p, rng, slip=0.5, mu_frac=0.0, recall_frac=1.0)
        *attempt, line, rest = head.split("\n")
        assert line == toy_pretrain.RECALL_LINE and rest == "" and attempt[-1].startswith("The answer is")
        operands = {m.group(1): m.group(2) for m in map(toy.STEP_LINE.match, attempt[:-1])}
        asked = [re.fullmatch(r"Step (\d+): (-?\d+)", x).groups() for x in completion.split("\n")]
        assert len(asked) == len({k for k, _ in asked}) == toy_pretrain.RECALL_STEPS
        assert all(operands[k] == v for k, v in asked)
        seen |= {k for k, _ in asked}
    assert seen == {"1", "2", "3", "4"}
    heads = {toy_pretrain.pretraining_example(p, rng, slip=0.1, mu_frac=0.15, retry_frac=0.3)[0]
             for _ in range(200)}
    assert not any(h.endswith(toy_pretrain.RECALL_LINE + "\n") for h in heads)


def test_problem_range_and_the_splits_of_a_build(tmp_path):
    """make_problem keeps every value in [0, max_value] and + / - arguments at most max_arg (a
    wider range reaches past a smaller one's); build_splits gives the problems of the build
    named by a folder's build.json (seed, range, split sizes), the default problems of a seed without one."""
    def values(p):
        return [p["start"]] + [int(line.rsplit("= ", 1)[1]) for line in toy.solution_steps(p["start"], p["ops"])[0]]

    for max_value, max_arg in ((99, 19), (49, 9)):
        problems = [toy.make_problem(random.Random(i), max_value, max_arg) for i in range(300)]
        assert all(0 <= v <= max_value for p in problems for v in values(p))
        assert all(a <= max_arg for p in problems for o, a in p["ops"] if o in "+-")
        if max_value == 99:
            assert max(max(values(p)) for p in problems) > 49
        assert max(a for p in problems for o, a in p["ops"] if o in "+-") == max_arg
    a = toy.Args()
    (tmp_path / "build.json").write_text('{"seed": 1, "max_value": 99, "max_arg": 19}')
    assert toy.build_splits(str(tmp_path)) == toy.make_splits(1, a.n_train, a.n_test, 99, 19)
    (tmp_path / "build.json").write_text('{"seed": 1, "n_train": 50, "n_test": 20, "max_value": 49, "max_arg": 9}')
    assert toy.build_splits(str(tmp_path)) == toy.make_splits(1, 50, 20, 49, 9)
    assert toy.build_splits(str(tmp_path / "nowhere"), seed=2) == toy.make_splits(2, a.n_train, a.n_test)


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest():
    """optimizers: [AdamW, torch.optim.Muon]; Muon holds exactly the decoder layers' 2-D weights,
    AdamW the embedding (shared with the head) and the norms, each parameter in one optimizer, at
    the recipe's two rates. The bench's adamw recipe puts every parameter in one AdamW, and its
    other Muon precisions swap in its own Muon on the same matrices."""
    tok = toy_pretrain.train_tokenizer(["Step 1: 2 + 3 = 5"] * 20)
    recipe = {**toy_pretrain.recipe(toy.Args(preset="tiny")), "hidden": 64, "heads": 2, "inter": 96}
    model = toy_pretrain.make_model(tok, recipe)
    names = {id(p): n for n, p in model.named_parameters()}

    def held(opts):
        return [[names[id(p)] for g in o.param_groups for p in g["params"]] for o in opts]

    opts = toy_pretrain.optimizers(model, recipe)
    assert [type(o) for o in opts] == [torch.optim.AdamW, torch.optim.Muon]
    assert [o.param_groups[0]["lr"] for o in opts] == [3e-3, 0.02]
    adamw, muon = held(opts)
    assert sorted(adamw + muon) == sorted(names.values())
    assert muon and all(".layers." in n and n.endswith("proj.weight") for n in muon)
    assert "model.embed_tokens.weight" in adamw and all("norm" in n or "embed" in n for n in adamw)
    bench = load_bench("toy_recipes")
    alone = held(bench.optimizers(model, {**recipe, "optimizer": "adamw", "muon_ns": "bf16"}))
    assert len(alone) == 1 and sorted(alone[0]) == sorted(names.values())
    rounded = bench.optimizers(model, {**recipe, "optimizer": "muon", "muon_ns": "rounded"})
    assert held(rounded) == [adamw, muon] and type(rounded[1]) is not torch.optim.Muon


def test_muon_in_bf16_is_torch_muon_bit_for_bit():
    """bench/toy_recipes.py's Muon with its Newton-Schulz iteration in bf16 takes the same steps as
    torch.optim.Muon (the build's), bit for bit, on a wide and a tall matrix over four steps of
    momentum and weight decay, so its other precisions differ from the build's in the iteration
    alone; in fp32 its update is another (more precise) orthogonalization, the same to bf16's
    precision, and so in fp32 rounded to bf16 after every product, which may equal bf16's bit for
    bit: a CPU whose bf16 products accumulate in fp32 and round once computes what "rounded" does (a
    Xeon of CPU model 207 did so for the wide matrix); newton_schulz's singular values end in the
    iteration's band (about 0.5-1.5) whatever the input's scale, and "rounded" holds bf16 values only."""
    bench = load_bench("toy_recipes")
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 80), (96, 32)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 10 ** k for s in shapes] for k in range(-2, 2)]  # 4 steps

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    theirs = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1))
    ours, fp32, rounded = (run(lambda ps: bench.muon(ps, lr=0.02, weight_decay=0.1, ns=ns))
                           for ns in ("bf16", "fp32", "rounded"))
    for t, o, f, r, w in zip(theirs, ours, fp32, rounded, start):
        assert torch.equal(t, o)
        assert not torch.equal(f, o)
        for other in (f, r):
            assert (other - o).abs().max() < 0.05 * (o - w).abs().max()
    for s in shapes:
        g = torch.randn(s, generator=gen) * 1e3
        for ns in ("fp32", "rounded"):
            x = bench.newton_schulz(g, ns)
            sv = torch.linalg.svdvals(x)
            assert x.dtype == torch.float32 and sv.min() > 0.3 and sv.max() < 1.6, (ns, sv)
            assert torch.equal(x, x.bfloat16().float()) == (ns == "rounded")  # rounded: every entry a bf16 value


@pytest.fixture(scope="module")
def toy_tokenizer():
    """The toy's tokenizer, trained on a small corpus of clean solutions (seconds)."""
    corpus = []
    for i in range(300):
        p = toy.make_problem(random.Random(i))
        corpus.append(utils.build_prompt(None, p["problem"]) + toy.render_solution(*toy.solution_steps(p["start"], p["ops"])))
    return toy_pretrain.train_tokenizer(corpus + [utils.MU_SUFFIX, utils.BACKTRACK_MARKER] * 50)


DOC_ARGS = dict(slip=0.1, mu_frac=0.15, note_frac=0.05, retry_frac=0.3, recall_frac=0.1)


def test_document_stream_is_the_per_step_batches_tokenized_one_by_one(toy_tokenizer):
    """document_texts + encode_documents (batched tokenizer calls) give, document for document,
    the token ids and loss masks of per-document tokenizer calls, and the documents of per-step
    batches (encode_batch, one document per row) of DRAW problems drawn from the same seed: BOS
    first, EOS last, loss on the completion and EOS only; every kind of document occurs."""
    tok, problems = toy_tokenizer, [toy.make_problem(random.Random(1000 + i)) for i in range(50)]
    old_rng, new_rng, old = random.Random(5), random.Random(5), []
    for _ in range(4):
        batch = [problems[old_rng.randrange(len(problems))] for _ in range(toy_pretrain.DRAW)]
        ids, attn, mask = toy_pretrain.encode_batch(tok, batch, old_rng, DOC_ARGS["slip"], DOC_ARGS["mu_frac"],
                                                    DOC_ARGS["note_frac"], 1, DOC_ARGS["retry_frac"],
                                                    DOC_ARGS["recall_frac"])
        old += [(ids[i][attn[i] == 1].tolist(), mask[i][attn[i] == 1].int().tolist()) for i in range(len(ids))]
    texts = toy_pretrain.document_texts(tok, problems, new_rng, 4 * toy_pretrain.DRAW, **DOC_ARGS)
    new = toy_pretrain.encode_documents(tok, texts)
    assert new == old
    kinds = set()
    for (prompt, completion), (ids, mask) in zip(texts, new):
        one = tok(prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == one
        n_prompt = mask.index(1)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1
        assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
        assert tok.decode(ids[1:n_prompt]) == prompt and tok.decode(ids[n_prompt:-1]) == completion
        kinds.add("note" if prompt == "" else "mu" if prompt.endswith(utils.MU_SUFFIX) else
                  "retry" if any(line in prompt for line in toy_pretrain.RETRY_LINES) else
                  "recall" if prompt.endswith(toy_pretrain.RECALL_LINE + "\n") else "solution")
    assert kinds == {"note", "mu", "retry", "recall", "solution"}


def test_prompt_weight_weighs_the_prompt_after_bos(toy_tokenizer):
    """bench/toy_recipes.py's prompt weight: the same ids, the loss mask 0 on BOS, the weight on
    the rest of the prompt and 1 on the completion and EOS; pretraining_loss is then the mean
    NLL weighted so (checked against a hand sum on random logits)."""
    weigh_prompts = load_bench("toy_recipes").weigh_prompts
    tok, problems = toy_tokenizer, [toy.make_problem(random.Random(2000 + i)) for i in range(8)]
    texts = toy_pretrain.document_texts(tok, problems, random.Random(7), 16, **DOC_ARGS)
    plain = toy_pretrain.encode_documents(tok, texts)
    weighted = weigh_prompts(plain, 0.25)
    assert [ids for ids, _ in plain] == [ids for ids, _ in weighted]
    for (ids, m0), (_, m) in zip(plain, weighted):
        n_prompt = m0.index(1)
        assert m == [0] + [0.25] * (n_prompt - 1) + [1] * (len(ids) - n_prompt)
    ids, _, mask = toy_pretrain.collate(weighted, 3, tok.pad_token_id)  # (rows, T)

    class Logits(torch.nn.Module):  # a stand-in for the model: fixed random logits
        def forward(self, input_ids, attention_mask=None):
            g = torch.Generator().manual_seed(0)
            return type("Out", (), {"logits": torch.randn(*input_ids.shape, len(tok), generator=g)})

    loss = toy_pretrain.pretraining_loss(Logits(), ids, mask)
    logp = torch.log_softmax(Logits()(ids).logits[:, :-1], -1)  # (rows, T-1, V)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]  # (rows, T-1)
    w = mask[:, 1:]
    assert set(w.unique().tolist()) == {0.0, 0.25, 1.0}
    assert torch.allclose(loss, (nll * w).sum() / w.sum())


def test_collate_lays_out_rows_as_encode_batch_and_balances_them(toy_tokenizer):
    """collate of the encoded document stream gives encode_batch's tensors for the same draw
    (pack documents per row); with balance, the same rows count and the same documents (each
    whole, in stream order within its row), and its longest row is no longer."""
    tok, problems = toy_tokenizer, [toy.make_problem(random.Random(3000 + i)) for i in range(50)]
    old_rng, new_rng = random.Random(7), random.Random(7)
    batch = [problems[old_rng.randrange(len(problems))] for _ in range(toy_pretrain.DRAW)]
    old = toy_pretrain.encode_batch(tok, batch, old_rng, DOC_ARGS["slip"], DOC_ARGS["mu_frac"], DOC_ARGS["note_frac"],
                                    3, DOC_ARGS["retry_frac"], DOC_ARGS["recall_frac"])
    texts = toy_pretrain.document_texts(tok, problems, new_rng, toy_pretrain.DRAW, **DOC_ARGS)
    docs = toy_pretrain.encode_documents(tok, texts)
    new = toy_pretrain.collate(docs, 3, tok.pad_token_id)
    assert all(torch.equal(x, y) for x, y in zip(old, new))
    ids, attn, mask = toy_pretrain.collate(docs, 3, tok.pad_token_id, balance=True)
    assert ids.shape[0] == new[0].shape[0] and ids.shape[1] <= new[0].shape[1]
    assert int(attn.sum()) == int(new[1].sum()) and torch.equal(mask.sum(), new[2].sum())
    got = []
    for row, a in zip(ids.tolist(), attn.tolist()):
        row = row[:sum(a)]
        starts = [i for i, t in enumerate(row) if t == tok.bos_token_id] + [len(row)]
        got += [row[i:j] for i, j in zip(starts, starts[1:])]
    assert sorted(got) == sorted(d[0] for d in docs)


def test_the_loss_without_the_attention_mask_is_the_masked_loss(toy_tokenizer):
    """pretraining_loss on collated rows (pads last in each row): with and without the attention
    mask, the same loss and the same gradients; the loss is the mean NLL of the loss-masked
    tokens, recomputed here row by row; train_step (the build's, no mask) returns that loss and
    moves both optimizers' weights."""
    import copy

    tok, problems = toy_tokenizer, [toy.make_problem(random.Random(4000 + i)) for i in range(20)]
    texts = toy_pretrain.document_texts(tok, problems, random.Random(5), 12, **DOC_ARGS)
    docs = toy_pretrain.encode_documents(tok, texts)
    ids, attn, mask = toy_pretrain.collate(docs, 3, tok.pad_token_id, balance=True)  # (4, T) each
    assert int(attn.sum()) < attn.numel()  # some pads, so that the mask could matter
    recipe = {**toy_pretrain.recipe(toy.Args(preset="tiny")), "hidden": 64, "heads": 2, "inter": 96}
    torch.manual_seed(0)
    model = toy_pretrain.make_model(tok, recipe).train()
    start = copy.deepcopy(model.state_dict())
    nll, n = 0.0, 0
    with torch.no_grad():
        for row, a, m in zip(ids, attn, mask):  # each row alone, cut at its pads
            k = int(a.sum())
            logp = torch.log_softmax(model(input_ids=row[None, :k]).logits[0, :-1].double(), -1)  # (k-1, V)
            picked = logp.gather(1, row[1:k, None])[:, 0]
            nll -= float((picked * m[1:k]).sum())
            n += int(m[1:k].sum())
    runs = {}
    for masked in (True, False):
        copied = copy.deepcopy(model)
        loss = toy_pretrain.pretraining_loss(copied, ids, mask, attn if masked else None)
        loss.backward()
        runs[masked] = (loss.item(), {k: p.grad for k, p in copied.named_parameters()})
    assert abs(runs[True][0] - nll / n) < 1e-5 and abs(runs[False][0] - runs[True][0]) < 1e-5
    for k, g in runs[True][1].items():
        assert torch.allclose(g, runs[False][1][k], atol=1e-6), k
    trained = copy.deepcopy(model)
    loss = toy_pretrain.train_step(trained, toy_pretrain.optimizers(trained, recipe), ids, mask)
    assert loss.item() == runs[False][0]
    moved = {k for k, w in trained.state_dict().items() if not torch.equal(w, start[k])}
    assert "model.embed_tokens.weight" in moved and "model.layers.0.mlp.up_proj.weight" in moved


def test_help_answers():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--pack" in out.stdout and "percent" in out.stdout


def load_bench(name: str):
    """The module bench/<name>.py (bench/ is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_oracle_backtrack_traces_of_bench_rl_headroom():
    """bench/rl_headroom.py's oracle traces: the restart is z0's first wrong line, infogain's
    parser splits them, the revised attempt is right; plain solutions come with probability mix."""
    from infogain import split_backtrack

    bench = load_bench("rl_headroom")

    p = {"problem": "Start with 17. Add 25. Multiply by 3. Subtract 48. What is the result?", "answer": "78",
         "start": 17, "ops": [("+", 25), ("*", 3), ("-", 48)]}
    wrong = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 125\nStep 3: 125 - 48 = 77\nThe answer is \\boxed{77}"
    right = "Step 1: 17 + 25 = 42\nStep 2: 42 * 3 = 126\nStep 3: 126 - 48 = 78\nThe answer is \\boxed{78}"
    (ctx, comp), = bench.oracle_examples([p], [wrong], None, random.Random(0), 0.0, utils.BACKTRACK_MARKER)
    assert ctx == utils.build_prompt(None, p["problem"]) + wrong
    ep = split_backtrack(wrong + comp)
    assert ep is not None and ep.restart_step == 2 and ep.z0 == wrong
    assert ep.z1.strip() == utils.BACKTRACK_MARKER + "\nStep 2: 42 * 3 = 126"  # the true line
    assert utils.grade(ep.z2, "78") == 1.0
    for seed in range(5):  # a right attempt: some restart, still the right answer
        (_, comp), = bench.oracle_examples([p], [right], None, random.Random(seed), 0.0, utils.BACKTRACK_MARKER)
        assert utils.grade(split_backtrack(right + comp).z2, "78") == 1.0
    pairs = bench.oracle_examples([p] * 200, [wrong] * 200, None, random.Random(1), 0.5, utils.BACKTRACK_MARKER)
    plain = [c for x, c in pairs if x == utils.build_prompt(None, p["problem"])]
    assert 60 < len(plain) < 140 and all(c == right for c in plain)


def test_bench_restart_steps_splits_accuracy_by_restart_step():
    """bench/restart_steps.py: rows of grpo.rollout grouped by the restart step the parser
    reads; unparsed continuations count as "none"; z0_wrong keeps only problems whose z0 is wrong."""
    from infogain import backtrack_cue, split_backtrack

    bench = load_bench("restart_steps")

    z0 = "Step 1: 2 + 3 = 5\nStep 2: 5 * 4 = 24\nThe answer is \\boxed{24}"
    conts = [(" 1: 2 + 3 = 5\nStep 2: 5 * 4 = 20\nThe answer is \\boxed{20}", 1.0, 0),
             (" 2: 5 * 4 = 20\nThe answer is \\boxed{20}", 1.0, 0),
             (" 2: 5 * 4 = 21\nThe answer is \\boxed{21}", 0.0, 0),
             (" 1: 2 + 3 = 5\nStep 2: 5 * 4 = 20\nThe answer is \\boxed{20}", 1.0, 1),
             (" lost", 0.0, 1)]
    rows = [{"problem": {"id": pid}, "episodes": split_backtrack(backtrack_cue(z0) + text), "outcome": out}
            for text, out, pid in conts]
    assert [r["episodes"] is None for r in rows] == [False, False, False, False, True]
    r = bench.by_restart_step(rows, {0: 0.0, 1: 1.0})
    assert r["steps"] == {"1": {"n": 2, "acc": 1.0}, "2": {"n": 2, "acc": 0.5}, "none": {"n": 1, "acc": 0.0}}
    assert r["all"] == 0.6 and r["z0_wrong"] == round(2 / 3, 4)


def test_bench_restart_steps_token_fields():
    """bench/restart_steps.token_fields: each token of a redone first line goes to the field its
    last character falls in (a leading space belongs to the token), later lines are "later"."""
    bench = load_bench("restart_steps")
    text = "Step 2: 15 * 2 = 30\nStep 3: 30 - 3 = 27"
    pieces = re.findall(r" ?[A-Za-z]+| ?\d|:| ?[*=+-]|\n", text)  # one digit per token, as a byte BPE may split
    assert "".join(pieces) == text
    offsets, at = [], 0
    for piece in pieces:
        offsets.append((at, at + len(piece)))
        at += len(piece)
    fields = bench.token_fields(text, offsets)
    first = [(piece, field) for piece, field in zip(pieces, fields) if field != "later"]
    assert first == [("Step", None), (" 2", "step"), (":", None), (" 1", "operand"), ("5", "operand"), (" *", "op"),
                     (" 2", "arg"), (" =", None), (" 3", "result"), ("0", "result")]
    assert fields[len(first):] == ["later"] * (len(pieces) - len(first))
    with pytest.raises(ValueError, match="step line"):
        bench.token_fields("lost", [(0, 4)])
    # a slipped attempt can go below 0 ("Subtract 5" on a value slipped to 4): the sign is the operand's
    pieces = ["Step", " 3", ":", " -", "1", " +", " 3", " =", " 2"]
    offsets = [(sum(map(len, pieces[:i])), sum(map(len, pieces[:i + 1]))) for i in range(len(pieces))]
    assert bench.token_fields("".join(pieces), offsets) == [None, "step", None, "operand", "operand", "op", "arg", None,
                                                             "result"]


def test_first_use_under_torchrun_builds_once_and_keeps_the_group(tmp_path):
    """`torchrun grpo.py` on a fresh machine: rank 0 builds the toy in a child process while
    rank 1 waits; afterwards both ranks see the build and torchrun's process group still works
    (a vLLM engine closed inside a torchrun process would have ended it)."""
    import json

    root = tmp_path / "toy"
    script = tmp_path / "first_use.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "import toy, utils\n"
        "if __name__ == '__main__':\n"
        "    rank, world, _ = utils.init_distributed()\n"
        f"    p = toy.ensure_built({str(root)!r}, 'tiny', steps=20)\n"
        "    seen = f\"RANKS {utils.all_gather(rank)} BUILT {toy.is_built(p['base'].rsplit('/', 1)[0], 'tiny', 20)}\"\n"
        f"    open(f'{tmp_path}/rank{{rank}}.txt', 'w').write(seen)\n"
        "    import torch.distributed as dist\n"
        "    dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items() if k != "MRT_TOY_NO_BUILD"}
    # pinned to one core: the ranks only wait, and the child's build takes the thread count from
    # the CPUs it may use, so it builds on one thread beside the other test worker
    one_core = {min(os.sched_getaffinity(0))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=900, env=env,
                       preexec_fn=lambda: os.sched_setaffinity(0, one_core))
    assert r.returncode == 0, r.stderr[-3000:]
    # each rank writes what it saw to its own file: two ranks' prints interleave on torchrun's stdout
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "RANKS [0, 1] BUILT True", rank
    assert r.stdout.count("toy: building") == 1  # rank 0 built it, once
    assert "--threads 1" in r.stdout  # on the one core it may use (every core when unpinned)
    report = json.load(open(root / "base" / "build.json"))
    assert {k: report[k] for k in ("preset", "steps")} == {"preset": "tiny", "steps": 20}
    assert "pass@1" not in report  # a stage's first use skips the base's evaluation (`python toy.py` runs it)


def test_no_build_guard_fails_instead_of_building(tmp_path, monkeypatch):
    """Under MRT_TOY_NO_BUILD (the tests set it when MRT_TOY_DIR names a build) a missing or
    stale toy is a one-line error naming the folder, and nothing is written."""
    monkeypatch.setenv("MRT_TOY_NO_BUILD", "1")
    root = tmp_path / "toy"
    with pytest.raises(utils.UserError, match=re.escape(str(root))):
        toy.ensure_built(str(root), "tiny", steps=1, eval_samples=0)
    assert not root.exists()


@pytest.mark.parametrize("flags, words", [
    (["--preset", "huge"], "--preset must be one of tiny, default, bench, got 'huge'"),
    (["--steps", "-5"], "--steps must be positive, got -5"),
])
def test_bad_build_flags_are_one_line_before_anything_is_written(flags, words, tmp_path, capsys):
    out = tmp_path / "toy"
    with pytest.raises(SystemExit) as e:
        utils.run_main(toy_pretrain.build, utils.parse_args(toy.Args, ["--out", str(out)] + flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_bad_build_flag_from_the_command_line(tmp_path):
    """The same as a user meets it: `python toy.py --preset huge` prints one line, exits 2."""
    p = subprocess.run([sys.executable, "toy.py", "--preset", "huge", "--out", str(tmp_path / "toy")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "'huge'" in p.stderr, p.stderr
    assert not (tmp_path / "toy").exists()


def test_a_build_is_its_build_json_fingerprint(tmp_path):
    """built_fingerprint reads build.json's fingerprint (None without one, or for a file that is
    not a build's report); is_built compares it with this toy.py's, and takes an unreadable
    build.json for no build (a rebuild) rather than a traceback."""
    root = tmp_path / "toy"
    p = toy.paths(str(root))
    os.makedirs(p["base"])
    os.makedirs(os.path.dirname(p["train"]))
    for split in ("train", "test"):
        open(p[split], "w").close()
    report = os.path.join(p["base"], "build.json")
    assert toy.built_fingerprint(p["base"]) is None and not toy.is_built(str(root), "tiny", 20)
    want = toy.fingerprint(toy.Args(out=str(root), preset="tiny", steps=20))
    for text, found in (("{oops", None), ("[1, 2]", None), ('{"preset": "tiny"}', None), ('{"fingerprint": "f0"}', "f0"),
                        (f'{{"fingerprint": "{want}"}}', want)):
        with open(report, "w") as f:
            f.write(text)
        assert toy.built_fingerprint(p["base"]) == found, text
        assert toy.is_built(str(root), "tiny", 20) == (found == want), text
    os.remove(p["test"])  # the report alone is no build
    assert not toy.is_built(str(root), "tiny", 20)


def test_build_code_is_the_recipe_and_the_task_code_it_uses():
    """build_code by hand on two small sources: the recipe's code and the task definitions it names
    as toy.<name>, with those they name in turn (not the rest), docstrings (and string statements)
    cut out; a docstring or an unused definition changes nothing, a code change does."""
    task = ('"""Module doc."""\n\nA = 1  # A\n"""A\'s doc."""\n\n\ndef f(x):\n    """f\'s doc."""\n    return x + A\n\n\n'
            'def g():\n    return 2\n\n\n@dataclass\nclass C:\n    n: int = A\n    """n\'s doc."""\n')
    recipe = '"""Recipe doc."""\nimport toy\n\n\ndef build():\n    """doc"""\n    return toy.f(toy.C().n)  # café\n'
    code = toy.build_code(task, recipe)
    assert code.decode() == ("\nimport toy\n"  # the module docstring, cut: an empty statement
                             "def build():\n    \n    return toy.f(toy.C().n)\n"
                             "A = 1\n"
                             "def f(x):\n    \n    return x + A\n"
                             "@dataclass\nclass C:\n    n: int = A\n    \n")
    assert toy.build_code(task.replace("f\'s doc", "f\'s new doc").replace("return 2", "return 3"), recipe) == code
    assert toy.build_code(task, recipe.replace("Recipe doc", "Other doc")) == code
    assert toy.build_code(task.replace("x + A", "x - A"), recipe) != code
    assert toy.build_code(task.replace("A = 1", "A = 2"), recipe) != code
    assert toy.build_code(task, recipe.replace("toy.C().n", "toy.C().n + 1")) != code


def test_the_shipped_toy_is_this_codes_build():
    """The shipped build (assets/toy) carries the fingerprint of this code's default build: a change
    to toy_pretrain.py's code, to the task code it uses, or to a default build flag fails here until
    the shipped files are rebuilt (`python toy.py --out assets/toy`, with the study regenerated on
    them). It holds both splits and the weights, and the default toy (paths, ensure_built) is it,
    with no build."""
    base = os.path.join(toy.SHIPPED_DIR, "base")
    assert toy.built_fingerprint(base) == toy.fingerprint(toy.Args()), \
        "assets/toy is stale for this code: rebuild it with `python toy.py --out assets/toy`"
    assert toy.is_built(toy.SHIPPED_DIR)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "build.json"):
        assert os.path.isfile(os.path.join(base, name)), name
    report = json.load(open(os.path.join(base, "build.json")))
    assert {k: report[k] for k in ("preset", "seed", "steps")} == {"preset": "default", "seed": 0, "steps": 800}
    train, test = toy.build_splits(base)
    assert [json.loads(line)["problem"] for line in open(toy.paths()["test"])] == [p["problem"] for p in test]
    assert sum(1 for _ in open(toy.paths()["train"])) == len(train)
    want = toy.files(toy.SHIPPED_DIR)
    assert toy.paths() == want and toy.paths(os.path.join(ROOT, "runs", "toy")) == want
    assert toy.ensure_built() == want and toy.default_model()[1] == want
    assert toy.paths("runs/toy-other") == toy.files("runs/toy-other")


def test_a_stale_shipped_toy_is_left_for_a_build(tmp_path, monkeypatch):
    """When the shipped files are not this code's build (here: a folder without them), the default
    toy is runs/toy again, built on first use (here MRT_TOY_NO_BUILD turns the build into its
    one-line error naming runs/toy); a non-default preset never reads the shipped build."""
    monkeypatch.setattr(toy, "SHIPPED_DIR", str(tmp_path / "shipped"))
    monkeypatch.setenv("MRT_TOY_NO_BUILD", "1")
    assert toy.paths() == toy.files(toy.DEFAULT_DIR)
    with pytest.raises(utils.UserError, match="toy: runs/toy is missing or stale"):
        toy.ensure_built()
    monkeypatch.undo()
    monkeypatch.setenv("MRT_TOY_NO_BUILD", "1")
    with pytest.raises(utils.UserError, match="toy: runs/toy is missing or stale"):
        toy.ensure_built(preset="tiny")


def test_bench_toy_recipes_runs_every_alternative(tmp_path):
    """bench/toy_recipes.py at its smallest: one timed step of the build's recipe and of recipes
    that switch every alternative (per-step encoding, unbalanced rows, the attention mask, bf16,
    AdamW alone, Muon's other precisions, the prompt weight), each a table row; a bad field is one
    line naming it."""
    recipes = ["batch=4", "batch=4 pretok=0 balance=0 mask=1 bf16=1 optimizer=adamw",
               "batch=4 muon_ns=rounded prompt_weight=0.25", "batch=4 muon_ns=fp32 lr=0.001 muon_lr=0.01"]
    p = subprocess.run([sys.executable, "bench/toy_recipes.py", *recipes, "--steps", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("batch=4")]
    assert len(rows) == len(recipes) and all(" 0.54M " in r or "M " in r for r in rows), p.stdout
    p = subprocess.run([sys.executable, "bench/toy_recipes.py", "muon_ns=fp16"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "bad field 'muon_ns=fp16'" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_default_model_takes_a_warmstart_of_this_toy_build_only(tmp_path, monkeypatch, capsys):
    base = tmp_path / "toy" / "base"
    base.mkdir(parents=True)
    (base / "build.json").write_text(json.dumps({"fingerprint": "f1"}))
    monkeypatch.setattr(toy, "ensure_built", lambda *a, **k: {"base": str(base)})
    monkeypatch.chdir(tmp_path)
    assert toy.default_model()[0] == str(base)  # no warmstart model
    warm = tmp_path / "runs" / "warmstart" / "model"
    warm.mkdir(parents=True)
    for card in (None, "{oops", {"stage": "warmstart"}, {"base_build": "f0"}):  # none, malformed, old, another build
        if card is not None:
            (warm / "mrt.json").write_text(card if isinstance(card, str) else json.dumps(card))
        capsys.readouterr()
        assert toy.default_model()[0] == str(base), card
        assert "not fine-tuned from this toy build" in capsys.readouterr().out
    (warm / "mrt.json").write_text(json.dumps({"base_build": "f1"}))
    assert toy.default_model()[0] == os.path.join("runs", "warmstart", "model")


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports} for every top-level .py file of the project, from
    every import statement in it (at the top or inside a function)."""
    import ast
    import glob

    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for m in modules:
        found = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, m + ".py")).read())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        graph[m] = (found & modules) - {m}
    return graph


def test_the_import_graph_has_no_circle():
    """utils.py imports no project module, toy.py (the task) utils alone, toy_pretrain.py (its build)
    toy, sampling and utils; no module reaches itself through imports, counting those inside
    functions (a depth-first search)."""
    graph = project_imports()
    assert graph["utils"] == set() and graph["toy"] == {"utils"}
    assert graph["toy_pretrain"] == {"toy", "sampling", "utils"} and "grpo" in graph

    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    assert [m for m in sorted(graph) if m in reach(m)] == []
    graph["utils"].add("grpo")  # the check can fail: a circle through utils
    assert "utils" in reach("utils")


STAGES = ("warmstart", "star", "grpo", "infogain", "evaluate", "r1_analysis")
"""The stage scripts; study.py drives them as commands, toy.py is the task."""
PURE = {"infogain": {"Episodes", "split_backtrack", "split_continuation", "join_backtrack", "restart_prefix",
                     "backtrack_cue", "episode_contexts", "information_gain", "backtrack_gain", "episode_gains"},
        "evaluate": {"pass_at_k", "maj_at_k", "majority_curve", "cluster_answers", "cumulative_regret",
                     "token_efficiency", "curve_auc", "interp_curve"}}
"""What one stage may take from another: the episodes and the gain, pass@k and maj@k."""


def stage_uses(source: str) -> dict[str, set[str]]:
    """{stage module: the names this source takes from it}: `from stage import a, b`, and `stage.a`
    for a module imported whole."""
    import ast

    tree, used = ast.parse(source), {}
    whole = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in STAGES:
            used.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            whole |= {a.asname or a.name for a in node.names if a.name in STAGES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in whole:
            used.setdefault(node.value.id, set()).add(node.attr)
    return used


def test_a_stage_takes_only_pure_functions_from_another():
    """No shared module (utils, training, sampling, toy, toy_pretrain) imports a stage; a stage takes
    from another stage only PURE's names (its loops, engines and CLI helpers live in sampling.py and
    training.py), and each of those is a function or class with no sampler, model or args parameter."""
    import inspect

    graph = project_imports()
    for shared in ("utils", "training", "sampling", "toy", "toy_pretrain"):
        assert not graph[shared] & set(STAGES), shared
    for stage in STAGES:
        used = stage_uses(open(os.path.join(ROOT, stage + ".py")).read())
        for other, names in used.items():
            if other != stage:
                assert names <= PURE.get(other, set()), (stage, other, sorted(names - PURE.get(other, set())))
    for module, names in PURE.items():
        mod = __import__(module)
        for name in names:
            obj = getattr(mod, name)
            params = set(inspect.signature(obj).parameters) if inspect.isfunction(obj) else set()
            assert not params & {"sampler", "mu", "model", "args"}, (module, name)
    # the check can fail: a loop taken from another stage
    assert stage_uses("import warmstart\nwarmstart.sft(p)\n") == {"warmstart": {"sft"}}
    assert not {"sft"} <= PURE.get("warmstart", set())


def test_bench_solution_fields_by_hand():
    """bench/solution_fields.py's field split: a token counts for the field its last character
    falls in, a field is right only if all its tokens are."""
    fields = load_bench("solution_fields").field_hits
    sol = "Step 1: 17 + 25 = 42\nThe answer is \\boxed{42}"
    # tokens: "Step", " 1", ":", " 1", "7", " +", " 2", "5", " =", " 4", "2", rest
    offsets = [(0, 4), (4, 6), (6, 7), (7, 9), (9, 10), (10, 12), (12, 14), (14, 15), (15, 17), (17, 19), (19, 20),
               (20, len(sol))]
    right = [True] * 12
    right[6] = False  # " 2" of the argument 25
    assert fields(right, offsets, sol) == {"step": [True], "operand": [True], "op": [True], "arg": [False],
                                          "result": [True]}
    right = [True] * 12
    right[10] = False  # "2" of the result 42
    assert fields(right, offsets, sol)["result"] == [False] and fields(right, offsets, sol)["arg"] == [True]
