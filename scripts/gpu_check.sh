#!/usr/bin/env bash
# The checks of the CUDA copy path that need a GPU (issue 22), as one run on a lent GPU box that
# has CUDA torch and triton but no vLLM and no network: the kernel test tier (test_cuda.py runs
# only there), the Triton kernel's self-check, and the copy benchmark (triton vs per-block DMA).
# Logs and JSON go under $OUT (default ./gpu-out); the exit status is non-zero if any step failed.
#   bash scripts/gpu_check.sh            BENCH_ARGS="--repeats 5" bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
# The checkout on the path rather than `pip install -e .`: an editable build wants setuptools from
# the network, and the runtime dependencies (rich, prometheus_client) serve only the CLI.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

"$PYTHON" - >"$OUT/env.json" <<'PY'
import json

import torch

try:
    import triton

    triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "triton": triton_version,
    "device": torch.cuda.get_device_name() if cuda else None,
    "capability": list(torch.cuda.get_device_capability()) if cuda else None,
}, indent=2))
PY
cat "$OUT/env.json"

pytest_args=(tests/kernels -q -rs -p no:cacheprovider --junitxml="$OUT/kernels-junit.xml")
if ! "$PYTHON" -c "import hypothesis" 2>/dev/null; then  # only test_copy.py needs it
    echo "hypothesis is not installed: tests/kernels/test_copy.py skipped" | tee -a "$OUT/notes.txt"
    pytest_args+=(--ignore=tests/kernels/test_copy.py)
fi
"$PYTHON" -m pytest "${pytest_args[@]}" 2>&1 | tee "$OUT/kernels-tests.log" || status=1

"$PYTHON" -m vllm_bidkv.kernels.triton_copy 2>&1 | tee "$OUT/triton-self-check.log" || status=1

# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
"$PYTHON" -m vllm_bidkv_bench.copy --device cuda --json "$OUT/copy-cuda.json" ${BENCH_ARGS:-} 2>&1 |
    tee "$OUT/copy-cuda.log" || status=1

exit "$status"
