#!/usr/bin/env bash
# The GPU check: one JSON object on stdout (evals/bench/gpu_check.py says what each check shows).
# Under 8 minutes on one H100; `--smoke` runs tiny shapes on any machine (CUDA-only checks skipped).
#   scripts/gpu-check.sh > gpu-check.json        scripts/gpu-check.sh --smoke --only counter_rng
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m evals.bench.gpu_check "$@"
