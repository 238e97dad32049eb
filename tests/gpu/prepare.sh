#!/usr/bin/env bash
# Prepares the folder the GPU acceptance run carries: .gpu_wheels/ (ignored by git), from the registries.
# Run it on a machine with the registries (this one), then start tests/gpu/run.sh on the GPU machine with
# .gpu_wheels carried along (the GPU machine has no network).
#
# The GPU image already holds torch, numpy, h5py, sentencepiece, safetensors, tqdm, pytest, pytest-timeout,
# cmake, ninja and pybind11 (docs/benchmarks.md, "GPU acceptance run"); what fm needs beyond that is carried:
# msgspec and tensorboardX as CPython 3.12 wheels, a BMTrain 1.0.1 wheel for CPython 3.12 built HERE with this
# machine's CUDA 13.0 nvcc for sm_80 and sm_90 (no such wheel exists on PyPI; building it here takes about 30 s,
# on the GPU machine it took minutes of its budget), and the BMTrain source, which run.sh builds there only when
# the wheel does not import. --full also carries the packages the image is said to have.
# Environment: PYTHON312 (default: the pyenv or PATH python3.12), CUDA_HOME (default /usr/local/cuda-13.0),
# BMTRAIN_ARCHS (default "80;90").
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.gpu_wheels
rm -rf "$dest"
mkdir -p "$dest"
pins() { grep -hE "^($1)==" requirements.txt requirements-dev.txt | tr '\n' ' '; }
pkgs="$(pins 'msgspec|tensorboardX')"
if [ "${1:-}" = "--full" ]; then
  pkgs="$pkgs $(pins 'numpy|h5py|sentencepiece|safetensors|tqdm|pytest|pytest-timeout') protobuf pluggy iniconfig packaging"
fi
# shellcheck disable=SC2086
python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --no-deps -d "$dest" $pkgs
# The BMTrain sdist itself: `pip download` would run its setup to read metadata, which needs CUDA.
python - "$dest" "$(grep -E '^bmtrain==' requirements-bmtrain.txt)" <<'PY'
import re, sys, urllib.request
from pathlib import Path
dest, pin = sys.argv[1], sys.argv[2]
name, version = pin.split("==")
index = urllib.request.urlopen(f"https://pypi.org/simple/{name}/").read().decode()
url = next(u for u in re.findall(r'href="([^"]+)"', index) if f"{name}-{version}.tar.gz" in u)
Path(dest, f"{name}-{version}.tar.gz").write_bytes(urllib.request.urlopen(url.split("#")[0]).read())
PY
bash tests/gpu/build_bmtrain.sh "$dest/bmtrain-1.0.1.tar.gz" "$dest"
for w in "$dest"/*.whl; do w="${w##*/}"; echo "${w%%-[0-9]*}"; done | grep -vx bmtrain | sort -u > "$dest/packages.txt"
du -sh "$dest"
echo "carry $dest to the GPU machine and run: bash tests/gpu/run.sh"
