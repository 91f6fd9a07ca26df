#!/usr/bin/env bash
# Sets everything up and runs `augur dev`. Extra arguments go to `augur dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# Same selection as the test command, so both share one set of features and one RocksDB build.
cargo build --workspace --all-targets
exec "$CARGO_TARGET_DIR/debug/augur" dev "$@"
