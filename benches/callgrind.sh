#!/usr/bin/env bash
# Instructions per public request, counted by callgrind: the router of benches/documents.rs
# answers N1 and then N2 requests of each case, and the difference of the two totals divided by
# N2 - N1 is what one request costs (start-up, setup and exit cancel out). Deterministic, so
# that a change to the hot path can be compared before and after on a busy machine, where
# wall-clock benchmarks drift. See benches/README.md.
#
#   benches/callgrind.sh ["jwks 200" ...]     (default: every case; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${N1:-2000}
N2=${N2:-12000}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
# The bench profile is the release one (fat LTO); symbols are not needed, only totals.
bin=$(cargo bench --bench documents --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "documents" and m.get("executable"):
        print(m["executable"])')
[ -x "$bin" ] || { echo "no bench binary" >&2; exit 1; }
if [ "$#" -eq 0 ]; then
  set -- "discovery 200" "jwks 200" "jwks 304" "jwks 200 browser" "jwks 200 aws"
fi
total() { # $1 requests, $2 case: the instructions callgrind collected
  OIDC_EDGE_CALLGRIND=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$2" 2>&1 \
    | awk '/Collected :/ {print $NF}'
}
printf '| case | instructions per request |\n|---|---|\n'
for case in "$@"; do
  a=$(total "$N1" "$case"); b=$(total "$N2" "$case")
  printf '| %s | %s |\n' "$case" "$(( (b - a) / (N2 - N1) ))"
done
