#!/usr/bin/env bash
# System packages the tests need beyond pip: the colour emoji font that `latentdiff data emoji` draws with
# (Debian/Ubuntu package fonts-noto-color-emoji). Installs it with apt-get (through sudo when not root); where that
# is impossible it says so, and the tests that need the font skip, naming it.
set -uo pipefail
FONT=${EMOJI_FONT:-/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf}
[ -f "$FONT" ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "system-deps: no apt-get here; install the Noto Color Emoji font yourself, or the 2 emoji data set tests skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo -n"; else
    echo "system-deps: not root and no sudo; run 'apt-get install fonts-noto-color-emoji' as root, or the 2 emoji" \
         "data set tests skip" >&2
    exit 0
  fi
fi
if ! ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fonts-noto-color-emoji) \
    >/dev/null; then
  echo "system-deps: could not install fonts-noto-color-emoji; the 2 emoji data set tests will skip" >&2
fi
[ -f "$FONT" ] && echo "system-deps: installed fonts-noto-color-emoji ($FONT)"
exit 0
