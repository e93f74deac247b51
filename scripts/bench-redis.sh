#!/usr/bin/env bash
# Runs the limiter benchmark (benches/limiter.rs): the in-memory store, and the Redis store against
# a redis-server that the benchmark starts itself on a free loopback port (installed here if
# missing, as scripts/test.sh does). Extra arguments go to the benchmark, e.g. a name filter:
#   scripts/bench-redis.sh            # everything, then the Redis latency table
#   scripts/bench-redis.sh redis      # only the Redis store
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends redis-server
fi

echo "== $(redis-server --version)"
echo "== $(rustc --version)"
echo "== $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
exec cargo bench --locked --bench limiter -- "$@"
