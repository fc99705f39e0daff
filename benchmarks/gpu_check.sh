#!/usr/bin/env bash
# The GPU check of issue 19: one command on a lent GPU machine (docs/kernels.md).
#
#   benchmarks/gpu_check.sh             install offline (.whl/ + the project), then
#                                       pytest -m gpu, kernels, end to end, runtime
#   benchmarks/gpu_check.sh --dry-run   the same steps on the CPU at toy sizes, no install
#
# Everything lands in $OUT (default: ./out/gpu-check): summary.json, summary.md,
# gpu_check.log, pytest.xml, kernels.json. PYTHON picks the interpreter (default
# python3). Extra arguments go to benchmarks/gpu_check.py (e.g. --budget-s 420).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OUT="${OUT:-$ROOT/out/gpu-check}"
export PYTHONUNBUFFERED=1 ORT_DISABLE_TELEMETRY=1
mkdir -p "$OUT"
cd "$ROOT"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT" "$@"
