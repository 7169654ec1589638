#!/usr/bin/env bash
# The README's test command: set up .venv (fast when already done), then run pytest with any arguments.
#   bash scripts/test.sh                # everything
#   bash scripts/test.sh -m "not slow"  # quick subset
#   COMFYUI_PATH=/nonexistent bash scripts/test.sh   # as on a machine without ComfyUI
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -L)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
