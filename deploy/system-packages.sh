#!/usr/bin/env bash
# Debian packages that `make up`, `make test` and the evaluation report need and pip cannot provide:
#   chromium, chromium-driver  headless browser driven by the browser tests (playwright uses /usr/bin/chromium;
#                              `playwright install` would download a browser, which our build machines cannot)
#   fonts-wqy-microhei         CJK font: the report's figures select it explicitly (evals/fonts.py), and
#                              the browser screenshots need it for Chinese text
#   fonts-noto-color-emoji     emoji in the web UI's screenshots
# Called by `make setup`. Fast when everything is installed (one dpkg-query, no apt). As root it installs
# what is missing; otherwise it prints the one command to run and fails, so setup never half-succeeds.
set -euo pipefail

PKGS=(chromium chromium-driver fonts-wqy-microhei fonts-noto-color-emoji)

missing=()
for p in "${PKGS[@]}"; do
  # `dpkg -s` also succeeds for a removed package whose config files remain: ask for the real state.
  state=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$state" = installed ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing system packages: ${missing[*]} (Debian package names); install their equivalents," \
       "then run make setup again." >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing system packages: ${missing[*]}. Run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  echo "then run make setup again." >&2
  exit 1
fi

echo "Installing system packages: ${missing[*]}"
log=$(mktemp -t cpu-arena-apt.XXXXXX.log)
# noninteractive: setup runs without a terminal in CI, and debconf must not wait for an answer.
if ! (export DEBIAN_FRONTEND=noninteractive
      apt-get update -q && apt-get install -y -q "${missing[@]}") >"$log" 2>&1; then
  echo "error: apt-get failed (full log: $log):" >&2
  tail -20 "$log" >&2
  exit 1
fi
rm -f "$log"
