#!/usr/bin/env bash
# bench/installer.sh: install.sh with uv against install.sh with pip, side by side.
#
# Copies install.sh and the requirements files into two fresh folders under a temporary folder
# and runs install.sh in each, one after the other: `MRT_INSTALLER=pip bash install.sh` (pip,
# then compileall on every core) and `bash install.sh` (uv, its default). Prints each one's
# install seconds, its .pyc count and the seconds of a first import of torch, transformers
# (LlamaForCausalLM) and vllm in it, then whether the two environments hold the same packages
# at the same versions (names normalized; pip, setuptools and uv themselves left out). Each starts with an
# empty download cache (PIP_CACHE_DIR, UV_CACHE_DIR under the temporary folder). Needs
# the package index install.sh uses; takes a few minutes.
#
#     bash bench/installer.sh
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without the '# '
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
now() { date +%s.%N; }
for mode in pip uv; do
  dir=$tmp/$mode
  mkdir -p "$dir"
  cp install.sh requirements*.txt "$dir/"
  t0=$(now)
  # each with an empty download cache of its own, as on a fresh machine
  MRT_INSTALLER=$mode PIP_CACHE_DIR=$tmp/pip-cache UV_CACHE_DIR=$tmp/uv-cache bash "$dir/install.sh"
  t1=$(now)
  pycs=$(find "$dir/.venv" -name "*.pyc" | wc -l)
  "$dir/.venv/bin/python" -c "import torch, transformers, vllm; from transformers import LlamaForCausalLM" 2>/dev/null
  t2=$(now)
  "$dir/.venv/bin/python" -m pip list --format freeze 2>/dev/null \
    | tr 'A-Z_' 'a-z-' | grep -v -E '^(pip|setuptools|uv)==' | sort > "$tmp/$mode.txt"
  python3 -c "print(f'$mode: install {$t1 - $t0:.1f} s, {$pycs} .pyc files, first import {$t2 - $t1:.1f} s, $(wc -l < "$tmp/$mode.txt") packages')"
done
if diff "$tmp/pip.txt" "$tmp/uv.txt"; then
  echo "same packages, same versions"
else
  echo "the package sets differ (above: < pip, > uv)"
fi
