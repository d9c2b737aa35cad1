#!/usr/bin/env bash
# Side-by-side load comparison of oidc-edge and nginx on this machine: same certificate
# (ECDSA P-256), same two documents (rendered by oidc-edge itself), server pinned to core 0,
# load generator to core 1, one worker each. Every figure is a median of ROUNDS rounds and is
# reported as a ratio to nginx measured in the same run. See benches/README.md.
#
#   benches/compare.sh            (ROUNDS=3 SECONDS_PER_RUN=8 by default; about 6 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECONDS_PER_RUN:-8}
work=$(mktemp -d /tmp/oidc-edge-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
say() { printf '%s\n' "$*" >&2; }

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
command -v openssl >/dev/null || need+=(openssl)
if [ "${#need[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "missing ${need[*]}: apt-get install ${need[*]}"; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo build --release --locked -q
bin=$PWD/target/release/oidc-edge
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One certificate for both servers.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj "/CN=bench CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=bench.test \
  -keyout "$work/key.pem" -out "$work/leaf.csr" 2>/dev/null
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 1 \
  -out "$work/cert.pem" -extfile <(printf 'subjectAltName=DNS:bench.test\n') 2>/dev/null

E_HTTPS=$(free_port); E_HTTP=$(free_port); N_HTTPS=$(free_port); N_HTTP=$(free_port)
cp config/demo-jwks.json "$work/jwks.json"
edge_config() { # $1: refresh interval
  cat > "$work/edge.toml" <<CONF
[[issuers]]
issuer = "https://bench.test"
  [[issuers.sources]]
  kind = "file"
  path = "jwks.json"
  refresh_interval = "$1"
[http]
listen = "127.0.0.1:$E_HTTP"
[https]
listen = "127.0.0.1:$E_HTTPS"
hsts = false
[https.files]
cert_file = "cert.pem"
key_file = "key.pem"
[limits]
max_connections = 20000
[admin]
listen = "127.0.0.1:0"
[state]
dir = "state"
[log]
level = "warn"
CONF
}
edge_config 60s
# nginx serves the very bytes oidc-edge serves.
"$bin" render --config "$work/edge.toml" --out "$work/site" >/dev/null
cat > "$work/nginx.conf" <<CONF
daemon off; worker_processes 1; worker_rlimit_nofile 65536;
pid $work/nginx.pid; error_log $work/nginx.log warn;
events { worker_connections 20000; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s;
  open_file_cache max=100 inactive=60s; open_file_cache_valid 60s;
  ssl_session_cache shared:SSL:10m; ssl_session_tickets on;
  ssl_protocols TLSv1.2 TLSv1.3;
  client_body_temp_path $work/b; proxy_temp_path $work/p; fastcgi_temp_path $work/f; uwsgi_temp_path $work/u; scgi_temp_path $work/s;
  default_type application/json;
  server {
    listen 127.0.0.1:$N_HTTPS ssl http2; listen 127.0.0.1:$N_HTTP;
    ssl_certificate $work/cert.pem; ssl_certificate_key $work/key.pem;
    root $work/site;
    add_header Cache-Control "public, max-age=300";
  }
}
CONF

start_edge() { (cd "$work" && TOKIO_WORKER_THREADS=1 exec taskset -c 0 "$bin" serve --config edge.toml 2>>"$work/edge.log") & EDGE=$!; pids+=($EDGE); wait_port "$E_HTTPS"; }
start_nginx() { taskset -c 0 nginx -c "$work/nginx.conf" & NGINX=$!; pids+=($NGINX); wait_port "$N_HTTPS"; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.02; done; say "port $1 never opened"; exit 1; }
tree_pids() { echo "$1" $(pgrep -P "$1" || true); }
cpu_ticks() { local t=0; for p in $(tree_pids "$1"); do set -- $(cut -d' ' -f14,15 "/proc/$p/stat"); t=$((t + $1 + $2)); done; echo "$t"; }
rss_kb() { local t=0; for p in $(tree_pids "$1"); do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo "$t"; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
hz=$(getconf CLK_TCK)

rps() { taskset -c 1 wrk -t1 -c100 -d"${SECS}s" "$1" 2>/dev/null | awk '/Requests\/sec/ {print $2}'; }
handshakes_per_cpu_s() { # $1 port, $2 server pid: full handshakes (s_time -new) per server CPU second
  local before after n
  before=$(cpu_ticks "$2")
  n=$(taskset -c 1 openssl s_time -connect "127.0.0.1:$1" -new -time "$SECS" 2>/dev/null | awk '/connections in/ && /real/ {print $1; exit}')
  after=$(cpu_ticks "$2")
  python3 -c "print(f'{$n / max(($after - $before) / $hz, 1e-9):.0f}')"
}
latency() { taskset -c 1 python3 benches/load.py rate "https://127.0.0.1:$1/openid/v1/jwks" 1000 "$SECS" 20; }

declare -A R
measure() { # $1 name, $2 https port, $3 http port, $4 pid
  sleep 0.5; R[$1,idle]=$(rss_kb "$4")   # idle: after start, before any load
  for _ in $(seq "$ROUNDS"); do
    R[$1,https]+="$(rps "https://127.0.0.1:$2/openid/v1/jwks") "
    R[$1,http]+="$(rps "http://127.0.0.1:$3/openid/v1/jwks") "
    R[$1,hs]+="$(handshakes_per_cpu_s "$2" "$4") "
    read -r p50 p99 _ errors <<<"$(latency "$2")"
    R[$1,p50]+="$p50 "; R[$1,p99]+="$p99 "
  done
  local base; base=$(rss_kb "$4")
  coproc HOLD { taskset -c 1 python3 benches/load.py hold 127.0.0.1 "$2" 1000; }
  read -r _ <&"${HOLD[0]}"; sleep 0.5
  local held; held=$(rss_kb "$4")
  R[$1,perconn]=$(( (held - base) * 1024 / 1000 ))
  exec {HOLD[1]}>&-; wait "$HOLD_PID" 2>/dev/null || true
}

say "oidc-edge"; start_edge; measure edge "$E_HTTPS" "$E_HTTP" "$EDGE"
kill -TERM "$EDGE"; wait "$EDGE" 2>/dev/null || true
say "nginx"; start_nginx; measure nginx "$N_HTTPS" "$N_HTTP" "$NGINX"
kill -TERM "$NGINX"; wait "$NGINX" 2>/dev/null || true

say "oidc-edge startup and refreshes"
startup=$(for _ in $(seq 5); do (cd "$work" && TOKIO_WORKER_THREADS=1 python3 "$OLDPWD/benches/load.py" startup "https://127.0.0.1:$E_HTTPS/openid/v1/jwks" -- taskset -c 0 "$bin" serve --config edge.toml); done | median)
edge_config 1s; start_edge
# The same server, refreshing every second, with the file unchanged and then rewritten every
# second (new inode, so each refresh re-reads and re-validates); alternated, so that both
# halves see the same machine. The rewriter runs on the client's core.
rewrite() { while :; do
    sed -i 's/"use":"sig","kty":"RSA"/"kty":"RSA","use":"sig"/;t;s/"kty":"RSA","use":"sig"/"use":"sig","kty":"RSA"/' "$work/jwks.json"
    sleep 1; done; }
quiet_p99=""; refresh_p99=""
for _ in $(seq "$ROUNDS"); do
  read -r _ p99 _ _ <<<"$(latency "$E_HTTPS")"; quiet_p99+="$p99 "
  taskset -c 1 bash -c "$(declare -f rewrite); work=$work; rewrite" & rewriter=$!
  read -r _ p99 _ _ <<<"$(latency "$E_HTTPS")"; refresh_p99+="$p99 "
  kill "$rewriter"; wait "$rewriter" 2>/dev/null || true
done
kill -TERM "$EDGE"; wait "$EDGE" 2>/dev/null || true

m() { tr ' ' '\n' <<<"${R[$1]}" | grep -v '^$' | median; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
e_https=$(m edge,https); n_https=$(m nginx,https); e_http=$(m edge,http); n_http=$(m nginx,http)
e_hs=$(m edge,hs); n_hs=$(m nginx,hs); e_p50=$(m edge,p50); n_p50=$(m nginx,p50); e_p99=$(m edge,p99); n_p99=$(m nginx,p99)
r_p99=$(tr ' ' '\n' <<<"$refresh_p99" | grep -v '^$' | median)
q_p99=$(tr ' ' '\n' <<<"$quiet_p99" | grep -v '^$' | median)
cat <<TABLE
date: $(date -u +%Y-%m-%dT%H:%MZ); machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r); rounds: $ROUNDS x ${SECS}s
| measure | oidc-edge | nginx | ratio (oidc-edge / nginx) | target |
|---|---|---|---|---|
| keep-alive HTTPS req/s (100 conns) | $e_https | $n_https | $(ratio "$e_https" "$n_https") | >= 1.2x |
| keep-alive HTTP req/s (100 conns) | $e_http | $n_http | $(ratio "$e_http" "$n_http") | >= 1.2x |
| full TLS handshakes per server CPU-second | $e_hs | $n_hs | $(ratio "$e_hs" "$n_hs") | >= 1.0x |
| p50 latency at 1000 req/s (ms) | $e_p50 | $n_p50 | $(ratio "$e_p50" "$n_p50") | |
| p99 latency at 1000 req/s (ms) | $e_p99 | $n_p99 | $(ratio "$e_p99" "$n_p99") | <= 1.0x |
| idle RSS (KiB) | ${R[edge,idle]} | ${R[nginx,idle]} | $(ratio "${R[edge,idle]}" "${R[nginx,idle]}") | <= 10 MiB |
| RSS per idle TLS connection (bytes, 1000 held) | ${R[edge,perconn]} | ${R[nginx,perconn]} | $(ratio "${R[edge,perconn]}" "${R[nginx,perconn]}") | <= 12 KB |
| exec to first HTTPS 200 (ms, median of 5) | $startup | | | <= 20 ms |
| p99 at 1000 req/s, JWKS rewritten and refreshed every second (ms) | $r_p99 | | $(ratio "$r_p99" "$q_p99") of $q_p99 unchanged | <= 1.1x |
TABLE
