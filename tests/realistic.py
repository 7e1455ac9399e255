"""tests/realistic.py: a realistic-shape model, built here from the toy base by a short fit.

What it is: a Llama-3-architecture `LlamaForCausalLM` with Llama-3's vocabulary size (128,256),
`max_position_embeddings` 1,048,576, rope_theta 500,000, "bfloat16" as its config's dtype, a
Llama-3 style chat template (<|begin_of_text|>, <|start_header_id|>role<|end_header_id|>,
<|eot_id|>), eos = <|eot_id|> and pad = <pad> (distinct from eos). Its body is the toy base
(same hidden size, layers, heads, head_dim 64 so that vLLM's CPU attention takes it).

The tokenizer is the toy base's byte-level BPE (a few hundred ids) plus the four Llama-3
special tokens appended after them; every id it makes is far below 128,256, like a real
tokenizer whose ids fit its embedding table. The weights: embedding rows of the toy tokens are
the toy base's rows; <|begin_of_text|> and <|eot_id|> take the rows of the toy's <s> and </s>
(so the base's stopping transfers), the two header tokens the mean toy row; every row no token
uses takes the toy's <pad> row (a token the base never predicts, so the 127,7xx unused ids
start with a low logit and sampling stays inside the tokenizer). The model is then fitted
briefly (`steps` AdamW steps) on toy problems rendered through the chat template, so that its
samples are real "Step k:" solutions ending in <|eot_id|> and some are right (see `fit`: the fit
runs on a model with one row standing for all unused ids, exactly the full model's loss at a
few hundred rows' cost; the unused ids' probability mass is recorded in build.json).

Stored in bfloat16 on disk, as real Llama checkpoints are: the config names bf16 and the file
holds bf16, so the loaders' upcast to fp32 (CPU) is exercised as it will be on a real model.

Built once per content: the output folder is <out_dir>/<key>, key a hash of this file, the
build arguments and the toy base's files; a folder with its build.json is reused as it is.

    python tests/realistic.py [--out runs/realistic] [--base runs/toy/base]   # prints the folder
    from realistic import build_realistic; path = build_realistic("runs/realistic")
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402

VOCAB_SIZE = 128256
MAX_POSITIONS = 1048576
ROPE_THETA = 500000.0
SPECIAL = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Meta-Llama-3-Instruct's chat template, as its tokenizer_config.json holds it."""

ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
PROMPT_START = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
"""How every prompt the template renders starts (tests check that the stages apply it)."""


def default_base() -> str:
    """The toy base: $MRT_TOY_DIR/base if set, else runs/toy/base of this checkout."""
    return os.path.join(os.environ.get("MRT_TOY_DIR") or os.path.join(ROOT, "runs", "toy"), "base")


def _key(base: str, params: dict) -> str:
    h = hashlib.sha256(open(__file__, "rb").read())
    h.update(json.dumps(params, sort_keys=True).encode())
    for name in sorted(os.listdir(base)):
        if name.endswith((".json", ".safetensors")) and name != "build.json":
            h.update(name.encode())
            h.update(open(os.path.join(base, name), "rb").read())
    return h.hexdigest()[:16]


def make_tokenizer(base: str):
    """The toy tokenizer plus the Llama-3 special tokens, BOS <|begin_of_text|>, EOS
    <|eot_id|>, pad <pad>, the Llama-3 chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(os.path.join(base, "tokenizer.json"))
    tok.add_special_tokens(list(SPECIAL))
    bos = tok.token_to_id(SPECIAL[0])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL[0]} $A", special_tokens=[(SPECIAL[0], bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token="<|eot_id|>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITIONS)


def make_model(base_model, base_tok, tok, vocab_size: int):
    """A Llama-3 style model (`vocab_size` rows) with the toy base's body and the embedding
    rows described in the module docstring (fp32 in memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    c = base_model.config
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                         max_position_embeddings=MAX_POSITIONS, rope_theta=ROPE_THETA, rms_norm_eps=c.rms_norm_eps,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    sd = {k: v for k, v in base_model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("embed_tokens" in k or "lm_head" in k for k in missing), (missing, unexpected)
    old = base_model.get_input_embeddings().weight.detach()  # (V_toy, H)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (vocab_size, H)
        emb.copy_(old[base_tok.pad_token_id].expand_as(emb))  # unused ids: the never-predicted <pad> row
        emb[:old.shape[0]] = old
        ids = [tok.convert_tokens_to_ids(x) for x in SPECIAL]
        emb[ids[0]] = old[base_tok.bos_token_id]
        emb[ids[3]] = old[base_tok.eos_token_id]
        emb[ids[1]] = emb[ids[2]] = old.mean(0)
    return model


def fit(model, tok, steps: int, batch: int, lr: float, seed: int):
    """`steps` AdamW steps on toy pretraining documents rendered through the chat template
    (toy_pretrain.encode_batch: solutions with slips, meta-prover and retry examples), on the small
    model whose rows are the tokenizer's ids plus one row standing for all unused ids. Those
    are equal rows in the full model (and the embedding is tied, so they only ever act as
    output rows): the full 128,256-way softmax is this (len(tok) + 1)-way one with log(number
    of unused ids) added to the last logit, so the loss is the full model's exactly, without
    a (tokens, 128,256) logit tensor. Returns the losses and the probability mass on unused
    ids at the completion positions of each step."""
    import math

    import torch

    import toy
    import toy_pretrain

    rng = random.Random(seed)
    torch.manual_seed(seed)
    n_ids = len(tok)
    shift = torch.zeros(n_ids + 1)
    shift[n_ids] = math.log(VOCAB_SIZE - n_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses, unused = [], []
    for step in range(steps):
        problems = [toy.make_problem(rng) for _ in range(batch)]
        ids, attn, loss_mask = toy_pretrain.encode_batch(tok, problems, rng, slip=0.1, mu_frac=0.15, retry_frac=0.3)  # (B, T)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1] + shift  # (B, T-1, n_ids + 1)
        keep = loss_mask[:, 1:] > 0  # (B, T-1)
        loss = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        with torch.no_grad():
            unused.append(logits[keep].softmax(-1)[:, n_ids].mean().item())
    model.eval()
    return losses, unused


def expand(small, tok):
    """The full-vocabulary model: the small model's body and rows, its last row (the unused
    ids' row) repeated over every id from len(tok) to VOCAB_SIZE - 1."""
    import torch

    big = make_model(small, tok, tok, VOCAB_SIZE)
    n_ids = len(tok)
    with torch.no_grad():
        src = small.get_input_embeddings().weight  # (n_ids + 1, H)
        emb = big.get_input_embeddings().weight  # (VOCAB_SIZE, H)
        emb[:n_ids] = src[:n_ids]
        emb[n_ids:] = src[n_ids]
    return big


def build_realistic(out_dir: str, base: str | None = None, steps: int = 60, batch: int = 32, lr: float = 1e-3,
                    seed: int = 0) -> str:
    """Build (once per content) the realistic-shape model under out_dir; return its folder."""
    import torch

    base = base or default_base()
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise FileNotFoundError(f"{base}: no toy base model (build it with `python toy.py`)")
    params = dict(steps=steps, batch=batch, lr=lr, seed=seed)
    path = os.path.join(out_dir, _key(base, params))
    if os.path.isfile(os.path.join(path, "build.json")):
        return path
    t0 = time.time()
    base_tok = utils.load_tokenizer(base)
    base_model = utils.load_model(base, "float32", "cpu")
    tok = make_tokenizer(base)
    small = make_model(base_model, base_tok, tok, len(tok) + 1)
    losses, unused = fit(small, tok, steps, batch, lr, seed)
    model = expand(small, tok).to(torch.bfloat16)
    with utils.atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        utils.write_json(os.path.join(tmp, "build.json"),
                         {"base": os.path.abspath(base), **params, "tokenizer_ids": len(tok), "vocab_size": VOCAB_SIZE,
                          "loss_first": losses[0], "loss_last": losses[-1],
                          "unused_mass_first": unused[0], "unused_mass_last": unused[-1], "seconds": round(time.time() - t0, 1)})
    return path


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "realistic"))
    p.add_argument("--base", default=None)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    print(build_realistic(a.out, a.base, steps=a.steps))
