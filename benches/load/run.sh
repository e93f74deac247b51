#!/usr/bin/env bash
# Proxy load benchmark (issue 6, item 2). In one run, on loopback only, with wrk over keep-alive
# connections, it measures
#   direct    (a) the upstream itself: nginx answering a fixed small JSON body;
#   nginx     (b) nginx as a reverse proxy in front of (a), limit_req keyed by Authorization;
#   cliqgate  (c) cliqgate in front of (a): the shipped routes, limits that never refuse;
# each under high load (closed loop, CONNECTIONS connections) and under moderate load (few
# connections, each pausing DELAY_MS before every request). The targets are measured in turn,
# ROUNDS times (interleaved, so drift and neighbours hit all alike); medians are reported.
#
#   benches/load/run.sh                       # everything: about 4 minutes after the build
#   ROUNDS=1 DURATION=5s benches/load/run.sh  # a quick look
#   PERF=1 benches/load/run.sh                # also a perf profile of cliqgate under high load
#   CALLGRIND=1 benches/load/run.sh           # also cliqgate's user-space instructions per call
#                                             # under callgrind: repeatable on a noisy VM
#   BASELINE=1 benches/load/run.sh            # also a bare hyper proxy (benches/load/baseline),
#                                             # as cliqgate runs it and one runtime per core, and
#                                             # a TCP relay (no HTTP at all: the floor)
#
# Installs wrk and nginx if missing (apt-get), builds cliqgate in release mode, picks free ports at
# run time, and stops everything it started on exit. Raw wrk output, the generated configs and the
# summary go to OUT (default target/load/<timestamp>); the summary is also printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/benches/load

# ---- knobs ---------------------------------------------------------------------------------
ROUNDS=${ROUNDS:-3}                  # interleaved rounds; medians over rounds are reported
DURATION=${DURATION:-10s}            # one high-load measurement
THREADS=${THREADS:-2}                # wrk threads, high load
CONNECTIONS=${CONNECTIONS:-64}       # wrk connections, high load
MOD_DURATION=${MOD_DURATION:-5s}     # one moderate-load measurement
MOD_THREADS=${MOD_THREADS:-1}        # wrk threads, moderate load
MOD_CONNECTIONS=${MOD_CONNECTIONS:-4}  # wrk connections, moderate load
DELAY_MS=${DELAY_MS:-1}              # moderate load: pause per request per connection (wrk delay())
WARMUP=${WARMUP:-2s}                 # unmeasured run before each measurement
USERS=${USERS:-10000}                # distinct Authorization tokens, cycled
LOAD_PATH=${LOAD_PATH:-/api/v3/chats/C1/message}
NGINX_WORKERS=${NGINX_WORKERS:-2}    # nginx proxy (b) worker_processes, and cliqgate --workers: the same count
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-2}  # upstream nginx (a) worker_processes
ALGORITHM=${ALGORITHM:-window}       # cliqgate limiter algorithm (window | gcra)
QUIET_MAX=${QUIET_MAX:-15}           # before each measurement, wait until the machine is below this
QUIET_WAIT=${QUIET_WAIT:-60}         #   CPU % (others' work), for at most this many seconds;
RETRIES=${RETRIES:-2}                #   and measure again if others took more than QUIET_MAX % meanwhile
PERF=${PERF:-0}                      # 1: perf record cliqgate during one extra high-load run
BASELINE=${BASELINE:-0}              # 1: also measure the bare hyper proxy of benches/load/baseline
CALLGRIND=${CALLGRIND:-0}            # 1: instructions per call of cliqgate (1 worker) under callgrind
CLIQGATE_BIN=${CLIQGATE_BIN:-}       # a prebuilt binary: skips the build
OUT=${OUT:-$ROOT/target/load/$(date +%Y%m%d-%H%M%S)}

log() { printf '== %s\n' "$*" >&2; }

# ---- dependencies --------------------------------------------------------------------------
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null 2>&1; then need+=(linux-perf); fi
if [ "$CALLGRIND" = 1 ] && ! command -v valgrind >/dev/null 2>&1; then need+=(valgrind); fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# ---- build ---------------------------------------------------------------------------------
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN_NOTE=""
[ -n "$CLIQGATE_BIN" ] && BIN_NOTE=" (prebuilt: CLIQGATE_BIN=$CLIQGATE_BIN, may differ from this tree)"
if [ -z "$CLIQGATE_BIN" ]; then
    log "building cliqgate (release)"
    cargo build --release --locked --bin cliqgate >&2
    CLIQGATE_BIN=$TARGET_DIR/release/cliqgate
fi
if [ "$BASELINE" = 1 ]; then
    log "building the bare hyper baseline (release)"
    CARGO_TARGET_DIR=$TARGET_DIR/load-baseline cargo build --release --locked \
        --manifest-path "$HERE/baseline/Cargo.toml" >&2
    BASELINE_BIN=$TARGET_DIR/load-baseline/release/cliqgate-load-baseline
fi

mkdir -p "$OUT"
# Run private copies: the shared target directory may be rebuilt by someone else meanwhile (perf
# could then no longer read the symbols of a replaced binary).
cp "$CLIQGATE_BIN" "$OUT/cliqgate"
CLIQGATE_BIN=$OUT/cliqgate
if [ "$BASELINE" = 1 ]; then
    cp "$BASELINE_BIN" "$OUT/cliqgate-load-baseline"
    BASELINE_BIN=$OUT/cliqgate-load-baseline
fi
RUN=$(mktemp -d /tmp/cliqgate-load.XXXXXX)
chmod 755 "$RUN"
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- ports ---------------------------------------------------------------------------------
# Free loopback ports, held open together while the kernel picks them so that they differ.
read -r UP_PORT NGX_PORT CG_PORT CG_ADMIN_PORT HB_PORT HBC_PORT RELAY_PORT < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(7):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
)

# ---- configs -------------------------------------------------------------------------------
fill() { # template out workers port
    sed -e "s|@DIR@|$RUN|g" -e "s|@WORKERS@|$3|g" -e "s|@PORT@|$4|g" \
        -e "s|@UPSTREAM_PORT@|$UP_PORT|g" "$1" >"$2"
}
fill "$HERE/upstream.nginx.conf" "$RUN/upstream.conf" "$UPSTREAM_WORKERS" "$UP_PORT"
fill "$HERE/proxy.nginx.conf" "$RUN/proxy.conf" "$NGINX_WORKERS" "$NGX_PORT"

# cliqgate: config/cliq.yaml as shipped (every route, memory store, token identity), with
# loopback listeners, the local upstream, log level warn (no access-log line per call; nginx's
# access_log is off too), every limit raised to 1,000,000 and on_limit reject: nothing is refused
# or queued, and every call takes the full decision path.
sed -E \
    -e "s|^listen: .*|listen: \"127.0.0.1:$CG_PORT\"|" \
    -e "s|^admin_listen: .*|admin_listen: \"127.0.0.1:$CG_ADMIN_PORT\"|" \
    -e "s|^upstream: .*|upstream: \"http://127.0.0.1:$UP_PORT\"|" \
    -e 's|^(  level: )"info"|\1"warn"|' \
    -e 's|^(  on_limit: )queue|\1reject|' \
    -e '/^  max_wait: /d' \
    -e 's|^(    limit: )[0-9]+|\11000000|' \
    config/cliq.yaml >"$RUN/cliqgate.yaml"
if [ "$ALGORITHM" != window ]; then
    sed -i -E "s|^(  mode: enforce.*)|\1\n  algorithm: $ALGORITHM|" "$RUN/cliqgate.yaml"
fi
"$CLIQGATE_BIN" check --config "$RUN/cliqgate.yaml" >"$OUT/cliqgate-check.txt"
cp "$RUN/upstream.conf" "$RUN/proxy.conf" "$RUN/cliqgate.yaml" "$OUT/"

# ---- start ---------------------------------------------------------------------------------
declare -A PORT=([direct]=$UP_PORT [nginx]=$NGX_PORT [cliqgate]=$CG_PORT)
declare -A PID=()
TARGETS=(direct nginx cliqgate)

"$NGINX" -p "$RUN" -c "$RUN/upstream.conf" 2>"$OUT/upstream.stderr" &
PIDS+=($!) && PID[direct]=$!
"$NGINX" -p "$RUN" -c "$RUN/proxy.conf" 2>"$OUT/proxy.stderr" &
PIDS+=($!) && PID[nginx]=$!
"$CLIQGATE_BIN" --workers "$NGINX_WORKERS" --config "$RUN/cliqgate.yaml" 2>"$OUT/cliqgate.stderr" &
PIDS+=($!) && PID[cliqgate]=$!
if [ "$BASELINE" = 1 ]; then
    "$BASELINE_BIN" "127.0.0.1:$HB_PORT" "127.0.0.1:$UP_PORT" 2>"$OUT/hyper-mt.stderr" &
    PIDS+=($!) && PID[hyper-mt]=$! && PORT[hyper-mt]=$HB_PORT
    PER_CORE=$NGINX_WORKERS "$BASELINE_BIN" "127.0.0.1:$HBC_PORT" "127.0.0.1:$UP_PORT" \
        2>"$OUT/hyper-percore.stderr" &
    PIDS+=($!) && PID[hyper-percore]=$! && PORT[hyper-percore]=$HBC_PORT
    # Not an HTTP proxy: bytes copied between paired connections, the floor for any proxy here.
    RELAY=1 PER_CORE=$NGINX_WORKERS "$BASELINE_BIN" "127.0.0.1:$RELAY_PORT" "127.0.0.1:$UP_PORT" \
        2>"$OUT/tcp-relay.stderr" &
    PIDS+=($!) && PID[tcp-relay]=$! && PORT[tcp-relay]=$RELAY_PORT
    TARGETS+=(hyper-mt hyper-percore tcp-relay)
fi
printf '%s\n' "${TARGETS[@]}" >"$OUT/targets.txt"

call() { # port -> status code of one call like the benchmark's
    curl -s -o /dev/null -w '%{http_code}' -X POST \
        -H 'Authorization: Zoho-oauthtoken user0' -H 'Content-Type: application/json' \
        --data '{"text":"load test"}' "http://127.0.0.1:$1$LOAD_PATH" || true
}
for target in "${TARGETS[@]}"; do
    for i in $(seq 100); do
        [ "$(call "${PORT[$target]}")" = 200 ] && break
        [ "$i" = 100 ] && { log "$target: no 200 on port ${PORT[$target]}; see $OUT/*.stderr"; exit 1; }
        sleep 0.1
    done
done
curl -s -i -X POST -H 'Authorization: Zoho-oauthtoken user0' --data '{}' \
    "http://127.0.0.1:$CG_PORT$LOAD_PATH" >"$OUT/cliqgate-sample-response.txt"

# ---- CPU accounting ------------------------------------------------------------------------
# Clock ticks (USER_HZ) used by one server: a process and its children (nginx workers).
proc_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        # utime + stime: fields 14 and 15 (the command name, field 2, has no spaces here)
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
servers_ticks() {
    local total=0 t
    for t in "${TARGETS[@]}"; do total=$((total + $(proc_ticks "${PID[$t]}"))); done
    echo "$total"
}
machine_ticks() { # "busy total": steal counts as busy (someone else had the CPU)
    local _c u n s i w irq sirq st _rest
    read -r _c u n s i w irq sirq st _rest </proc/stat
    echo "$((u + n + s + irq + sirq + st)) $((u + n + s + i + w + irq + sirq + st))"
}
# Waits (at most QUIET_WAIT s) until the machine, idle on our side, is below QUIET_MAX % busy:
# other people's builds on a 2-core machine would otherwise decide the result.
wait_quiet() {
    local waited=0 b0 t0 b1 t1 pct
    while :; do
        read -r b0 t0 < <(machine_ticks)
        sleep 1
        read -r b1 t1 < <(machine_ticks)
        pct=$(((b1 - b0) * 100 / (t1 - t0 > 0 ? t1 - t0 : 1)))
        [ "$pct" -le "$QUIET_MAX" ] && return 0
        if [ "$waited" -ge "$QUIET_WAIT" ]; then
            log "machine still ${pct}% busy after ${QUIET_WAIT}s; measuring anyway"
            return 0
        fi
        [ "$waited" = 0 ] && log "machine ${pct}% busy with other work; waiting (up to ${QUIET_WAIT}s)"
        waited=$((waited + 1))
    done
}
secs_of() { # "0m1.230s" -> 1.230
    awk -F'[ms]' '{print $1 * 60 + $2}' <<<"$1"
}

# ---- machine -------------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -sr)"
    echo "nginx: $("$NGINX" -v 2>&1)"
    echo "wrk: $(wrk -v 2>&1 | head -1)"
    echo "rustc: $(rustc -V)"
    echo "cliqgate: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.lock 2>/dev/null || echo ' (+ uncommitted changes in src/ or Cargo.lock)')$BIN_NOTE"
    echo "command: ROUNDS=$ROUNDS DURATION=$DURATION THREADS=$THREADS CONNECTIONS=$CONNECTIONS MOD_DURATION=$MOD_DURATION MOD_THREADS=$MOD_THREADS MOD_CONNECTIONS=$MOD_CONNECTIONS DELAY_MS=$DELAY_MS WARMUP=$WARMUP USERS=$USERS NGINX_WORKERS=$NGINX_WORKERS UPSTREAM_WORKERS=$UPSTREAM_WORKERS ALGORITHM=$ALGORITHM BASELINE=$BASELINE benches/load/run.sh"
} | tee "$OUT/machine.txt" >&2

# ---- measure -------------------------------------------------------------------------------
# bench <label> <target> <threads> <connections> <duration> <delay_ms>
bench() {
    local label=$1 target=$2 threads=$3 conns=$4 dur=$5 delay=$6
    local url="http://127.0.0.1:${PORT[$target]}$LOAD_PATH"
    local env=(LOAD_USERS="$USERS" LOAD_PATH="$LOAD_PATH" LOAD_DELAY_MS="$delay")
    env "${env[@]}" wrk -t"$threads" -c"$conns" -d"$WARMUP" -s "$HERE/users.lua" "$url" >/dev/null
    local attempt foreign
    for attempt in $(seq $((RETRIES + 1))); do
        wait_quiet
        measure "$label" "$target" "$threads" "$conns" "$dur" "$delay"
        foreign=$(grep -o 'foreign_pct=[0-9.]*' "$OUT/$label.txt" | cut -d= -f2)
        echo "ATTEMPT n=$attempt" >>"$OUT/$label.txt"
        log "$label: $(grep WRKRESULT "$OUT/$label.txt" | cut -d' ' -f2-) | $(grep '^CPU ' "$OUT/$label.txt" | cut -d' ' -f2-)"
        awk -v f="$foreign" -v m="$QUIET_MAX" 'BEGIN {exit !(f > m)}' || break
        if [ "$attempt" -le "$RETRIES" ]; then
            log "$label: others used ${foreign}% of the machine meanwhile; measuring again"
        fi
    done
}

# measure <label> <target> <threads> <connections> <duration> <delay_ms>: one wrk run, and the CPU
# used meanwhile by the target, by wrk and by everything else.
measure() {
    local label=$1 target=$2 threads=$3 conns=$4 dur=$5 delay=$6
    local url="http://127.0.0.1:${PORT[$target]}$LOAD_PATH"
    local env=(LOAD_USERS="$USERS" LOAD_PATH="$LOAD_PATH" LOAD_DELAY_MS="$delay")
    local p0 p1 s0 s1 b0 t0 b1 t1 wrk_times
    p0=$(proc_ticks "${PID[$target]}")
    s0=$(servers_ticks)
    read -r b0 t0 < <(machine_ticks)
    # `times` in the subshell: the CPU time of its children, i.e. of wrk.
    wrk_times=$( (env "${env[@]}" wrk -t"$threads" -c"$conns" -d"$dur" --latency \
        -s "$HERE/users.lua" "$url" >"$OUT/$label.txt"; times) | tail -1)
    read -r b1 t1 < <(machine_ticks)
    p1=$(proc_ticks "${PID[$target]}")
    s1=$(servers_ticks)
    local hz wrk_s
    hz=$(getconf CLK_TCK)
    wrk_s=$(awk -v u="$(secs_of "${wrk_times% *}")" -v s="$(secs_of "${wrk_times#* }")" \
        'BEGIN {print u + s}')
    # Foreign: machine busy time that is neither wrk nor one of the servers started here.
    awk -v p=$((p1 - p0)) -v srv=$((s1 - s0)) -v b=$((b1 - b0)) -v t=$((t1 - t0)) \
        -v w="$wrk_s" -v hz="$hz" 'BEGIN {
            f = (b - srv - w * hz) / t * 100; if (f < 0) f = 0
            printf "CPU proxy_s=%.2f wrk_s=%.2f machine_busy_pct=%.0f foreign_pct=%.1f\n",
                p / hz, w, b / t * 100, f }' >>"$OUT/$label.txt"
}

for round in $(seq "$ROUNDS"); do
    for target in "${TARGETS[@]}"; do
        bench "high-$target-$round" "$target" "$THREADS" "$CONNECTIONS" "$DURATION" 0
    done
    for target in "${TARGETS[@]}"; do
        bench "moderate-$target-$round" "$target" "$MOD_THREADS" "$MOD_CONNECTIONS" "$MOD_DURATION" "$DELAY_MS"
    done
done

echo "cliqgate RSS after the runs: $(awk '/VmRSS/{print $2, $3}' "/proc/${PID[cliqgate]}/status")" >>"$OUT/machine.txt"

if [ "$PERF" = 1 ]; then
    log "perf: profiling cliqgate during one high-load run"
    secs=${DURATION%s}
    wait_quiet
    # DWARF unwinding: the release build keeps no frame pointers, so -g alone loses user stacks.
    (sleep 1; perf record -F 499 --call-graph dwarf,16384 -p "${PID[cliqgate]}" -o "$OUT/perf.data" \
        -- sleep $((secs - 2)) >"$OUT/perf-record.log" 2>&1) &
    perf_pid=$!
    env LOAD_USERS="$USERS" LOAD_PATH="$LOAD_PATH" LOAD_DELAY_MS=0 \
        wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$HERE/users.lua" \
        "http://127.0.0.1:$CG_PORT$LOAD_PATH" >"$OUT/perf-wrk.txt"
    wait "$perf_pid" || log "perf record failed: see $OUT/perf-record.log"
    if [ -s "$OUT/perf.data" ]; then
        perf report -i "$OUT/perf.data" --stdio --no-children --sort dso -g none \
            >"$OUT/perf-dso.txt" 2>/dev/null || true
        perf report -i "$OUT/perf.data" --stdio --no-children --sort sym -g none --percent-limit 0.3 \
            >"$OUT/perf-self.txt" 2>/dev/null || true
        # Inclusive time of cliqgate's own functions and the libraries on the request path.
        perf report -i "$OUT/perf.data" --stdio --children --sort sym -g none --percent-limit 0.2 \
            2>/dev/null | grep -v inlined \
            | grep -E "cliqgate::|hyper|tokio::time|malloc|free|fmt::format|writev|recv|epoll" \
            >"$OUT/perf-children.txt" || true
        log "perf: $OUT/perf-dso.txt, perf-self.txt, perf-children.txt (perf report -i $OUT/perf.data)"
    fi
fi

if [ "$CALLGRIND" = 1 ]; then
    # Counted instructions do not depend on what else the machine does: the figure to compare
    # two builds by. User space only (the kernel's share is not counted); one worker.
    log "callgrind: instructions per call of cliqgate (1 worker)"
    kill "${PID[cliqgate]}" 2>/dev/null || true
    wait "${PID[cliqgate]}" 2>/dev/null || true
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
        "$CLIQGATE_BIN" --workers 1 --config "$RUN/cliqgate.yaml" 2>"$OUT/callgrind.stderr" &
    vg=$!
    PIDS+=("$vg")
    for i in $(seq 120); do
        [ "$(call "$CG_PORT")" = 200 ] && break
        [ "$i" = 120 ] && { log "callgrind: cliqgate did not start"; exit 1; }
        sleep 0.5
    done
    load() {
        env LOAD_USERS="$USERS" LOAD_PATH="$LOAD_PATH" LOAD_DELAY_MS=0 \
            wrk -t1 -c8 -d"$1" -s "$HERE/users.lua" "http://127.0.0.1:$CG_PORT$LOAD_PATH"
    }
    load 3s >/dev/null # warm-up: connections, keys, caches
    # callgrind_control's exit status is not reliable (it can report a failure for a request
    # that was carried out): what counts is the dump file checked below.
    callgrind_control -z "$vg" >/dev/null 2>&1 || true
    calls=$(load 5s | awk '/requests in/ {print $1}') || true
    callgrind_control -d "$vg" >/dev/null 2>&1 || true
    sleep 1
    # The dump just asked for is part 1 (`callgrind.out` itself is only written at exit).
    dump="$OUT/callgrind.out.1"
    total=""
    if [ -s "$dump" ]; then
        # awk reads to the end: leaving early would kill callgrind_annotate with SIGPIPE, which
        # `pipefail` turns into the end of this script.
        total=$(callgrind_annotate "$dump" 2>/dev/null \
            | awk '/PROGRAM TOTALS/ && !found {gsub(",", "", $1); print $1; found = 1}')
    fi
    if [ -n "$total" ] && [ -n "$calls" ] && [ "$calls" -gt 0 ]; then
        echo "callgrind: $calls calls, $((total / calls)) instructions per call (user space, 1 worker)" \
            | tee -a "$OUT/machine.txt" >&2
        callgrind_annotate --inclusive=yes "$dump" >"$OUT/callgrind-inclusive.txt" 2>/dev/null || true
    else
        log "callgrind: no count (calls: '${calls:-}', dump: $dump); see $OUT/callgrind.stderr"
    fi
fi

python3 "$HERE/summarize.py" "$OUT" | tee "$OUT/summary.md"
log "raw output in $OUT"
