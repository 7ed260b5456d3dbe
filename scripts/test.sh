#!/usr/bin/env bash
# The README's test command: installs what the tests need beyond a Rust toolchain (Debian's
# headless Chromium, for the report test), then runs every test of the workspace.
# Extra arguments go to `cargo test` (e.g. `-p medray-core`); without them the MONAI parity
# tests also run once per lower SIMD level.
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
cargo test --workspace --locked "$@"
# The MONAI parity tests ran above at the best SIMD level this CPU has; run them again with
# the kernels capped to each lower level (a cap above what the CPU has changes nothing), so
# that every path this machine can run meets the MONAI references directly. Only for a whole
# workspace run.
if [ "$#" -eq 0 ]; then
  for level in avx2 generic; do
    echo "== MONAI parity tests with MEDRAY_SIMD=$level"
    MEDRAY_SIMD=$level cargo test --locked -p medray-core --test monai_parity
  done
fi
