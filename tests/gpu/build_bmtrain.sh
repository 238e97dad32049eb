#!/usr/bin/env bash
# Build a BMTrain 1.0.1 wheel for CPython 3.12 from its sdist with this machine's nvcc, for the GPU machine (which
# has Python 3.12 and a CUDA 13 torch, and no network): bash tests/gpu/build_bmtrain.sh SDIST DEST_DIR
#   - CUDA architectures BMTRAIN_ARCHS (default "80;90": A100/A800 and H100/H200); BMTrain's own list
#     (sm_61..sm_86) is refused by CUDA 13's nvcc and lacks Hopper;
#   - BUILD_DOCKER_ENV=1: BMTrain's default flags add -march=native, which would tie the wheel to this CPU;
#   - against the NCCL of the nvidia-nccl-cu13 wheel (what a CUDA 13 torch ships; libnccl.so.2 at run time).
# The build environment lives in a temp folder; only the wheel lands in DEST_DIR.
set -euo pipefail
sdist=$1 dest=$2
archs="${BMTRAIN_ARCHS:-80;90}"
cuda="${CUDA_HOME:-/usr/local/cuda-13.0}"
py="${PYTHON312:-}"
if [ -z "$py" ]; then
  for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then py=$c; break; fi
  done
fi
[ -n "$py" ] || { echo "build_bmtrain: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }
[ -x "$cuda/bin/nvcc" ] || { echo "build_bmtrain: no nvcc at $cuda/bin/nvcc (set CUDA_HOME)" >&2; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/fm-bmtrain-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$py" -m venv "$work/venv"
"$work/venv/bin/pip" install -q pybind11 "cmake>3.27" ninja setuptools wheel nvidia-nccl-cu13
tar xzf "$sdist" -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'bmtrain-*' | head -n 1)
"$work/venv/bin/python" "$(dirname "$0")/acceptance.py" --patch-cmake "$src" --archs "$archs"
nccl=$("$work/venv/bin/python" -c "import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])")
start=$SECONDS
PATH="$cuda/bin:$PATH" CUDACXX="$cuda/bin/nvcc" BUILD_DOCKER_ENV=1 NCCL_INCLUDE_DIR="$nccl/include" \
  NCCL_LIB_DIR="$nccl/lib" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$work/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$dest" "$src"
echo "built $(ls "$dest"/bmtrain-*-cp312-*.whl) for sm_${archs//;/, sm_} in $((SECONDS - start)) s"
