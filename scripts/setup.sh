#!/usr/bin/env bash
# Installs what Augur needs on a Debian machine, idempotently: apt packages, the Rust toolchain.
# Sourced by scripts/dev.sh and scripts/test.sh; safe to run again and again.
set -euo pipefail

APT_PACKAGES=(build-essential clang libclang-dev pkg-config fuse3 libfuse3-dev sqlite3 git attr util-linux curl ca-certificates python3 python3-venv)

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 && command -v rustup >/dev/null; then
    rustup component add "$component"
  fi
done

# Build output lives outside the clone so every clone and CI run reuses one RocksDB build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/augur/target}"
mkdir -p "$CARGO_TARGET_DIR"

# Python for model-training/ only: a venv outside the clone, installed once per machine (PyTorch
# from PyPI brings ~5 GB of wheels) and again only when requirements.txt changes.
export AUGUR_VENV="${AUGUR_VENV:-$HOME/.cache/augur/venv}"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
requirements="$repo_root/model-training/requirements.txt"
stamp="$AUGUR_VENV/.augur-requirements"
if [[ ! -x "$AUGUR_VENV/bin/python" ]]; then
  echo "setup: creating the Python venv in $AUGUR_VENV" >&2
  python3 -m venv "$AUGUR_VENV"
fi
if ! cmp -s "$requirements" "$stamp"; then
  echo "setup: installing model-training requirements into $AUGUR_VENV (PyTorch: a few minutes, once)" >&2
  "$AUGUR_VENV/bin/pip" install -q --upgrade pip
  "$AUGUR_VENV/bin/pip" install -q -r "$requirements"
  cp "$requirements" "$stamp"
fi
