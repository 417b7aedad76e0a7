#!/usr/bin/env bash
# System packages the tests need beyond pip (Debian/Ubuntu names):
# - fonts-noto-color-emoji: the colour emoji font that `latentdiff data emoji` draws with;
# - chromium: the headless browser the web UI's end-to-end test drives (through Playwright from pip).
# Installs what is missing with apt-get (through sudo when not root); where that is impossible it says so, and the
# tests that need them skip, naming what is missing (under CI=true the browser test fails instead).
set -uo pipefail
FONT=${EMOJI_FONT:-/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf}
missing=()
[ -f "$FONT" ] || missing+=(fonts-noto-color-emoji)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: no apt-get here; install ${missing[*]} yourself, or the tests that need them skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "system-deps: not root and no sudo; run 'apt-get install ${missing[*]}' as root, or the tests that" \
         "need them skip" >&2
    exit 0
  fi
fi
if ! ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}") \
    >/dev/null; then
  echo "system-deps: could not install ${missing[*]}; the tests that need them will skip" >&2
fi
echo "system-deps: installed ${missing[*]}"
exit 0
