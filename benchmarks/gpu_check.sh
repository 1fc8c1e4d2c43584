#!/usr/bin/env bash
# The GPU acceptance suite (benchmarks/gpu_check.py): every CUDA-only path of kd in one run,
# under 8 minutes on one GPU, results in gpu_check.json at the repository root. Arguments pass
# through, e.g. --only a,e or --out /tmp/gpu.json (the last --out wins).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py --out gpu_check.json "$@"
