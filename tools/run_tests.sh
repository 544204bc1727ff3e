#!/usr/bin/env bash
# Set up ./.venv if needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m "not slow"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$ROOT/.venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
