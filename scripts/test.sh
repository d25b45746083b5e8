#!/usr/bin/env bash
# The test command: install everything from scratch, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test_env.sh
python -m pytest tests -q "$@"
