"""install.sh without installing anything: its one-line refusal of an unknown installer, and the
pip settings it hands uv (the Python it runs for that, taken from install.sh itself and run here
against pip configurations written for the test)."""

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
