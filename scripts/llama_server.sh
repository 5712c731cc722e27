#!/usr/bin/env bash
# Installs llama-cpp-python[server] into the venv from a wheel cached per CPU feature set. Why cached: it compiles
# from source (~9 min on 2 cores) and a wheel built for one CPU's ISA may crash on another, so the key is the flags.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=0.3.36
PIP="$VENV/bin/python -m pip"
if "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  exit 0
fi
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12 || echo generic)
CACHE=${QUANTSAFE_WHEEL_CACHE:-$HOME/.cache/quantsafe/wheels}/llama-cpp-python-$VERSION-$FLAGS
if ! ls "$CACHE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (first time on this CPU, about 9 minutes on 2 cores)" >&2
  mkdir -p "$CACHE.tmp"
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
    $PIP wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$CACHE.tmp"
  rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
fi
$PIP install -q "$CACHE"/llama_cpp_python-*.whl "llama-cpp-python[server]==$VERSION" --find-links "$CACHE"
