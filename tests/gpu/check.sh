#!/usr/bin/env bash
# The prepared GPU check (issue 18): under 5 minutes on one GPU. Run it from the repository root
# in the project's environment on a machine with CUDA; the report goes to reports/benchmarks/.
#   bash tests/gpu/check.sh            # every check at 256 px
#   bash tests/gpu/check.sh --pack 1,2 # extra arguments go to check.py
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 600 python tests/gpu/check.py --device cuda "$@"
