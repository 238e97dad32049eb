# Sourced by the top-level commands: make sure a Python environment with fm installed is active.
# Uses the active virtualenv if there is one, else creates .venv in the checkout. Installs what running fm needs
# (requirements.txt, requirements-bmtrain.txt, fm itself): the test commands add requirements-dev.txt themselves
# (tests/_dev_env.sh). Idempotent: reinstalls only when one of those files or setup.py changed since the last install.
# shellcheck shell=bash
fm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x "$fm_root/.venv/bin/python" ]; then
    python3 -m venv "$fm_root/.venv"
  fi
  # shellcheck disable=SC1091
  source "$fm_root/.venv/bin/activate"
fi
fm_stamp="$VIRTUAL_ENV/.fm-install-stamp"
fm_want="$(cat "$fm_root/requirements.txt" "$fm_root/requirements-bmtrain.txt" "$fm_root/setup.py" | sha256sum \
  | cut -d' ' -f1)"
if [ ! -f "$fm_stamp" ] || [ "$(cat "$fm_stamp")" != "$fm_want" ] || ! python -c "import fm" 2>/dev/null; then
  echo "[fm] installing requirements into $VIRTUAL_ENV (once)" >&2
  # torch first and pinned, so nothing pulls a CUDA build of a newer torch.
  python -m pip install -q "$(grep '^torch==' "$fm_root/requirements.txt")"
  python -m pip install -q -r "$fm_root/requirements.txt"
  # Without its dependencies: bmtrain's nvidia-nccl-cu11 would overwrite the NCCL of a CUDA 12 torch.
  python -m pip install -q --no-deps -r "$fm_root/requirements-bmtrain.txt"
  python -m pip install -q --no-deps -e "$fm_root"
  echo "$fm_want" > "$fm_stamp"
fi
