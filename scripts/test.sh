#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on tiny random Llama models,
# property tests (hypothesis) and a few tests on the embedded SmolLM2-135M model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
# Two pytest workers (pytest-xdist), one thread each, also in the processes tests start (notebook
# kernels, CLI runs): on 2 cores 10.6 min instead of 15.9 for the whole suite from empty caches.
# LEDE_TEST_WORKERS=0 runs everything in this process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${LEDE_TEST_WORKERS:-2}" --dist worksteal "$@"
