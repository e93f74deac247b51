#!/usr/bin/env bash
# Runs every check and test of cliqgate, installing what the tests need on a fresh machine.
# Usage: scripts/test.sh            (the same command CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."

# Rust toolchain components used below.
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --all-targets --locked
