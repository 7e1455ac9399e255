"""install.sh without installing anything: its one-line refusals of an unknown installer and of a
Python outside vLLM's range (a fake `python3` that reports a version), the pip settings it hands uv
(the Python it runs for that, taken from install.sh itself and run here against pip configurations
written for the test), and its decision to add PyTorch's CPU wheel index (its bash function, run
with this Python's pip against local indexes and find-links folders written for the test)."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_installer_is_one_line_and_creates_nothing(tmp_path):
    shutil.copy(os.path.join(ROOT, "install.sh"), tmp_path)
    r = subprocess.run(["bash", str(tmp_path / "install.sh")], env=dict(os.environ, MRT_INSTALLER="conda"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["install.sh: MRT_INSTALLER must be uv or pip, not 'conda'"]
    assert sorted(os.listdir(tmp_path)) == ["install.sh"]  # no .venv


def _uv_flags(tmp_path, conf: str | None, env: dict) -> list[str]:
    """The flags install.sh's pip-settings script prints, with `conf` as pip's config file loaded
    last (over the machine's own files) or, for None, no config file at all; PIP_* variables:
    `env` alone."""
    script = re.search(r"<<'EOF2'\n(.*?)\nEOF2\n", open(os.path.join(ROOT, "install.sh")).read(), re.S).group(1)
    path = os.devnull
    if conf is not None:
        path = str(tmp_path / "pip.conf")
        open(path, "w").write(conf)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**base, "PIP_CONFIG_FILE": path, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_pip_settings_handed_to_uv(tmp_path):
    # every key set in [global], so the machine's own files (loaded before this one) show through nowhere
    conf = ("[global]\nindex-url = https://mirror.example/simple\nextra-index-url = file:///global/simple\n"
            "find-links = /wheels/global\nconstraint = /etc/c.txt\n[install]\nfind-links = /wheels/install\n")
    # [install] overrides [global] for `pip install`; a PIP_* variable overrides both; several
    # values are space-separated
    flags = _uv_flags(tmp_path, conf, {"PIP_EXTRA_INDEX_URL": "file:///a/simple file:///b/simple"})
    assert sorted(flags) == sorted(["--index-url=https://mirror.example/simple", "--extra-index-url=file:///a/simple",
                                    "--extra-index-url=file:///b/simple", "--find-links=/wheels/install",
                                    "--constraint=/etc/c.txt"])
    assert "--find-links=/wheels/env" in _uv_flags(tmp_path, conf, {"PIP_FIND_LINKS": "/wheels/env"})
    assert "--extra-index-url=file:///global/simple" in _uv_flags(tmp_path, conf, {})
    # nothing configured: no flags (uv's own default, PyPI)
    assert _uv_flags(tmp_path, None, {}) == []


def _fake_python(tmp_path, version: str):
    """A `python` that reports `version` to install.sh's version check and stops, exit 3, with a
    line naming what it was asked for anything else (so the test can see the check let it past)."""
    path = tmp_path / "bin" / "python3"
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo {version}; exit 0; fi\n'
                    'echo "fake python: $*" >&2; exit 3\n')
    path.chmod(0o755)
    return str(path)


def _run_install(tmp_path, python: str) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "install.sh"), repo)
    return subprocess.run(["bash", str(repo / "install.sh")], env=dict(os.environ, PYTHON=python),
                          capture_output=True, text=True, timeout=60)


def test_old_python_is_one_line_and_creates_nothing(tmp_path):
    py = _fake_python(tmp_path, "3.10.12")  # Ubuntu 22.04's python3
    r = _run_install(tmp_path, py)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"install.sh: mrt needs Python 3.11 to 3.14 (vLLM 0.32's range); {py} is Python 3.10.12: "
        "set PYTHON to one (e.g. PYTHON=python3.11 bash install.sh)"]
    assert os.listdir(tmp_path / "repo") == ["install.sh"]  # no .venv


def test_python_range_edges(tmp_path):
    cases = [("3.11.0", True), ("3.14.2", True), ("3.15.0", False), ("3.9.18", False), ("2.7.18", False),
             ("4.0.0", False)]
    for i, (version, passes) in enumerate(cases):
        r = _run_install(tmp_path / str(i), _fake_python(tmp_path / str(i), version))
        if passes:  # past the check: install.sh asks the (fake) python for its venv
            assert (r.returncode, r.stderr) == (3, "fake python: -m venv .venv\n"), version
        else:
            assert r.returncode == 2 and f"is Python {version}: set PYTHON" in r.stderr, (version, r.stderr)
    r = _run_install(tmp_path / "missing", str(tmp_path / "no-such-python"))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"install.sh: mrt needs Python 3.11 to 3.14 (vLLM 0.32's range); {tmp_path / 'no-such-python'} is no "
        "runnable Python: set PYTHON to one (e.g. PYTHON=python3.11 bash install.sh)"]


def _cpu_torch_index(tmp_path, index: str | None, links: list[str], extra: list[str] = ()) -> str:
    """What install.sh's cpu_torch_index prints (PyTorch's CPU wheel index, or nothing) when pip's
    configuration holds only: an index whose torch page lists `extra` files (`index` None: an index
    without torch) and a find-links folder holding (empty) files named `links`. All local: no
    network. Its pip is this Python's."""
    fn = re.search(r"^cpu_torch_index\(\) \{\n.*?^\}\n", open(os.path.join(ROOT, "install.sh")).read(),
                   re.S | re.M).group(0)
    idx, found = tmp_path / "simple", tmp_path / "links"
    (idx / "torch").mkdir(parents=True)
    found.mkdir()
    if index is not None:
        (idx / "torch" / "index.html").write_text("".join(f'<a href="{f}">{f}</a>\n' for f in extra))
    for f in links:
        (found / f).touch()
    conf = tmp_path / "pip.conf"  # every key in [global]: the machine's own files (loaded before) show nowhere
    conf.write_text(f"[global]\nindex-url = {(tmp_path / 'empty').as_uri()}\n"
                    f"extra-index-url = {idx.as_uri()}\nfind-links = {found}\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    r = subprocess.run(["bash", "-c", f"set -euo pipefail\n{fn}cpu_torch_index \"$0\"", sys.executable],
                       cwd=ROOT, env={**base, "PIP_CONFIG_FILE": str(conf)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cpu_torch_index_added_only_when_configured_indexes_lack_the_cpu_build(tmp_path):
    pins = open(os.path.join(ROOT, "requirements-cpu.txt")).read()
    ver = re.search(r"^torch==([\d.]+)", pins, re.M).group(1)
    url = "https://download.pytorch.org/whl/cpu\n"
    # nothing, or only PyPI's CUDA build and a +cpu file for another Python: the index is added
    assert _cpu_torch_index(tmp_path / "a", None, []) == url
    other_python = f"torch-{ver}+cpu-cp30-cp30-manylinux_2_28_x86_64.whl"
    assert _cpu_torch_index(tmp_path / "b", "", [f"torch-{ver}-py3-none-any.whl", other_python]) == url
    assert _cpu_torch_index(tmp_path / "c", "", [f"torch-1{ver}+cpu-py3-none-any.whl"]) == url  # other version
    # the +cpu build in find-links (this machine) or in a configured index: nothing added
    assert _cpu_torch_index(tmp_path / "d", None, [f"torch-{ver}+cpu-py3-none-any.whl"]) == ""
    assert _cpu_torch_index(tmp_path / "e", "", [], extra=[f"torch-{ver}+cpu-py3-none-any.whl"]) == ""
