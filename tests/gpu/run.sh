#!/usr/bin/env bash
# The GPU acceptance run: one command that gives a verdict within about 8 minutes on a GPU machine with no
# network, using that machine's python3 and torch (not the pins). Each part has its own time budget; the
# results go to $OUT/gpu_results.json and $OUT/gpu_results.md (OUT defaults to ./gpu_results).
#   bash tests/gpu/prepare.sh    # here, with the registries: fills .gpu_wheels/ (carry it)
#   bash tests/gpu/run.sh        # there
# Parts (tests/gpu/acceptance.py): env, bmtrain (the carried cp312 wheel; built from source only when it does not
# import), gpu-marked tests, each attention kernel's forward and backward against a reference in bf16, tiny
# dragonfly 30 steps on bmtrain and fsdp, the 2.4B shape's tokens/s and MFU (LM head counted) on bmtrain, fsdp and
# fsdp with compiled layers, converter scaling over 1/2/4/8 workers.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out="${OUT:-gpu_results}"
mkdir -p "$out"
site="${FM_GPU_SITE:-/tmp/fm-gpu-site}"  # packages carried in .gpu_wheels, installed beside the image's own
mkdir -p "$site"
py="${PYTHON:-python3}"
missing=()
while read -r pkg; do
  [ -n "$pkg" ] || continue
  mod="$pkg"; [ "$pkg" = "tensorboardx" ] && mod="tensorboardX"
  "$py" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done < .gpu_wheels/packages.txt
if [ "${#missing[@]}" -gt 0 ]; then
  "$py" -m pip install -q --no-index --no-deps --find-links .gpu_wheels --target "$site" "${missing[@]}" \
    || echo "warning: could not install ${missing[*]} from .gpu_wheels" >&2
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" tests/gpu/acceptance.py --out "$out" --site "$site" --wheels .gpu_wheels "$@"
