#!/usr/bin/env bash
# chatwall's load benchmark: chatwall against Squid and the direct path, in
# the same run, on loopback only. See BENCHMARKS.md for what each figure
# means.
#
#   bench/run.sh            # full: 3 rounds, 10 s runs, 2 GiB bulk, 9,000 idle tunnels
#   bench/run.sh --quick    # 1 round, 5 s runs, 512 MiB bulk
#   bench/run.sh --rounds N # full durations, N rounds
#   bench/run.sh --profile  # no figures: perf profiles of chatwall under the
#                           # HTTP, tunnel-setup and bulk loads (bench/results/profile.md)
#   bench/run.sh --idle-scale  # memory against idle tunnels: 1,000, 10,000 and
#                           # 50,000 held through the bare relay and chatwall, KiB per
#                           # tunnel at each count and a linear fit (bench/results/idle-scale.md)
#   bench/run.sh --http-scale  # HTTP keep-alive with 64, 1,000 and 10,000 client
#                           # connections: req/s and proxy CPU µs per request for direct,
#                           # Squid, bare relay and chatwall (bench/results/http-scale.md)
#   (--quick or --rounds N combine with either)
#
# Environment: BENCH_PROXY_CPU (0) and BENCH_LOAD_CPU (1) pick the cores;
# BENCH_NICE=-10 runs every benchmark process at that niceness, and sets
# the session's scheduler autogroup to it for the run (on a machine shared
# with other work the figures then suffer less from it; needs root);
# BENCH_CHATWALL=/path/to/chatwall benchmarks that binary instead of
# building one; CARGO_TARGET_DIR is honoured; BENCH_KEEP=1 keeps the
# temporary directory (logs of every process); BENCH_IDLE_COUNTS
# ("1000 10000 50000") and BENCH_HTTP_CONNS ("64 1000 10000") set the
# counts of the scale modes.
#
# Needs: nginx, wrk, squid, taskset (util-linux), cargo; perf (linux-perf)
# for --profile. It installs nothing: it names the Debian packages missing
# and stops. Run it as root (Squid drops to the `proxy` user, nginx's worker
# to `www-data`; the file-descriptor limit is raised for 9,000 tunnels).
#
# What it does:
#   1. builds `target/release/chatwall` and `target/release/examples/loadgen`;
#   2. starts, pinned to the load core (BENCH_LOAD_CPU, default 1): nginx
#      (bench/nginx.conf, 127.0.0.1:18080, a 1 KiB file), and the loadgen
#      origins (a 3 KB server flight that closes, 127.0.0.1:18443; the same
#      that holds the connection, :18444; bulk records, :18445); pinned to
#      the proxy core (BENCH_PROXY_CPU, default 0): Squid (bench/squid.conf,
#      127.0.0.1:13128), chatwall (bench/chatwall-bench.toml,
#      127.0.0.1:13129, admin :19129) and, as a reference, loadgen's bare
#      relay (no policy, no inspection: what relaying alone costs here,
#      127.0.0.1:13130);
#   3. for each round, with freshly started proxies: figure 4 (idle tunnels,
#      Squid, bare relay, chatwall), then figures 1, 2 and 3, each
#      alternating direct, Squid, bare relay, chatwall so drift cancels;
#      wrk and loadgen run on the
#      load core; the proxy's CPU time is utime+stime of /proc/PID/stat
#      before and after each run;
#   4. chatwall's startup (exec to /readyz 200) and reload times, 10 each;
#   5. prints a markdown table of medians and ratios and writes it, with
#      every run's numbers, to bench/results/latest.md.
#
# Every process it starts is stopped on exit (trap); its files live in a
# temporary directory that is removed (BENCH_KEEP=1 keeps it).
set -euo pipefail

# --- options ---------------------------------------------------------------
ROUNDS=3
SECS=10
BULK_BYTES=$((2 << 30))
IDLE_COUNT=9000
MODE=full
PROFILE=0
SCALE=
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) MODE=quick; ROUNDS=1; SECS=5; BULK_BYTES=$((512 << 20)) ;;
        --rounds)
            [[ $# -ge 2 && $2 =~ ^[1-9][0-9]?$ ]] || { echo "--rounds needs a number 1-99" >&2; exit 2; }
            ROUNDS=$2; shift ;;
        --profile) PROFILE=1 ;;
        --idle-scale) SCALE=idle ;;
        --http-scale) SCALE=http ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PROXY_CPU=${BENCH_PROXY_CPU:-0}
LOAD_CPU=${BENCH_LOAD_CPU:-1}
NICE=${BENCH_NICE:-0}
[[ $NICE =~ ^-?[0-9]+$ ]] || { echo "BENCH_NICE must be a number" >&2; exit 2; }
NGINX_PORT=18080
SQUID_PORT=13128
CW_PORT=13129
RELAY_PORT=13130
CW_ADMIN=19129
FLIGHT_PORT=18443
HOLD_PORT=18444
BULK_PORT=18445
# --idle-scale: more holding origins, so that no origin address takes more
# connections from one proxy than the loopback's ephemeral ports (about
# 28,000 per address pair); loadgen also spreads its own connections over
# source addresses 127.0.0.1 to 127.0.0.$SOURCE_IPS.
EXTRA_HOLD_PORTS=(18446 18447 18448)
SOURCE_IPS=4
STARTUP_PORT=13139
STARTUP_ADMIN=19139
CONNS=64          # figure 1: wrk connections
SETUP_CONC=32     # figure 3: tunnels in flight
FLIGHT=3000       # figure 3 and 4: server flight bytes
HOST=127.0.0.1

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# BENCH_CHATWALL: benchmark this chatwall binary instead of building one
# (say, the build before a change, to compare).
CHATWALL=${BENCH_CHATWALL:-$TARGET_DIR/release/chatwall}
LOADGEN="$TARGET_DIR/release/examples/loadgen"
RESULTS="$ROOT/bench/results"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- tools -----------------------------------------------------------------
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need nginx nginx
need wrk wrk
need squid squid
need taskset util-linux
need getconf libc-bin
need pgrep procps
[[ $PROFILE == 1 ]] && need perf linux-perf
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "missing tools; install them with:" >&2
    echo "  apt-get install -y ${missing[*]}" >&2
    exit 2
fi
command -v cargo >/dev/null 2>&1 || die "cargo is needed to build chatwall and loadgen"
[[ $(id -u) == 0 ]] || log "warning: not root: Squid and nginx keep this user, and the fd limit may stay too low for figure 4"
IDLE_COUNTS=(${BENCH_IDLE_COUNTS:-1000 10000 50000})
HTTP_CONNS=(${BENCH_HTTP_CONNS:-64 1000 10000})
for c in "${IDLE_COUNTS[@]}" "${HTTP_CONNS[@]}"; do
    [[ $c =~ ^[1-9][0-9]{0,5}$ ]] || { echo "BENCH_IDLE_COUNTS and BENCH_HTTP_CONNS take counts 1-999999" >&2; exit 2; }
done
maxof() { local m=0 v; for v in "$@"; do (( v > m )) && m=$v; done; echo "$m"; }
NCPU=$(nproc --all)
(( PROXY_CPU < NCPU && LOAD_CPU < NCPU )) || die "cores $PROXY_CPU and $LOAD_CPU do not both exist ($NCPU cores); set BENCH_PROXY_CPU / BENCH_LOAD_CPU"
[[ $PROXY_CPU != "$LOAD_CPU" ]] || log "warning: proxy and load share core $PROXY_CPU"
CLK_TCK=$(getconf CLK_TCK)

# Descriptors: a proxy holds two per tunnel or client connection, loadgen
# and the origins one. Every process started here inherits this limit
# (raising the hard limit needs root); the products' own settings stay.
case $SCALE in
    idle) NEED_FD=$(( 2 * $(maxof "${IDLE_COUNTS[@]}") + 8192 )) ;;
    http) NEED_FD=$(( 2 * $(maxof "${HTTP_CONNS[@]}") + 8192 )) ;;
    *) NEED_FD=$(( 2 * IDLE_COUNT + 1024 )) ;;
esac
ulimit -n "$(maxof 65536 "$NEED_FD")" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if (( $(ulimit -n) < NEED_FD )); then
    log "warning: open-file limit $(ulimit -n) is too low: $NEED_FD wanted"
fi

# Is something listening on this loopback port?
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
for p in $NGINX_PORT $SQUID_PORT $CW_PORT $CW_ADMIN $FLIGHT_PORT $HOLD_PORT $BULK_PORT $STARTUP_PORT $STARTUP_ADMIN "${EXTRA_HOLD_PORTS[@]}"; do
    ! port_open "$p" || die "port $p on $HOST is already in use"
done

# --- processes ---------------------------------------------------------------
RUN=$(mktemp -d /tmp/chatwall-bench.XXXXXX)
chmod 755 "$RUN"
PIDS=()
LAST_PID=

# Forget a PID (it ended, or is being stopped).
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# Stop one process this script started: TERM, then KILL after 5 s.
stop_pid() {
    local pid=$1 i
    forget_pid "$pid"
    kill -TERM "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for (( i=${#PIDS[@]}-1; i>=0; i-- )); do stop_pid "${PIDS[i]}"; done
    [[ -z $AUTOGROUP_NICE ]] || echo "$AUTOGROUP_NICE" >/proc/self/autogroup 2>/dev/null || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $RUN"; else rm -rf "$RUN"; fi
    exit "$rc"
}
AUTOGROUP_NICE=
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# With scheduler autogroups (sched_autogroup_enabled), niceness only
# weighs within one session: BENCH_NICE also sets this session's autogroup
# niceness for the run (restored on exit), so that other sessions' work
# yields too.
if [[ $NICE != 0 && -w /proc/self/autogroup ]]; then
    AUTOGROUP_NICE=$(sed -n 's/.* nice //p' /proc/self/autogroup)
    echo "$NICE" >/proc/self/autogroup 2>/dev/null || { log "warning: cannot set the autogroup niceness"; AUTOGROUP_NICE=; }
fi

# Run a command pinned to a core (at BENCH_NICE niceness).
run_on() {
    local cpu=$1; shift
    nice -n "$NICE" taskset -c "$cpu" "$@"
}

# Start a background process pinned to a core; its PID goes to LAST_PID
# (nice and taskset exec the command, so the PID is the command's).
start_bg() {
    local name=$1 cpu=$2; shift 2
    nice -n "$NICE" taskset -c "$cpu" "$@" >"$RUN/$name.out" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

wait_port() {
    local port=$1 pid=$2 name=$3 i
    for i in $(seq 1 200); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$RUN/$name.out" >&2 || true; die "$name exited at start"; }
        sleep 0.05
    done
    die "$name does not listen on $port after 10 s"
}

# GET a path on a loopback port; prints the status code.
http_status() {
    local port=$1 path=$2 line
    exec 4<>"/dev/tcp/$HOST/$port" || { echo 000; return; }
    printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$HOST" "$port" >&4
    IFS= read -r -t 5 line <&4 || line=
    exec 4>&-
    line=${line#* }
    echo "${line%% *}"
}

# utime+stime, in ticks, of these processes.
cpu_ticks() {
    local t=0 p s f
    for p in "$@"; do
        s=$(<"/proc/$p/stat")
        read -ra f <<<"${s##*) }"
        t=$(( t + f[11] + f[12] ))
    done
    echo "$t"
}

# "busy total" ticks of one core, from /proc/stat.
core_ticks() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# Interference: the share of the proxy core that went to anything but the
# proxy (other processes, and kernel work not charged to the proxy) between
# two core_ticks/cpu_ticks readings. Args: core-before core-after proxy-ticks-delta.
other_pct() {
    awk -v a="$1" -v b="$2" -v p="$3" 'BEGIN {
        split(a, x, " "); split(b, y, " "); tot = y[2] - x[2]; busy = y[1] - x[1]
        if (tot <= 0) print "NA"; else { o = (busy - p) / tot * 100; printf "%.1f", (o < 0 ? 0 : o) } }'
}

# A process and its children (Squid keeps no kids with -N; to be sure).
with_kids() { echo "$1"; pgrep -P "$1" || true; }

start_nginx() {
    mkdir -p "$RUN/www" "$RUN/nginx-body" "$RUN/nginx-proxy" "$RUN/nginx-fastcgi" "$RUN/nginx-uwsgi" "$RUN/nginx-scgi"
    head -c 1024 /dev/zero | tr '\0' 'x' >"$RUN/www/1k"
    chmod -R a+rX "$RUN/www"
    sed -e "s#@RUN@#$RUN#g" -e "s#@PORT@#$NGINX_PORT#g" bench/nginx.conf >"$RUN/nginx.conf"
    [[ $(id -u) == 0 ]] || sed -i '/^user /d' "$RUN/nginx.conf"
    start_bg nginx "$LOAD_CPU" nginx -e "$RUN/nginx-error.log" -p "$RUN" -c "$RUN/nginx.conf"
    NGINX_PID=$LAST_PID
    wait_port "$NGINX_PORT" "$NGINX_PID" nginx
    [[ $(http_status "$NGINX_PORT" /1k) == 200 ]] || die "nginx does not serve /1k"
}

start_origins() {
    start_bg flight "$LOAD_CPU" "$LOADGEN" serve-flight --listen "$HOST:$FLIGHT_PORT" --bytes "$FLIGHT"
    wait_port "$FLIGHT_PORT" "$LAST_PID" flight
    start_bg hold "$LOAD_CPU" "$LOADGEN" serve-flight --listen "$HOST:$HOLD_PORT" --bytes "$FLIGHT" --hold
    wait_port "$HOLD_PORT" "$LAST_PID" hold
    start_bg bulk "$LOAD_CPU" "$LOADGEN" serve-bulk --listen "$HOST:$BULK_PORT"
    wait_port "$BULK_PORT" "$LAST_PID" bulk
    if [[ $SCALE == idle ]]; then
        local p
        for p in "${EXTRA_HOLD_PORTS[@]}"; do
            start_bg "hold-$p" "$LOAD_CPU" "$LOADGEN" serve-flight --listen "$HOST:$p" --bytes "$FLIGHT" --hold
            wait_port "$p" "$LAST_PID" "hold-$p"
        done
    fi
}

SQUID_PID=
start_squid() {
    sed -e "s#@RUN@#$RUN#g" -e "s#@PORT@#$SQUID_PORT#g" bench/squid.conf >"$RUN/squid.conf"
    if [[ $(id -u) == 0 ]]; then
        chown proxy:proxy "$RUN" 2>/dev/null || true
    else
        sed -i '/^cache_effective_/d' "$RUN/squid.conf"
    fi
    rm -f "$RUN/squid.pid"
    start_bg squid "$PROXY_CPU" squid -N -f "$RUN/squid.conf"
    SQUID_PID=$LAST_PID
    wait_port "$SQUID_PORT" "$SQUID_PID" squid
}

CW_PID=
start_chatwall() {
    start_bg chatwall "$PROXY_CPU" "$CHATWALL" run -c bench/chatwall-bench.toml
    CW_PID=$LAST_PID
    wait_port "$CW_ADMIN" "$CW_PID" chatwall
    local i
    for i in $(seq 1 100); do
        [[ $(http_status "$CW_ADMIN" /readyz) == 200 ]] && return 0
        sleep 0.05
    done
    die "chatwall is not ready"
}

# The reference: loadgen's bare relay (no policy, no inspection), on the
# proxy core like the proxies.
RELAY_PID=
start_relay() {
    start_bg relay "$PROXY_CPU" "$LOADGEN" bare-relay --listen "$HOST:$RELAY_PORT"
    RELAY_PID=$LAST_PID
    wait_port "$RELAY_PORT" "$RELAY_PID" relay
}

restart_proxies() {
    [[ -n $SQUID_PID ]] && stop_pid "$SQUID_PID"
    [[ -n $CW_PID ]] && stop_pid "$CW_PID"
    [[ -n $RELAY_PID ]] && stop_pid "$RELAY_PID"
    start_squid
    start_chatwall
    start_relay
}

# --- recording -------------------------------------------------------------
RAW="$RUN/raw.tsv"
: >"$RAW"
ROUND=0
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$ROUND" "$3" "$4" >>"$RAW"; }
# Value of key=... in a loadgen result line.
kv() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

proxy_port() { case $1 in squid) echo "$SQUID_PORT" ;; chatwall) echo "$CW_PORT" ;; relay) echo "$RELAY_PORT" ;; *) echo "" ;; esac; }
proxy_pids() { case $1 in squid) with_kids "$SQUID_PID" ;; chatwall) echo "$CW_PID" ;; relay) echo "$RELAY_PID" ;; *) ;; esac; }
via_args() { local p; p=$(proxy_port "$1"); [[ -z $p ]] || echo "--proxy $HOST:$p"; }
cpu_args() { local p; for p in $(proxy_pids "$1"); do echo "--cpu-pid $p"; done; }

# wrk's latency ("812.00us", "1.23ms", "2.01s") in µs.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
        else if (v ~ /s$/) print n * 1000000; else print "NA" }'
}

# Figure 1: HTTP/1.1 keep-alive, 64 connections, 1 KiB responses (or
# CONNS connections, recorded as figure FIG: fig_http WHO [CONNS FIG]).
fig_http() {
    local who=$1 conns=${2:-$CONNS} fig=${3:-http} out url pids=() c0 c1 k0 k1 reqs rps p99 bad sockerr
    url="http://$HOST:$NGINX_PORT/1k"
    read -ra pids <<<"$(proxy_pids "$who" | tr '\n' ' ')"
    [[ ${#pids[@]} -eq 0 ]] || c0=$(cpu_ticks "${pids[@]}")
    k0=$(core_ticks "$PROXY_CPU")
    if [[ $who == direct ]]; then
        out=$(run_on "$LOAD_CPU" wrk -t1 -c"$conns" -d"${SECS}s" --latency "$url" 2>&1) || true
    else
        out=$(WRK_TARGET=$url run_on "$LOAD_CPU" wrk -t1 -c"$conns" -d"${SECS}s" --latency \
            -s bench/wrk/proxy.lua "http://$HOST:$(proxy_port "$who")/" 2>&1) || true
    fi
    [[ ${#pids[@]} -eq 0 ]] || c1=$(cpu_ticks "${pids[@]}")
    k1=$(core_ticks "$PROXY_CPU")
    echo "$out" >>"$RUN/wrk-$who.log"
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")
    # "Socket errors: connect 0, read 0, write 0, timeout 12": their sum.
    sockerr=$(awk -F'[ ,]+' '/Socket errors:/ {s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s}' <<<"$out")
    if [[ -z $rps || -z $reqs || $reqs == 0 ]]; then
        log "$fig $who: wrk failed: $(tail -n 3 <<<"$out" | tr '\n' ' ')"
        return 0
    fi
    [[ -z $bad ]] || log "$fig $who: $bad non-2xx responses"
    [[ -z $sockerr ]] || log "$fig $who: $sockerr socket errors"
    record "$fig" "$who" rps "$rps"
    record "$fig" "$who" p99_us "$(to_us "$p99")"
    record "$fig" "$who" errors "${bad:-0}"
    record "$fig" "$who" socket_errors "${sockerr:-0}"
    if [[ ${#pids[@]} -gt 0 ]]; then
        record "$fig" "$who" cpu_us "$(awk -v d=$((c1 - c0)) -v t="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.2f", d / t * 1e6 / n}')"
        record "$fig" "$who" other_pct "$(other_pct "$k0" "$k1" $((c1 - c0)))"
    fi
    log "$fig $who ($conns conns): $rps req/s, p99 $p99"
}

# Run loadgen on the load core; its output goes to LG_OUT, and the share of
# the proxy core that other work took meanwhile to LG_OTHER ("" for direct).
LG_OUT=
LG_OTHER=
loadgen_run() {
    local who=$1 pids=() c0 c1 k0 k1 rc=0; shift
    read -ra pids <<<"$(proxy_pids "$who" | tr '\n' ' ')"
    [[ ${#pids[@]} -eq 0 ]] || c0=$(cpu_ticks "${pids[@]}")
    k0=$(core_ticks "$PROXY_CPU")
    LG_OUT=$(run_on "$LOAD_CPU" "$LOADGEN" "$@" 2>>"$RUN/loadgen.err") || rc=$?
    k1=$(core_ticks "$PROXY_CPU")
    LG_OTHER=
    [[ ${#pids[@]} -eq 0 ]] || { c1=$(cpu_ticks "${pids[@]}"); LG_OTHER=$(other_pct "$k0" "$k1" $((c1 - c0))); }
    return "$rc"
}

# Figure 2: one tunnel, 16 KiB records, down (origin to client) and up.
fig_bulk() {
    local who=$1 dir=$2 out
    # shellcheck disable=SC2046
    if ! loadgen_run "$who" bulk $(via_args "$who") --target "$HOST:$BULK_PORT" \
        --bytes "$BULK_BYTES" --direction "$dir" $(cpu_args "$who") --clk-tck "$CLK_TCK"; then
        log "fig2 $who $dir: loadgen failed: $(tail -n 1 "$RUN/loadgen.err")"
        return 0
    fi
    out=$LG_OUT
    [[ -z $LG_OTHER ]] || record "bulk_$dir" "$who" other_pct "$LG_OTHER"
    record "bulk_$dir" "$who" gbps "$(kv "$out" gbps)"
    [[ $(kv "$out" cpu_s_per_gb) == - ]] || record "bulk_$dir" "$who" cpu_s_per_gb "$(kv "$out" cpu_s_per_gb)"
    log "fig2 $who $dir: $out"
}

# Figure 3: new tunnels, 32 at a time.
fig_setup() {
    local who=$1 out
    # shellcheck disable=SC2046
    if ! loadgen_run "$who" setup $(via_args "$who") --target "$HOST:$FLIGHT_PORT" \
        --concurrency "$SETUP_CONC" --secs "$SECS" --flight "$FLIGHT" $(cpu_args "$who") --clk-tck "$CLK_TCK"; then
        log "fig3 $who: loadgen failed: $(tail -n 1 "$RUN/loadgen.err")"
        return 0
    fi
    out=$LG_OUT
    [[ -z $LG_OTHER ]] || record setup "$who" other_pct "$LG_OTHER"
    record setup "$who" rate "$(kv "$out" rate)"
    record setup "$who" p99_us "$(kv "$out" p99_us)"
    record setup "$who" errors "$(kv "$out" errors)"
    [[ $(kv "$out" cpu_us_per_tunnel) == - ]] || record setup "$who" cpu_us "$(kv "$out" cpu_us_per_tunnel)"
    log "fig3 $who: $out"
}

# Figure 4: idle tunnels held open; RSS delta of the proxy per tunnel.
fig_idle() {
    local who=$1 out
    # shellcheck disable=SC2046
    if ! loadgen_run "$who" idle $(via_args "$who") --target "$HOST:$HOLD_PORT" \
        --count "$IDLE_COUNT" --flight "$FLIGHT" \
        $(for p in $(proxy_pids "$who"); do echo "--rss-pid $p"; done); then
        log "fig4 $who: loadgen failed: $(tail -n 1 "$RUN/loadgen.err")"
        return 0
    fi
    out=$LG_OUT
    record idle "$who" kib "$(kv "$out" kib_per_tunnel)"
    record idle "$who" errors "$(kv "$out" errors)"
    log "fig4 $who: $out"
    # Let the proxy wind the closed tunnels down before the next run.
    sleep 1
}

# --idle-scale: COUNT idle tunnels through a fresh proxy, spread over the
# holding origins and loadgen's source addresses; closed with resets so no
# TIME_WAIT holds ports for the next count. Recorded as idle_COUNT.
fig_idle_scale() {
    local who=$1 count=$2 out p also=()
    for p in "${EXTRA_HOLD_PORTS[@]}"; do also+=(--also-target "$HOST:$p"); done
    # shellcheck disable=SC2046
    if ! loadgen_run "$who" idle $(via_args "$who") --target "$HOST:$HOLD_PORT" "${also[@]}" \
        --source-ips "$SOURCE_IPS" --reset-at-end --max-secs 600 \
        --count "$count" --flight "$FLIGHT" \
        $(for p in $(proxy_pids "$who"); do echo "--rss-pid $p"; done); then
        log "idle $count $who: loadgen failed: $(tail -n 1 "$RUN/loadgen.err")"
        return 0
    fi
    out=$LG_OUT
    record "idle_$count" "$who" kib "$(kv "$out" kib_per_tunnel)"
    record "idle_$count" "$who" delta_kib "$(kv "$out" delta_kib)"
    record "idle_$count" "$who" tunnels "$(kv "$out" tunnels)"
    record "idle_$count" "$who" errors "$(kv "$out" errors)"
    log "idle $count $who: $out"
}

# --- build -----------------------------------------------------------------
log "building (release)"
[[ -n ${BENCH_CHATWALL:-} ]] || cargo build --release --quiet --bin chatwall
cargo build --release --quiet --example loadgen
[[ -x $CHATWALL ]] || die "no chatwall binary at $CHATWALL"

start_nginx
start_origins
restart_proxies
log "nginx $NGINX_PID, squid $SQUID_PID, chatwall $CW_PID; proxy core $PROXY_CPU, load core $LOAD_CPU"

# --- profile mode ------------------------------------------------------------
if [[ $PROFILE == 1 ]]; then
    PROF="$RESULTS/profile.md"
    mkdir -p "$RESULTS"
    # perf pads its columns; keep the text.
    tidy() { sed -E -e 's/([[:space:]]+-)+[[:space:]]*$//' -e 's/[[:space:]]+$//' -e '/^#/d' -e '/^$/d'; }
    # A subshell without pipefail: head closing the pipe is not an error.
    report() (
        set +o pipefail
        local data=$1
        echo "Where the samples fall (self time by object):"
        echo '```'
        perf report -i "$data" --no-children --sort dso -g none --percent-limit 1 --stdio 2>/dev/null | tidy | head -n 8
        echo '```'
        echo "Self time by function (user [.] and kernel [k]), top 30:"
        echo '```'
        perf report -i "$data" --no-children --sort symbol -g none --percent-limit 0.5 --stdio 2>/dev/null | tidy | head -n 30
        echo '```'
        echo "Inclusive time (the function and everything it calls, kernel included; columns: inclusive, self)"
        echo "of chatwall's functions and the libraries on its request path, top 45:"
        echo '```'
        perf report -i "$data" --children --sort symbol -g none --percent-limit 1 --stdio 2>/dev/null | tidy \
            | grep -F '[.]' | grep -E "$INCLUSIVE_RE" | grep -vE "$RUNTIME_RE" | head -n 45
        echo '```'
    )
    INCLUSIVE_RE='chatwall::|serde_json::|humantime::|prometheus::|tracing_subscriber|hyper::server::conn::http1::Upgradeable|hyper::client::conn::http1::upgrades::Upgradeable|Buffered<T,B>::poll_(flush|read_from_io)|hyper_util::client::legacy::client::Client<C,B>::send_request'
    RUNTIME_RE='listener::handle::|explicit::serve::|tunnel::connect::\{\{closure\}\}::|relay::relay::\{\{closure\}\}::'
    {
        echo "# chatwall profile ($(date -u +%Y-%m-%dT%H:%MZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
        echo
        echo "\`perf record -F 299 --call-graph dwarf,32768\` (cpu-clock) of the chatwall process alone, pinned to core"
        echo "$PROXY_CPU, for $SECS s under each load (the loads of figures 1, 3 and 2 down; the bulk"
        echo "transfer moves 6 GiB and may end before the $SECS s: idle time takes no samples). Percentages are of"
        echo "chatwall's samples. \`bench/run.sh --profile\` makes this file."
    } >"$PROF"
    for load in http setup bulk; do
        log "profiling chatwall under the $load load"
        run_on "$LOAD_CPU" perf record -q -F 299 --call-graph dwarf,32768 -p "$CW_PID" \
            -o "$RUN/perf-$load.data" -- sleep "$SECS" 2>/dev/null &
        perf_pid=$!
        PIDS+=("$perf_pid")
        sleep 0.3
        if [[ $load == http ]]; then
            WRK_TARGET="http://$HOST:$NGINX_PORT/1k" run_on "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$SECS"s \
                -s bench/wrk/proxy.lua "http://$HOST:$CW_PORT/" >/dev/null
        elif [[ $load == setup ]]; then
            run_on "$LOAD_CPU" "$LOADGEN" setup --proxy "$HOST:$CW_PORT" --target "$HOST:$FLIGHT_PORT" \
                --concurrency "$SETUP_CONC" --secs "$SECS" >/dev/null
        else
            run_on "$LOAD_CPU" "$LOADGEN" bulk --proxy "$HOST:$CW_PORT" --target "$HOST:$BULK_PORT" \
                --bytes $((6 << 30)) >/dev/null
        fi
        wait "$perf_pid" || true
        forget_pid "$perf_pid"
        log "reading the $load profile"
        { echo; echo "## Under the $load load"; echo; report "$RUN/perf-$load.data"; } >>"$PROF"
    done
    cat "$PROF"
    log "wrote $PROF"
    exit 0
fi

# --- rounds ------------------------------------------------------------------
# Anything else running on the machine skews every figure: say so.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="${LOAD_BEFORE%% *}" 'BEGIN { exit !(l > 0.5) }' \
    && log "warning: load average $LOAD_BEFORE before the runs: other work on this machine skews the figures"
START=$(date +%s)
if [[ $SCALE == idle ]]; then
    # Squid is not measured here (35 KB a tunnel, and its descriptor cap).
    stop_pid "$SQUID_PID"; SQUID_PID=
    for (( ROUND=1; ROUND<=ROUNDS; ROUND++ )); do
        log "round $ROUND of $ROUNDS"
        for count in "${IDLE_COUNTS[@]}"; do
            if (( 2 * count + 512 > $(ulimit -n) )); then
                log "idle $count: skipped, the open-file limit $(ulimit -n) holds fewer tunnels"
                continue
            fi
            for who in relay chatwall; do
                # A fresh process for every count: the delta is the tunnels'.
                if [[ $who == relay ]]; then stop_pid "$RELAY_PID"; start_relay
                else stop_pid "$CW_PID"; start_chatwall; fi
                fig_idle_scale "$who" "$count"
                sleep 1
            done
        done
    done
elif [[ $SCALE == http ]]; then
    for (( ROUND=1; ROUND<=ROUNDS; ROUND++ )); do
        log "round $ROUND of $ROUNDS"
        (( ROUND == 1 )) || restart_proxies
        for conns in "${HTTP_CONNS[@]}"; do
            for who in direct squid relay chatwall; do fig_http "$who" "$conns" "http_$conns"; done
        done
    done
else
for (( ROUND=1; ROUND<=ROUNDS; ROUND++ )); do
    log "round $ROUND of $ROUNDS"
    (( ROUND == 1 )) || restart_proxies
    for who in squid relay chatwall; do fig_idle "$who"; done
    for who in direct squid relay chatwall; do fig_http "$who"; done
    for who in direct squid relay chatwall; do fig_bulk "$who" down; done
    for who in direct squid relay chatwall; do fig_bulk "$who" up; done
    for who in direct squid relay chatwall; do fig_setup "$who"; done
done
fi
ROUND=0

if [[ -z $SCALE ]]; then
log "startup and reload times"
STARTUP=$(CHATWALL__LISTEN__EXPLICIT="$HOST:$STARTUP_PORT" CHATWALL__LISTEN__ADMIN="$HOST:$STARTUP_ADMIN" \
    run_on "$PROXY_CPU" "$LOADGEN" startup --admin "$HOST:$STARTUP_ADMIN" --runs 10 -- \
    "$CHATWALL" run -c bench/chatwall-bench.toml 2>>"$RUN/loadgen.err") || log "startup timing failed"
RELOAD=$(run_on "$LOAD_CPU" "$LOADGEN" reload --admin "$HOST:$CW_ADMIN" --runs 10 2>>"$RUN/loadgen.err") \
    || log "reload timing failed"
[[ -z ${STARTUP:-} ]] || record startup chatwall ms "$(kv "$STARTUP" median_ms)"
[[ -z ${RELOAD:-} ]] || record reload chatwall ms "$(kv "$RELOAD" median_ms)"
fi
ELAPSED=$(( $(date +%s) - START ))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report ------------------------------------------------------------------
# Median of the rounds' values for (figure, who, metric); NA without any.
med() {
    awk -F'\t' -v f="$1" -v w="$2" -v m="$3" '$1 == f && $2 == w && $4 == m && $5 != "" && $5 != "NA" {print $5}' "$RAW" \
        | sort -g | awk '{a[NR] = $1} END {
            if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
# Smallest and largest of the rounds' values, "min max" (NA NA without any).
span() {
    awk -F'\t' -v f="$1" -v w="$2" -v m="$3" '$1 == f && $2 == w && $4 == m && $5 != "" && $5 != "NA" {print $5}' "$RAW" \
        | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END { if (NR == 0) print "NA NA"; else print lo, hi }'
}
fmt() { [[ $1 == NA ]] && echo "–" || printf "%.${2}f" "$1"; }
# A table cell: the median of the rounds, with their range when there are
# several: "cell FIG WHO METRIC DIGITS [SCALE]".
cell() {
    local v lo hi sc=${5:-1}
    v=$(med "$1" "$2" "$3")
    [[ $v == NA ]] && { echo "–"; return; }
    read -r lo hi <<<"$(span "$1" "$2" "$3")"
    awk -v v="$v" -v lo="$lo" -v hi="$hi" -v d="$4" -v s="$sc" -v n="$ROUNDS" 'BEGIN {
        f = "%." d "f"; out = sprintf(f, v * s)
        if (n > 1) out = out sprintf(" [" f "–" f "]", lo * s, hi * s)
        print out }'
}
ratio() {
    if [[ $1 == NA || $2 == NA ]]; then echo "–"; return; fi
    awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "–"; else printf "%.2f×", a / b }'
}
# met VALUE OP LIMIT: yes / no / – (for a ratio target pass the ratio).
met() { [[ $1 == NA ]] && { echo "–"; return; }; awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN {
    ok = (op == ">=") ? v >= l : v <= l; print ok ? "**yes**" : "no" }'; }
rawratio() {
    if [[ $1 == NA || $2 == NA ]]; then echo NA; return; fi
    awk -v a="$1" -v b="$2" 'BEGIN { print (b == 0) ? "NA" : a / b }'
}

# One row: label, figure, metric, digits, scale (multiplier for display), target text, target check.
row() {
    local label=$1 fig=$2 m=$3 d=$4 scale=$5 target=$6 check=$7
    local dv sv cv
    dv=$(med "$fig" direct "$m"); sv=$(med "$fig" squid "$m"); cv=$(med "$fig" chatwall "$m")
    local verdict="–"
    case $check in
        ratio\>=*) verdict=$(met "$(rawratio "$cv" "$sv")" ">=" "${check#ratio>=}") ;;
        \<=*) verdict=$(met "$cv" "<=" "${check#<=}") ;;
        \>=*) verdict=$(met "$cv" ">=" "${check#>=}") ;;
    esac
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" \
        "$(cell "$fig" direct "$m" "$d" "$scale")" "$(cell "$fig" squid "$m" "$d" "$scale")" \
        "$(cell "$fig" relay "$m" "$d" "$scale")" "$(cell "$fig" chatwall "$m" "$d" "$scale")" \
        "$(ratio "$cv" "$sv")" "$(ratio "$cv" "$dv")" "$target" "$verdict"
}

gib() { awk -v b="$1" 'BEGIN { printf "%g", b / 1073741824 }'; }
TABLE="$RUN/table.md"
# Least-squares line through every round's (tunnels, RSS delta KiB) of one
# proxy: "slope intercept r2".
fit() {
    local c
    for c in "${IDLE_COUNTS[@]}"; do
        awk -F'\t' -v f="idle_$c" -v w="$1" -v n="$c" '$1 == f && $2 == w && $4 == "delta_kib" && $5 != "" {print n, $5}' "$RAW"
    done | awk '{ n++; sx += $1; sy += $2; sxx += $1 * $1; sxy += $1 * $2; syy += $2 * $2 }
        END {
            d = n * sxx - sx * sx
            if (n < 2 || d == 0) { print "NA NA NA"; exit }
            b = (n * sxy - sx * sy) / d; a = (sy - b * sx) / n
            v = n * syy - sy * sy
            r2 = (v == 0) ? 1 : (n * sxy - sx * sy) ^ 2 / (d * v)
            printf "%.3f %.0f %.5f\n", b, a, r2 }'
}
COMMAND="$([[ $NICE == 0 ]] || echo "BENCH_NICE=$NICE ")$([[ $SCALE != idle || -z ${BENCH_IDLE_COUNTS:-} ]] || echo "BENCH_IDLE_COUNTS=\"${IDLE_COUNTS[*]}\" ")$([[ $SCALE != http || -z ${BENCH_HTTP_CONNS:-} ]] || echo "BENCH_HTTP_CONNS=\"${HTTP_CONNS[*]}\" ")bench/run.sh$([[ $MODE == quick ]] && echo ' --quick')$([[ ($MODE == full && $ROUNDS != 3) || ($MODE == quick && $ROUNDS != 1) ]] && echo " --rounds $ROUNDS")$([[ -z $SCALE ]] || echo " --$SCALE-scale")"
if [[ $SCALE == idle ]]; then
{
    echo "## Idle tunnels against their count: $(date -u +%Y-%m-%d) ($ROUNDS round(s))"
    echo
    echo "Each count held through a freshly started proxy (VmRSS before the tunnels and 1 s after the last is open;"
    echo "the delta over the count). Medians of $ROUNDS round(s)$([[ $ROUNDS == 1 ]] || echo ", the rounds' range in brackets")."
    echo "Tunnels spread over $(( ${#EXTRA_HOLD_PORTS[@]} + 1 )) holding origins and $SOURCE_IPS source addresses; proxy core $PROXY_CPU, loadgen and origins on core $LOAD_CPU$([[ $NICE == 0 ]] || echo "; every benchmark process at nice $NICE")."
    echo
    echo "| idle tunnels | bare relay: KiB / tunnel | chatwall: KiB / tunnel | tunnels not opened (relay, chatwall) |"
    echo "|---:|---:|---:|---|"
    for c in "${IDLE_COUNTS[@]}"; do
        if (( 2 * c + 512 > $(ulimit -n) )); then
            echo "| $c | not run: open-file limit $(ulimit -n) | | |"
            continue
        fi
        echo "| $c | $(cell "idle_$c" relay kib 2) | $(cell "idle_$c" chatwall kib 2) |"\
            "$(awk -F'\t' -v f="idle_$c" '$1 == f && $2 == "relay" && $4 == "errors" {s += $5} END {print s + 0}' "$RAW"),"\
            "$(awk -F'\t' -v f="idle_$c" '$1 == f && $2 == "chatwall" && $4 == "errors" {s += $5} END {print s + 0}' "$RAW") |"
    done
    read -r rs ri rr <<<"$(fit relay)"
    read -r cs ci cr <<<"$(fit chatwall)"
    echo "| linear fit of the RSS delta: KiB per tunnel (slope) | $rs | $cs | |"
    echo "| linear fit: intercept, KiB | $ri | $ci | |"
    echo "| linear fit: r² | $rr | $cr | |"
} >"$TABLE"
OUT="$RESULTS/idle-scale.md"
elif [[ $SCALE == http ]]; then
{
    echo "## HTTP keep-alive against client connections: $(date -u +%Y-%m-%d) ($ROUNDS round(s), ${SECS} s runs)"
    echo
    echo "wrk -t1 -c N, 1 KiB responses. Medians of $ROUNDS round(s)$([[ $ROUNDS == 1 ]] || echo ", the rounds' range in brackets"); ratios are of the medians."
    echo "Proxy core $PROXY_CPU; nginx and wrk on core $LOAD_CPU$([[ $NICE == 0 ]] || echo "; every benchmark process at nice $NICE")."
    echo
    echo "| figure | direct | Squid | bare relay | chatwall | chatwall / Squid | chatwall / direct | target | met |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|---|"
    for c in "${HTTP_CONNS[@]}"; do
        row "$c conns: req/s" "http_$c" rps 0 1 "" ""
        row "$c conns: p99 latency, ms" "http_$c" p99_us 2 0.001 "" ""
        row "$c conns: proxy CPU µs / request" "http_$c" cpu_us 1 1 "" ""
    done
    echo
    echo "Errors (sum over rounds and proxies): HTTP non-2xx $(awk -F'\t' '$1 ~ /^http_/ && $4=="errors" {s+=$5} END {print s+0}' "$RAW"),"\
        "socket errors (connect, read, write, timeout) $(awk -F'\t' '$1 ~ /^http_/ && $4=="socket_errors" {s+=$5} END {print s+0}' "$RAW")."
} >"$TABLE"
OUT="$RESULTS/http-scale.md"
else
OUT="$RESULTS/latest.md"
{
    echo "## Results: $(date -u +%Y-%m-%d) ($MODE: $ROUNDS round(s), ${SECS} s runs, $(gib "$BULK_BYTES") GiB bulk, $IDLE_COUNT idle tunnels)"
    echo
    echo "Medians of $ROUNDS round(s); ratios are chatwall's median over the other's."
    echo "Proxy core $PROXY_CPU; nginx, wrk and loadgen on core $LOAD_CPU; loopback only$([[ $NICE == 0 ]] || echo "; every benchmark process at nice $NICE")."
    echo "CPU is the proxy process's utime+stime over the run (direct has no proxy)."
    echo "Bare relay: \`loadgen bare-relay\`, a reference that only relays (no policy, no inspection), not a product."
    echo
    echo "| figure | direct | Squid | bare relay | chatwall | chatwall / Squid | chatwall / direct | target | met |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|---|"
    row "1. HTTP keep-alive, $CONNS conns, 1 KiB: req/s" http rps 0 1 "≥ 3× Squid" "ratio>=3"
    row "1. p99 latency, ms" http p99_us 2 0.001 "" ""
    row "1. proxy CPU µs / request" http cpu_us 1 1 "≤ 20" "<=20"
    row "2. one tunnel, 16 KiB records, down: GB/s" bulk_down gbps 2 1 "≥ 2× Squid" "ratio>=2"
    row "2. proxy CPU s / GB, down" bulk_down cpu_s_per_gb 3 1 "≤ 0.3" "<=0.3"
    row "2. one tunnel, 16 KiB records, up: GB/s" bulk_up gbps 2 1 "≥ 2× Squid" "ratio>=2"
    row "2. proxy CPU s / GB, up" bulk_up cpu_s_per_gb 3 1 "≤ 0.3" "<=0.3"
    row "3. new tunnels, $SETUP_CONC at a time: tunnels/s" setup rate 0 1 "≥ 2.5× Squid" "ratio>=2.5"
    row "3. p99 tunnel time, ms" setup p99_us 2 0.001 "" ""
    row "3. proxy CPU µs / tunnel" setup cpu_us 1 1 "≤ 50" "<=50"
    row "4. $IDLE_COUNT idle tunnels: KiB / tunnel (RSS)" idle kib 2 1 "≤ 8" "<=8"
    row "startup, exec to /readyz 200, ms (median of 10)" startup ms 1 1 "< 50" "<=50"
    row "reload, POST /-/reload, ms (median of 10)" reload ms 1 1 "< 100" "<=100"
    echo
    echo "Other work on the proxy core during the proxy runs (other processes, and kernel work not charged to the proxy): median $(
        awk -F'\t' '$4 == "other_pct" && $5 != "NA" {print $5}' "$RAW" | sort -g \
            | awk '{a[NR] = $1} END { if (NR == 0) print "–"; else printf "%s%%, max %s%%", a[int((NR + 1) / 2)], a[NR] }')."
    echo "Errors (sum over rounds): HTTP non-2xx $(awk -F'\t' '$1=="http" && $4=="errors" {s+=$5} END {print s+0}' "$RAW"),"\
        "tunnel setups $(awk -F'\t' '$1=="setup" && $4=="errors" {s+=$5} END {print s+0}' "$RAW"),"\
        "idle tunnels not opened $(awk -F'\t' '$1=="idle" && $4=="errors" {s+=$5} END {print s+0}' "$RAW")."
} >"$TABLE"
fi

mkdir -p "$RESULTS"
{
    echo "# chatwall load benchmark"
    echo
    echo "Machine: $(nproc --all) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1),"\
        "Linux $(uname -r). chatwall $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (+ local changes)'),"\
        "$(squid -v | head -n 1), $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -n 1 | awk '{print "wrk " $2}')."
    echo "Load average before the runs: $LOAD_BEFORE; after: $LOAD_AFTER (the benchmark itself keeps about 2 busy)."
    echo "Command: \`$COMMAND\`, ${ELAPSED} s."
    echo
    cat "$TABLE"
    echo
    echo "### Every run"
    echo
    echo "| figure | who | round | metric | value |"
    echo "|---|---|---:|---|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, ($3 == 0 ? "–" : $3), $4, $5 }' "$RAW"
    [[ -z ${STARTUP:-} ]] || echo; [[ -z ${STARTUP:-} ]] || echo "Startup: $STARTUP"
    [[ -z ${RELOAD:-} ]] || echo; [[ -z ${RELOAD:-} ]] || echo "Reload: $RELOAD"
} >"$OUT"

echo
cat "$TABLE"
echo
log "wrote $OUT (${ELAPSED} s)"
