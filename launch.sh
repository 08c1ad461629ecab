#!/usr/bin/env bash
# Set up (first run) and start the studio. Any arguments go to app.py, e.g.
#   ./launch.sh --listen --port 7861
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv ..."
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --upgrade pip >/dev/null
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.studio-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing the studio and its packages (first run takes a few minutes) ..."
  .venv/bin/python -m pip install -e ".[test]"
  touch "$stamp"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app.py "$@"
