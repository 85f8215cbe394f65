#!/usr/bin/env bash
# Issues 15 and 26: the GPU figures (bench/gpu.py; method and figures: bench/README.md).
#   bash bench/gpu.sh [--out DIR] [--budget-s 450]   a CUDA machine, under 8 minutes
#   bash bench/gpu.sh --only batches,prefill,quantized-sft-compiled   the rows one run leaves out
#   bash bench/gpu.sh --profile                     one profiled decode step per side (profile.md)
#   bash bench/gpu.sh --smoke [--out DIR]           a tiny shape on CPU, the same code path
# Python: $PYTHON, else the project's .venv, else python3 (a GPU image's own PyTorch). Wheels in
# .whl/ (packages that machine lacks, see bench/README.md) are installed into /tmp first when
# that Python cannot import pydantic.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Wheels are for an image's own python3 that lacks our packages (the GPU image has no pydantic);
# a Python with the project installed (its .venv, $PYTHON in the tests) is left as it is.
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/reempathy-site .whl/*.whl
  export PYTHONPATH="/tmp/reempathy-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" bench/gpu.py "$@"
