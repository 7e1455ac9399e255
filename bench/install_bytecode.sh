#!/usr/bin/env bash
# bench/install_bytecode.sh: where install.sh's pip path (MRT_INSTALLER=pip, or no uv) spends its time
# compiling bytecode, side by side.
#
# Installs requirements-cpu.txt (as install.sh does on a machine without a GPU) into two fresh
# virtual environments under a temporary folder, one after the other:
#   pip      `pip install -r ...`: pip writes every installed module's .pyc itself, one file
#            at a time on one core
#   compileall  `MRT_INSTALLER=pip bash install.sh` in a copy: `pip install --no-compile -r ...`,
#            the uninstall, then `python -m compileall -j 0` over site-packages: the same .pyc
#            files, written on every core
# and prints each one's install seconds, its .pyc count, and the seconds of a first import of
# torch, transformers (LlamaForCausalLM) and vllm in it (a .pyc missing there would show up as a
# slower import: processes here run with PYTHONDONTWRITEBYTECODE=1, so nothing is compiled
# lazily and kept). Needs the package index install.sh uses; takes a few minutes.
#
#     bash bench/install_bytecode.sh [python3]
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without the '# '
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
PY=${1:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
now() { date +%s.%N; }
for mode in pip compileall; do
  dir=$tmp/$mode
  venv=$dir/.venv
  mkdir -p "$dir"
  t0=$(now)
  if [ "$mode" = pip ]; then
    "$PY" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r requirements-cpu.txt
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  else  # install.sh's pip path itself, run in a copy (on a machine without a GPU: requirements-cpu.txt)
    cp install.sh requirements*.txt "$dir/"
    MRT_INSTALLER=pip PYTHON="$PY" bash "$dir/install.sh"
  fi
  t1=$(now)
  pycs=$(find "$venv" -name "*.pyc" | wc -l)
  "$venv/bin/python" -c "import torch, transformers, vllm; from transformers import LlamaForCausalLM" 2>/dev/null
  t2=$(now)
  "$PY" -c "print(f'$mode: install {$t1 - $t0:.1f} s, {$pycs} .pyc files, first import {$t2 - $t1:.1f} s')"
done
