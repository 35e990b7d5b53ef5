#!/usr/bin/env bash
# The coordinator under N simulated agents (`myco scaletest agents`): false
# disconnects and connects, scrape time, the coordinator's CPU and peak RSS, and the
# heartbeats it absorbed. The baseline, measured in the same run against the same
# coordinator before any agent exists, is the scrape time of an empty store.
#
#   bash bench/scaletest.sh [COUNT] [DURATION] [HEARTBEAT]
#       COUNT agents (default 10000), each with 4 apps, for DURATION (default 10m),
#       heartbeating every HEARTBEAT (default 15s, the coordinator's default),
#       scraped every 5 s.
#
# Needs a release build of myco (`cargo build --release --bin myco`, or set $MYCO).
# Each agent holds a socket on both sides: run as root so the open-file limit can be
# raised. Everything stays on loopback (127.0.0.0/8).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${1:-10000}
DURATION=${2:-10m}
HEARTBEAT=${3:-15s}
MYCO=${MYCO:-target/release/myco}
[ -x "$MYCO" ] || { echo "bench/scaletest.sh: build myco first: cargo build --release --bin myco" >&2; exit 1; }
ulimit -n $((COUNT + 4096)) 2>/dev/null || {
  echo "bench/scaletest.sh: cannot raise the open-file limit to $((COUNT + 4096)); run as root" >&2
  exit 1
}
source bench/lib.sh

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

export MYCO_CONFIG_DIR="$work/cfg"
"$MYCO" server --http-address 127.0.0.1:0 --data-dir "$work/data" --heartbeat-interval "$HEARTBEAT" \
  >"$work/server.out" 2>"$work/server.err" &
server=$!
pids+=($server)
for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
url=$(sed -n 's/^myco coordinator listening on //p' "$work/server.out")
echo "bench-password" | "$MYCO" login "$url" --first-user --username bench --password-stdin >/dev/null
token=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$work/cfg/session.json")

# Baseline: 20 scrapes of the empty coordinator.
empty=$(python3 - "$url" "$token" <<'PY'
import sys, time, urllib.request
url, token = sys.argv[1], sys.argv[2]
times = []
for _ in range(20):
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer " + token})
    t = time.perf_counter(); urllib.request.urlopen(req).read(); times.append(time.perf_counter() - t)
times.sort()
print("%.2f" % (times[len(times)//2] * 1000))
PY
)

cpu_seconds() { awk '{print ($14 + $15) / 100}' "/proc/$server/stat"; }
heartbeats() {
  curl -s -H "Authorization: Bearer $token" "$url/metrics" | awk '/^myco_coordinator_heartbeats_total /{print $2}'
}

"$MYCO" scaletest agents --count "$COUNT" --apps 4 --duration "$DURATION" --scrape-interval 5s \
  >"$work/scaletest.out" 2>"$work/scaletest.err" &
st=$!
pids+=($st)
# Measure from when every agent is connected, so setup does not count.
until grep -q "agents connected" "$work/scaletest.err" 2>/dev/null; do
  kill -0 "$st" 2>/dev/null || { cat "$work/scaletest.err" >&2; exit 1; }
  sleep 0.5
done
cpu0=$(cpu_seconds); hb0=$(heartbeats); t0=$(date +%s.%N)
rc=0
wait "$st" || rc=$?
t1=$(date +%s.%N); cpu1=$(cpu_seconds); hb1=$(heartbeats)
peak_rss=$(awk '/VmHWM/{print $2/1024}' "/proc/$server/status")

cat "$work/scaletest.err"
summary=$(grep '^summary:' "$work/scaletest.out")
echo "$summary"
python3 - "$COUNT" "$HEARTBEAT" "$empty" "$cpu0" "$cpu1" "$hb0" "$hb1" "$t0" "$t1" "$peak_rss" "$summary" <<'PY'
import re, sys
count, hb, empty, cpu0, cpu1, hb0, hb1, t0, t1, rss, summary = sys.argv[1:]
wall = float(t1) - float(t0)
p50 = re.search(r"p50 ([\d.]+)(ms|s|µs)", summary)
def ms(m):
    v, unit = float(m.group(1)), m.group(2)
    return v * {"ms": 1, "s": 1000, "µs": 0.001}[unit]
p50ms = ms(p50)
print(f"agents {count}, heartbeat {hb}, {wall:.0f} s measured")
print(f"coordinator CPU: {float(cpu1) - float(cpu0):.1f} s over {wall:.0f} s = {(float(cpu1) - float(cpu0)) / wall * 100:.1f}% of one core")
print(f"coordinator peak RSS: {float(rss):.0f} MiB")
print(f"heartbeats absorbed: {(float(hb1) - float(hb0)) / wall:.0f}/s")
print(f"scrape p50 {p50ms:.1f} ms vs {float(empty):.2f} ms for the empty store = {p50ms / float(empty):.1f}x")
PY
exit "$rc"
