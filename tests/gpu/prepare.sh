#!/usr/bin/env bash
# Prepares the folder the GPU acceptance run carries: .gpu_wheels/ (ignored by git), from the registries.
# Run it on a machine with the registries (this one), then start tests/gpu/run.sh on the GPU machine with
# .gpu_wheels carried along (the GPU machine has no network).
#
# The GPU image already holds torch, numpy, h5py, sentencepiece, safetensors, tqdm, pytest, pytest-timeout,
# cmake, ninja and pybind11 (docs/benchmarks.md, "GPU acceptance run"); what fm needs beyond that is carried:
# msgspec and tensorboardX as CPython 3.12 wheels, and the BMTrain 1.0.1 source (no wheel for 3.12; run.sh
# builds it there with the machine's nvcc). --full also carries the packages the image is said to have.
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
for w in "$dest"/*.whl; do w="${w##*/}"; echo "${w%%-[0-9]*}"; done | sort -u > "$dest/packages.txt"
du -sh "$dest"
echo "carry $dest to the GPU machine and run: bash tests/gpu/run.sh"
