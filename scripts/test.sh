#!/usr/bin/env bash
# Sets everything up and runs every check and test: formatting, clippy, unit and end-to-end
# tests, and the model-training tests (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets -- --test-threads 2
echo "== model-training (pytest)"
(cd model-training && "$AUGUR_VENV/bin/python" -m pytest -q)
echo "== all checks passed"
