#!/usr/bin/env bash
# Print the ComfyUI tree this pack runs against; when there is none, install the pinned ComfyUI into
# ~/comfy/ComfyUI (a shallow git clone of its release tag) and print that. Never changes an existing tree.
#
#   bash scripts/get_comfyui.sh      # stdout: the tree's path; exit 2 (with the one command to run) if none
#
# The lookup is setup.sh's (COMFYUI_PATH, the enclosing custom_nodes/, ~/comfy/ComfyUI). An explicit
# COMFYUI_PATH is never installed into. Where the ComfyUI repository cannot be reached within
# SUTI_NET_TIMEOUT seconds (default 15), it says which command gets a tree and exits 2, leaving nothing
# behind. Env: SUTI_COMFYUI_URL (git URL, default ComfyUI on GitHub). Dependencies are setup.sh's job.
set -euo pipefail

COMFYUI_VERSION="0.3.64"  # the ComfyUI the tests run on (tests/test_packaging.py checks the tree's version)
TAG="v$COMFYUI_VERSION"
URL="${SUTI_COMFYUI_URL:-https://github.com/comfyanonymous/ComfyUI}"
NET_TIMEOUT="${SUTI_NET_TIMEOUT:-15}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -L)"
TARGET="$HOME/comfy/ComfyUI"
GET_TREE="git clone --depth 1 --branch $TAG $URL ~/comfy/ComfyUI"

say() { echo "get_comfyui: $*" >&2; }
bounded() { if command -v timeout >/dev/null; then timeout -k 2 "$NET_TIMEOUT" "$@"; else "$@"; fi; }

FOUND="$(bash "$ROOT/scripts/setup.sh" --print-comfyui)"
if [[ -n "$FOUND" ]]; then
  echo "$FOUND"
  exit 0
fi
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  say "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI tree (no main.py + comfy/model_management.py)."
  say "Point it at your ComfyUI folder, or unset it to install ComfyUI $COMFYUI_VERSION into ~/comfy/ComfyUI."
  exit 2
fi
if [[ -L "$TARGET" || ( -e "$TARGET" && -n "$(ls -A "$TARGET" 2>&1)" ) ]]; then  # an empty folder will do
  say "$TARGET exists but is not a ComfyUI tree; it is left as it is."
  say "Move it away (or set COMFYUI_PATH to a ComfyUI tree) and run again."
  exit 2
fi

# Reachable at all? A short, bounded check, so an offline machine fails in seconds, not at a clone timeout.
if ! command -v git >/dev/null; then
  WHY="git is not installed (e.g. apt-get install git)"
elif ! GIT_TERMINAL_PROMPT=0 bounded git ls-remote --exit-code "$URL" "refs/tags/$TAG" >/dev/null 2>&1; then
  WHY="ComfyUI $TAG at $URL is not reachable from here (git ls-remote, ${NET_TIMEOUT} s limit)"
fi
if [[ -n "${WHY:-}" ]]; then
  say "no ComfyUI tree found, and $WHY."
  say "Get the tree with this one command where that is reachable, then run this again:"
  echo "    $GET_TREE" >&2
  say "(or set COMFYUI_PATH to a ComfyUI you already have)"
  exit 2
fi

# Clone next to the target and move it into place only when complete: no half-made tree on failure.
mkdir -p "$(dirname "$TARGET")"
PARTIAL="$(mktemp -d "$(dirname "$TARGET")/.ComfyUI.partial.XXXXXX")"
trap 'rm -rf "$PARTIAL"' EXIT
say "installing ComfyUI $COMFYUI_VERSION from $URL into $TARGET"
GIT_TERMINAL_PROMPT=0 git -c advice.detachedHead=false clone --quiet --depth 1 --branch "$TAG" "$URL" \
  "$PARTIAL/ComfyUI" >&2
bash "$ROOT/scripts/setup.sh" --is-comfyui "$PARTIAL/ComfyUI" || { say "the clone of $URL $TAG is not a ComfyUI tree"; exit 1; }
rmdir "$TARGET" 2>/dev/null || true  # the empty folder allowed above
mv "$PARTIAL/ComfyUI" "$TARGET"
echo "$TARGET"
