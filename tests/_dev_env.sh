# Sourced by the test commands (tests/run.sh, tests/repeat.sh) after quick_start/_env.sh: adds the test-only
# requirements (requirements-dev.txt: pytest, ruff, the references the tests compare with) to the active
# environment, which the launchers keep to the runtime ones. Resolved together with requirements.txt, so that no
# runtime pin moves. Idempotent: reinstalls only when either file changed since the last install.
# shellcheck shell=bash
fm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fm_dev_stamp="$VIRTUAL_ENV/.fm-dev-install-stamp"
fm_dev_want="$(cat "$fm_root/requirements.txt" "$fm_root/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$fm_dev_stamp" ] || [ "$(cat "$fm_dev_stamp")" != "$fm_dev_want" ]; then
  echo "[fm] installing the test requirements into $VIRTUAL_ENV (once)" >&2
  python -m pip install -q -r "$fm_root/requirements.txt" -r "$fm_root/requirements-dev.txt"
  echo "$fm_dev_want" > "$fm_dev_stamp"
fi
