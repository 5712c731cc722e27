#!/usr/bin/env bash
# One command for a lent GPU: GPTQ 4-bit, generation and the fast judge on OpenSafetyMini prompts, GPU verdicts
# against CPU verdicts; writes bench/results/gpu.json (see bench/gpu_check.py --help for every option).
#
# Needs only Python with PyTorch and transformers plus quantsafe's pure-Python dependencies (pydantic, rich, ...:
# `pip install --no-deps <wheels>` if the machine has no index); quantsafe itself is used from src/, not installed.
# Data: OpenSafetyMini and wikitext-2 (calibration) under $QUANTSAFE_DATA_DIR, default ../shared/data.
# Where the model's weights cannot go (no internet, small uploads), write its skeleton here and use random weights:
#   scripts/gpu_check.sh --save-skeleton shared/skeleton          # on this machine: config + tokenizer, ~10 MB
#   scripts/gpu_check.sh --random-init --model shared/skeleton --data-dir shared/data   # on the GPU machine
# On a CPU, tiny: scripts/gpu_check.sh --device cpu --model smollm2-135m --n-prompts 4 --max-new-tokens 8
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
"$PY" - <<'PYEOF'
import importlib.util
import sys

sys.path.insert(0, "bench")
# imported only when used, so a missing one would otherwise surface minutes later as a traceback
for name in ("torch", "transformers", "tokenizers", "safetensors"):
    if importlib.util.find_spec(name) is None:
        sys.exit(f"gpu_check: missing Python package '{name}'; install it (pip install {name}) and rerun")
try:
    import gpu_check  # noqa: F401  # quantsafe's own imports, all of them
except ModuleNotFoundError as err:
    sys.exit(f"gpu_check: missing Python package '{err.name}' (a quantsafe dependency, see pyproject.toml); "
             f"pip install it, or its wheel with --no-deps, and rerun")
PYEOF
exec "$PY" bench/gpu_check.py "$@"
