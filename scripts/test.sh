#!/usr/bin/env bash
# The whole test suite on CPU: unit, 2- and 4-process gloo tests, and end-to-end CLI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# pytest exits 5 when it collects nothing: that is a failure here too (set -e propagates it).
python -m pytest tests "$@"
