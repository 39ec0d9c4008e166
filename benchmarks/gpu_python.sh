# Sourced by the GPU benchmark scripts: cd to the repository root, pick the interpreter into
# $PY (PYTHON=..., else .venv/bin/python, else python3), run from source, and stop early when
# torch sees no CUDA GPU.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
