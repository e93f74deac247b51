#!/usr/bin/env bash
# Runs every check and test of cliqgate, installing what the tests need on a fresh machine.
# Usage: scripts/test.sh            (the same command CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."

# Rust toolchain components used below.
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

# redis-server for the Redis-store tests; each test starts (and stops) its own on a free port.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    apt_log="$(mktemp)"
    if ! command -v apt-get >/dev/null 2>&1 \
        || ! "${sudo[@]}" apt-get update -qq >"$apt_log" 2>&1 \
        || ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends redis-server >>"$apt_log" 2>&1 \
        || ! command -v redis-server >/dev/null 2>&1; then
        tail -n 20 "$apt_log" >&2 || true
        echo "error: redis-server is missing and could not be installed with apt-get;" \
            "install it (Debian/Ubuntu: apt-get install redis-server) and run again" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi
echo "== $(redis-server --version)"

# One build per run: incremental caches would add about 1.2 GB to target/ for nothing
# (a CI machine has run out of disk). Set CARGO_INCREMENTAL=1 to keep them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "== free disk where target/ goes: $(df -Ph . | awk 'NR==2 {print $4}')" \
    "(a run from a clean checkout writes about 2 GB)"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo doc (broken or private links in doc comments fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --locked

echo "== cargo test"
cargo test --all-targets --locked

# The deployment files (deploy/): manifests, Dockerfile, alerts, dashboard, systemd unit.
echo "== scripts/check-deploy.sh"
scripts/check-deploy.sh
