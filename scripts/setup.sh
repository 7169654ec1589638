#!/usr/bin/env bash
# Set up .venv for the pack, its tests and a headless ComfyUI server. Idempotent: when nothing that
# feeds the install changed since the last success, it skips pip entirely (well under a second).
#
#   bash scripts/setup.sh                 # create/refresh .venv
#   bash scripts/setup.sh --print-comfyui # print the ComfyUI tree it would use (empty if none) and exit
#   bash scripts/setup.sh --is-comfyui DIR  # exit 0 if DIR is a ComfyUI tree (the one test get_comfyui.sh uses too)
#
# ComfyUI is located as: $COMFYUI_PATH (an explicit value wins, even if it is no ComfyUI tree),
# else the enclosing ComfyUI when this pack sits in ComfyUI/custom_nodes/, else ~/comfy/ComfyUI.
# Env: PYTHON (interpreter for a new venv, default python3), SUTI_SETUP_FORCE=1 (ignore the marker).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -L)"  # -L keeps a custom_nodes/ symlink path
VENV="$ROOT/.venv"
MARKER="$VENV/.suti-setup.sha256"

is_comfyui() { [[ -f "$1/main.py" && -f "$1/comfy/model_management.py" ]]; }
if [[ "${1:-}" == "--is-comfyui" ]]; then is_comfyui "${2:?--is-comfyui needs a folder}"; exit; fi

find_comfyui() {
  if [[ -n "${COMFYUI_PATH:-}" ]]; then
    if is_comfyui "$COMFYUI_PATH"; then (cd "$COMFYUI_PATH" && pwd); fi
    return 0
  fi
  local enclosing
  enclosing="$(dirname "$(dirname "$ROOT")")"  # lexical: "$ROOT/../.." would follow a symlinked checkout
  if [[ "$(basename "$(dirname "$ROOT")")" == "custom_nodes" ]] && is_comfyui "$enclosing"; then
    echo "$enclosing"
  elif is_comfyui "$HOME/comfy/ComfyUI"; then
    echo "$HOME/comfy/ComfyUI"
  fi
}

COMFYUI="$(find_comfyui)"
if [[ "${1:-}" == "--print-comfyui" ]]; then
  echo "$COMFYUI"
  exit 0
fi

log() { echo "[setup] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="${PYTHON:-python3}"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { log "need Python >= 3.10 (got $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.1x"; exit 1; }
  log "creating $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
fi

# One setup at a time: colleagues share this checkout and its venv.
exec 9>"$VENV/.suti-setup.lock"
if command -v flock >/dev/null; then flock 9; fi

# Everything that decides what gets installed; a hash seen before => nothing to do.
fingerprint() {
  {
    cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "${BASH_SOURCE[0]}"
    "$VENV/bin/python" --version 2>&1
    echo "comfyui=$COMFYUI"
    if [[ -n "$COMFYUI" ]]; then cat "$COMFYUI/requirements.txt"; fi
  } | sha256sum | cut -d' ' -f1
}
WANT="$(fingerprint)"
# The marker lists every fingerprint installed so far (installs only add packages, so switching
# between e.g. COMFYUI_PATH=/nonexistent and the real tree does not reinstall each time).
if [[ "${SUTI_SETUP_FORCE:-0}" != 1 && -f "$MARKER" ]] && grep -qx "$WANT" "$MARKER"; then
  log "up to date (.venv, ComfyUI: ${COMFYUI:-none})"
  exit 0
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# torch first and unpinned: pip takes whatever build this machine resolves (CUDA wheels run on CPU too).
log "installing torch + torchvision"
"${PIP[@]}" torch torchvision

if [[ -n "$COMFYUI" ]]; then
  # ComfyUI's server requirements minus torchaudio (its build mismatch breaks transformers/diffusers).
  log "installing ComfyUI requirements from $COMFYUI (without torchaudio)"
  REQS="$(mktemp)"
  trap 'rm -f "$REQS"' EXIT
  grep -viE '^[[:space:]]*torchaudio([^a-z0-9_-]|$)' "$COMFYUI/requirements.txt" >"$REQS"
  "${PIP[@]}" -r "$REQS" requests
else
  log "no ComfyUI tree found: installing the pack and test tools only (real-ComfyUI tests will skip)"
fi

log "installing the pack (editable) with extras test, headless, train, ray, browser"
"${PIP[@]}" -e "$ROOT[test,headless,train,ray,browser]"  # ray: training.data --ray; browser: playwright; chromium itself comes from apt

if "$VENV/bin/python" -m pip show torchaudio >/dev/null 2>&1; then
  log "removing torchaudio (pulled in by a dependency; it breaks 'import transformers' here)"
  "$VENV/bin/python" -m pip uninstall -y torchaudio >&2
fi

echo "$WANT" >>"$MARKER"
log "done (ComfyUI: ${COMFYUI:-none})"
