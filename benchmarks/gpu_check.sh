#!/usr/bin/env bash
# Device check of qkcov on one GPU (under 8 minutes): CUDA bfloat16 capture parity, ΔC on
# CUDA = ΔC on CPU, a timed `qkcov run` on an 8B-shaped Llama. See benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            # needs CUDA
#   bash benchmarks/gpu_check.sh --dry-run  # the same code on CPU with a tiny model (< 1 min)
# PYTHON selects the interpreter (default python3); this checkout's src/ comes first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
