#!/usr/bin/env bash
# Prepare what bench/gpu_check.py and tests/test_gpu.py need on the GPU device machine, which has
# torch (CUDA) and its own transformers but cannot reach any package registry: run here, once.
#
#   bench/gpu_wheels.sh                 # -> .gpu/a (wheels, tokenizer, GGUF part 0), .gpu/b (GGUF part 1)
#   WITH_STORAGE=1 bench/gpu_wheels.sh  # also the storage stack (then the GGUF may need a third call, .gpu/c)
#
# One device call carries at most 64 MiB and the embedded GGUF is 94 MiB, so it travels in parts,
# one per call (bench/README.md, "GPU check", has the commands). The versions are this virtualenv's,
# so the device runs what the tests here run. What importing the worker path (bot.worker.engine,
# .loading, .server) and tests/test_gpu.py needs that the device lacks, or has in other versions:
# transformers >= 5 with huggingface_hub 2 (httpx2, httpcore2, truststore), tokenizers,
# safetensors, accelerate, bitsandbytes (nf4), gguf (the GGUF's conversion), typing_extensions, and
# pytest-asyncio (pyproject's asyncio_mode). The worker path imports no storage code: sqlalchemy,
# greenlet, aiosqlite, alembic and mako come only with WITH_STORAGE=1 (for wider test modules).
# bitsandbytes is repacked with its CPU kernels and CUDA $BNB_CUDA's only (43 MB -> ~4 MB): the
# device's torch was a CUDA 13.0 build (KINDS.md); check `torch.version.cuda` there if nf4 fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}          # the device's python3
LIMIT_MIB=${LIMIT_MIB:-60}    # per call, leaving room for the working tree under the 64 MiB limit
BNB_CUDA=${BNB_CUDA:-130}     # the bitsandbytes kernels kept: libbitsandbytes_cuda$BNB_CUDA.so
export LIMIT_MIB BNB_CUDA

grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/a .gpu/b .gpu/c .gpu/d
mkdir -p .gpu/a/wheels

version() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
names=(transformers huggingface_hub tokenizers safetensors accelerate httpx2 httpcore2 truststore gguf bitsandbytes
       typing_extensions pytest_asyncio)
if [ "${WITH_STORAGE:-0}" = 1 ]; then names+=(sqlalchemy greenlet aiosqlite alembic mako); fi
specs=()
for name in "${names[@]}"; do specs+=("$name==$(version "$name")"); done
echo "downloading: ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .gpu/a/wheels "${specs[@]}" 2> >(grep -v "^WARNING: Location" >&2)

"$PY" "$(dirname "$0")/gpu_stage.py"
du -sh .gpu/?
