"""FSDP2 under `torchrun --nproc_per_node 2` (CPU, gloo) against a single process: one
AdamW step gives the same loss, gradients and weights; checkpoints round-trip; the saved
Hugging Face checkpoint loads in transformers; and, in the same torchrun, every rank's own
vLLM engine samples its own prompt and takes weights from the sharded model
(`sync_weights`). The worker is tests/fsdp_step.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fsdp_step
import training
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "fsdp_step.py")


@pytest.fixture(scope="module")
def runs(toy_paths, tmp_path_factory):
    """The torchrun (2 ranks, with sampling) in a subprocess; meanwhile the single-process
    reference, the same worker code, in this process."""
    one, two = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           "--base", toy_paths["base"], "--out", str(two), "--sample"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("log") / "torchrun.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            fsdp_step.run(toy_paths["base"], str(one))
            proc.wait(timeout=500)
        finally:
            proc.kill()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{open(log).read()[-4000:]}"
    load = lambda d: torch.load(os.path.join(d, "result.pt"), weights_only=False)  # noqa: E731
    return {"one": load(one), "two": load(two), "dirs": (one, two), "log": open(log).read()}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_step_equals_single_process(runs, toy_paths):
    one, two = runs["one"], runs["two"]
    assert (one["world"], two["world"]) == (1, 2)
    t0, t1 = two["tokens"]
    assert t0 != t1 and t0 + t1 == one["tokens"][0]  # unequal loss tokens per rank: normalisation matters
    assert abs(one["loss"] - two["loss"]) < 1e-6 * max(1.0, one["loss"])
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * one["grad_norm"]
    assert one["grad_norm"] > 0.1  # the clip (0.1) acted
    g_scale = max(v.abs().max().item() for v in one["grads"].values())
    assert max_diff(one["grads"], two["grads"]) < 1e-5 * g_scale
    base = training.full_state_dict(utils.load_model(toy_paths["base"], dtype="float32", device="cpu"))
    assert max_diff(base, one["state"]) > 1e-3  # the step moved the weights (lr 3e-3)
    # AdamW's first update is lr * g / (|g| + eps) per element (its moments start at zero), after
    # the decay w * (1 - lr * wd): each run took exactly that step on its own gradients.
    lr, wd, eps = 3e-3, 0.1, 1e-8  # tests/fsdp_step.py's optimizer
    for r in (one, two):
        for k, g in r["grads"].items():
            want = base[k] * (1 - lr * wd) - lr * g / (g.abs() + eps)
            assert (want - r["state"][k]).abs().max().item() < 1e-6, k
    # Where |g| is near eps, the ranks' different summation order (grads agree to ~1e-8) moves
    # that update by up to lr itself, by an amount that depends on the model (a 3-layer build of
    # the toy: 1.2e-4, 3.9% of lr). Wherever the first gradient is clear of eps, the two runs'
    # weights agree after one step and after the second (taken on the same batch); that is 69-88%
    # of the entries on the builds tried.
    clear = {k: torch.maximum(g.abs(), two["grads"][k].abs()) > 1e-4 * g_scale for k, g in one["grads"].items()}
    assert sum(c.sum().item() for c in clear.values()) > 0.5 * sum(c.numel() for c in clear.values())
    for key, tol in (("state", 5e-6), ("second", 5e-5)):  # seen: up to 2.6e-7 and 5.6e-6
        assert max(((one[key][k] - two[key][k]).abs() * c).max().item() for k, c in clear.items()) < tol, key


def test_loaded_once_and_scattered(runs, toy_paths):
    """load_trainer under torchrun (rank 0 reads the safetensors file in pieces of rows
    and sends each rank its rows into its meta-built shards) gives the weights on disk, for
    the policy and the reference, embeddings tied."""
    from transformers import AutoModelForCausalLM

    disk = AutoModelForCausalLM.from_pretrained(toy_paths["base"], dtype=torch.float32).state_dict()
    for r in (runs["one"], runs["two"]):
        assert max_diff(r["loaded"], disk) == 0.0 and max_diff(r["ref_state"], disk) == 0.0
        assert r["tied"]
    assert "loads the model whole" not in runs["log"]  # rank 0 read the safetensors file tensor by tensor


def test_checkpoint_round_trip(runs):
    for r in (runs["one"], runs["two"]):
        assert r["extra"] == {"world_size": r["world"], "step": 1}
        assert max_diff(r["state"], r["restored"]) == 0.0
        # the restored optimizer (Adam moments, step count) takes exactly the same next step
        assert max_diff(r["second"], r["second_restored"]) == 0.0
        assert max_diff(r["state"], r["second"]) > 1e-4


def test_save_pretrained_loads_in_transformers(runs):
    """One file by default; with a small shard_bytes, several files and the index that
    transformers writes for sharded checkpoints; both load back to the same weights."""
    from transformers import AutoModelForCausalLM

    for r, d in zip((runs["one"], runs["two"]), runs["dirs"]):
        for folder in ("hf", "hf_parts"):
            m = AutoModelForCausalLM.from_pretrained(os.path.join(d, folder))
            assert max_diff(m.state_dict(), r["second"]) == 0.0, folder
            assert m.lm_head.weight is m.model.embed_tokens.weight  # tied again on load
            assert utils.load_tokenizer(os.path.join(d, folder)).eos_token_id == m.config.eos_token_id
        files = sorted(f for f in os.listdir(os.path.join(d, "hf_parts")) if f.endswith(".safetensors"))
        index = json.load(open(os.path.join(d, "hf_parts", "model.safetensors.index.json")))
        assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
        assert "model.safetensors" in os.listdir(os.path.join(d, "hf"))
        assert [f for f in os.listdir(d) if f.startswith(".tmp")] == []


def test_scatter_and_gather_with_uneven_shards(runs):
    """Rows not divisible by the ranks: 5 rows as 3 + 2, 1 row as 1 + 0 (torch.chunk, as
    FSDP2 lays them out); what rank 0 scattered comes back whole, and each rank got its rows."""
    got = torch.load(os.path.join(runs["dirs"][1], "uneven.pt"))
    assert [g["weight"] for g in got["rows"]] == [3, 2] and [g["bias"] for g in got["rows"]] == [3, 2]
    assert [g["one bias"] for g in got["rows"]] == [1, 0]
    for name, t in got["wanted"].items():
        assert torch.equal(got["back"][name], t), name
    assert torch.equal(got["back"]["one bias"], torch.tensor([7.0]))


def test_sampler_per_rank_under_torchrun(runs):
    _, two = runs["dirs"]
    ranks = [json.load(open(os.path.join(two, f"sample_{r}.json"))) for r in (0, 1)]
    assert ranks[0]["prompt"] != ranks[1]["prompt"]
    assert ranks[0]["before"] != ranks[1]["before"]
    for s in ranks:
        assert s["before"] == s["before_ref"]  # each rank's engine on its own prompt
        assert s["after"] == s["after_ref"]    # after sync from the FSDP2-sharded model
        assert s["stale_gap"] > 0.05           # the engine had the old weights before the sync
        assert s["fresh_gap"] < 1e-3           # and the trainer's weights after it
    # unseeded requests: ranks do not repeat each other's samples (engine seed + rank)
    assert ranks[0]["unseeded"] != ranks[1]["unseeded"]


def test_rank0_reader_of_safetensors_and_of_bin_weights(toy_paths, tmp_path, capsys):
    """training._weights_of, rank 0's reader at load: rows of a safetensors file read when
    indexed; a folder of .bin weights (no safetensors) is loaded whole instead, with a line
    saying so. Both hand out the weights on disk."""
    from transformers import AutoModelForCausalLM

    disk = AutoModelForCausalLM.from_pretrained(toy_paths["base"], dtype=torch.float32)
    names = [n for n, _ in training._state_entries(disk)]
    read = training._weights_of(toy_paths["base"], names)
    for n in names:
        t = read(n)
        assert isinstance(t, training._DiskTensor)
        assert torch.equal(t[1:3].float(), disk.state_dict()[n][1:3])
    disk.save_pretrained(tmp_path / "bin")  # then the weights as a .bin file only
    os.remove(tmp_path / "bin" / "model.safetensors")
    torch.save(disk.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    read = training._weights_of(str(tmp_path / "bin"), names)
    assert "loads the model whole" in capsys.readouterr().out
    for n in names:
        assert torch.equal(read(n)[:], disk.state_dict()[n])


# --------------------------------------------------------------------------------------
# Memory and speed on FSDP2 shards (worker: tests/fsdp_memory.py, its own torchrun)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_run(toy_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "fsdp_memory.py"), "--base", toy_paths["base"], "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return torch.load(os.path.join(out, "memory.pt"), weights_only=False)


def test_weight_sync_source_in_buckets_in_the_engine_dtype(memory_run):
    """iter_full_params: shards cast to the engine's dtype and gathered in buckets give exactly the
    tensors of each entry gathered whole in fp32 and cast after (tied weights gathered once, uneven
    shards included); one all-gather per bucket."""
    it = memory_run["iter"]
    entries = it["entries"]  # distinct tensors of the toy's state dict (the tied pair once)
    for dtype in ("None", "torch.bfloat16"):
        assert all(it[(dtype, b)]["same"] for b in (1, 64 * 1024, None)), dtype
        assert it[(dtype, 1)]["gathers"] == entries and it[(dtype, None)]["gathers"] == 1
        assert 1 < it[(dtype, 64 * 1024)]["gathers"] < entries
    assert it[("torch.bfloat16", 64 * 1024)]["gathers"] < it[("None", 64 * 1024)]["gathers"]  # half the bytes
    assert it["tied_once"]
    assert it["uneven"]["same"] and it["uneven"]["gathers"] == 1 and it["uneven"]["rows"] == [3, 3, 1, 1]


def test_gradients_reduced_once_per_accumulation(memory_run):
    """gradient_sync off for the first of two micro-batches: no gradient is reduced after it, and
    the gradient reduced once after the second equals the one reduced after each."""
    g = memory_run["grads"]
    assert g["skipped"]
    scale = max(v.abs().max().item() for v in g["each"].values())
    assert scale > 0.1 and max_diff(g["each"], g["once"]) < 1e-6 * scale


def test_reference_sharded_in_the_compute_dtype(memory_run):
    """load_trainer(..., reference=True) with bf16 compute under torchrun: the reference's shards
    are bf16 (the policy's stay fp32 masters), and both compute the same log-probabilities,
    exactly: FSDP2 casts the policy's weights to bf16 for its forward."""
    for r in memory_run["reference"]:
        assert r["ref_dtypes"] == ["torch.bfloat16"] and r["policy_dtypes"] == ["torch.float32"]
        assert r["ref_sharded"] and r["equal"] and r["tokens"] > 100


def test_hf_sampler_sync_copies_into_its_own_tensors(memory_run):
    """The transformers fallback takes the sharded trainer's weights tensor by tensor into its
    own storage (no state dict of the whole model is built), on every rank."""
    assert memory_run["hf_sync"] == [{"equal": True, "in_place": True}] * 2


def test_every_buffer_as_from_pretrained(runs, toy_paths):
    """The trainer built on the meta device and sharded under torchrun (policy and reference)
    holds every buffer of the model from_pretrained builds, the non-persistent rotary
    frequencies (never in a checkpoint) included, on every rank."""
    from transformers import AutoModelForCausalLM

    disk = AutoModelForCausalLM.from_pretrained(toy_paths["base"], dtype=torch.float32)
    want = dict(disk.named_buffers())
    assert any(n not in disk.state_dict() for n in want)  # a non-persistent buffer is among them
    for r in (runs["one"], runs["two"]):
        assert len(r["buffers"]) == r["world"]
        for got in r["buffers"]:
            assert sorted(got) == sorted([*want, *("ref." + n for n in want)])
            for n, b in got.items():
                assert torch.equal(b, want[n.removeprefix("ref.")]), n


def test_meta_build_computes_buffers_without_transformers_initializer(toy_paths, monkeypatch):
    """training._sharded_on_meta takes the buffers from the modules' own constructors, not from
    transformers' private `_init_weights` (which other transformers versions may not have fill
    them): with it made a no-op, the buffers still equal from_pretrained's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    disk = AutoModelForCausalLM.from_pretrained(toy_paths["base"], dtype=torch.float32)
    for cls in type(disk).__mro__:
        if "_init_weights" in cls.__dict__:
            monkeypatch.setattr(cls, "_init_weights", lambda self, module: None)
    model = training._sharded_on_meta(toy_paths["base"], AutoConfig.from_pretrained(toy_paths["base"]), "cpu",
                                      False, None)  # one process: not sharded
    for n, b in disk.named_buffers():
        assert torch.equal(model.get_buffer(n), b), n
