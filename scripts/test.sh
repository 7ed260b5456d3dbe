#!/usr/bin/env bash
# The README's test command: installs what the tests need beyond a Rust toolchain (Debian's
# headless Chromium, for the report test), then runs every test of the workspace.
# Extra arguments go to `cargo test` (e.g. `-p medray-core`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MEDRAY_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "== installing headless Chromium (Debian package chromium) for the report test"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
exec cargo test --workspace --locked "$@"
