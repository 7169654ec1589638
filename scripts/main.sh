#!/usr/bin/env bash
# The main job: set up, start ComfyUI headless with this pack, run the shipped basic workflow on the
# embedded default (a held-out toy subject's demos -> new contexts), and write the PNGs plus a contact
# sheet to output/suti_basic/. Uses comfy-cli (`comfy launch --background`, `comfy run`, `comfy stop`).
#
#   bash scripts/main.sh [WORKFLOW_API_JSON]     (default: workflows/api/suti_basic.json)
# A shipped workflow saves under the prefix folder named like its file (suti_controlnet_pose.json ->
# output/suti_controlnet_pose/). Without a ComfyUI tree it installs the pinned one (scripts/get_comfyui.sh).
# Env: COMFYUI_PATH (ComfyUI tree), SUTI_PORT (default 8190), SUTI_OUT (default output/<workflow name>).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -L)"
WORKFLOW="$(realpath "${1:-$ROOT/workflows/api/suti_basic.json}")"
PORT="${SUTI_PORT:-8190}"
NAME="$(basename "$WORKFLOW" .json)"
OUT="$(realpath -m "${SUTI_OUT:-$ROOT/output/$NAME}")"

# The ComfyUI tree first (installs the pinned one into ~/comfy/ComfyUI when there is none), so that
# setup.sh then installs its requirements; without a tree and network it says the command and stops.
COMFYUI="$(bash "$ROOT/scripts/get_comfyui.sh")" || exit $?
bash "$ROOT/scripts/setup.sh"

# A scratch base directory keeps the ComfyUI tree untouched: custom_nodes/ links to this checkout.
BASE="$(mktemp -d "${TMPDIR:-/tmp}/suti-main.XXXXXX")"
mkdir -p "$BASE/custom_nodes" "$BASE/input" "$OUT"
ln -s "$ROOT" "$BASE/custom_nodes/ComfyUI-SuTI"
cp "$ROOT"/workflows/example_demos/*.png "$BASE/input/"  # what suti_your_photos.json loads in place of your photos
COMFY=("$ROOT/.venv/bin/comfy" --skip-prompt --workspace "$COMFYUI")

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
wait_port_free() { for _ in $(seq "$1"); do port_busy || return 0; sleep 1; done; ! port_busy; }
stop_server() { "${COMFY[@]}" stop --port "$PORT" >/dev/null 2>&1 || true; wait_port_free 20 || true; }

if ! wait_port_free 20; then
  echo "main: port $PORT is still in use (another ComfyUI?); stop it or pick a free port with SUTI_PORT=..." >&2
  exit 2
fi
trap stop_server EXIT

export PATH="$ROOT/.venv/bin:$PATH"  # comfy launch runs ComfyUI with the python on PATH
echo "main: starting ComfyUI $COMFYUI on port $PORT (base dir $BASE)"
# comfy-cli refuses to launch while the previous run's server wrapper is still being reaped (a second or two
# after that run's `comfy stop`), so runs back to back retry that one refusal for up to 20 s.
for try in $(seq 10); do
  if "${COMFY[@]}" launch --background -- --cpu --listen 127.0.0.1 --port "$PORT" --base-directory "$BASE" \
      </dev/null >"$BASE/launch.log" 2>&1; then
    cat "$BASE/launch.log"; break
  fi
  if ! grep -qE 'server_already_running|already running in background' "$BASE/launch.log" || (( try == 10 )); then cat "$BASE/launch.log" >&2; exit 1; fi
  sleep 2
done

echo "main: running $(basename "$WORKFLOW")"
START=$(date +%s)
"${COMFY[@]}" run --workflow "$WORKFLOW" --wait --host 127.0.0.1 --port "$PORT" --timeout 600 </dev/null
echo "main: workflow finished in $(( $(date +%s) - START )) s"

# The sheet shows this run only: $OUT may hold files of earlier versions of the workflow.
"$ROOT/.venv/bin/python" -m scripts.contact_sheet "$BASE/output/$NAME" "$BASE/output/$NAME/contact_sheet.png"
cp -r "$BASE/output/$NAME/." "$OUT/"
echo "main: wrote $(ls "$BASE/output/$NAME"/*.png | wc -l) PNGs to $OUT (contact sheet: $OUT/contact_sheet.png)"
