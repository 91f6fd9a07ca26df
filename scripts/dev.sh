#!/usr/bin/env bash
# Sets everything up and runs `augur dev`. Extra arguments go to `augur dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --bin augur
exec "$CARGO_TARGET_DIR/debug/augur" dev "$@"
