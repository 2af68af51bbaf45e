#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: unit tests on tiny random Llama models,
# property tests (hypothesis) and a few tests on the embedded SmolLM2-135M model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
