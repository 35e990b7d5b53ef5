#!/usr/bin/env bash
# The coordinator under N simulated agents (`myco scaletest agents`): false
# disconnects and connects, scrape time (request to full body, and until the headers,
# which the coordinator sends once its work is done), the coordinator's CPU and peak
# RSS, the heartbeats it absorbed, and from its debug log the phases of its scrapes.
# The baseline, measured in the same run against the same coordinator before any agent
# exists, is the scrape time of an empty store.
#
#   bash bench/scaletest.sh [COUNT] [DURATION] [HEARTBEAT] [EXTRA]
#       COUNT live agents (default 10000), each with 4 apps, for DURATION (default
#       10m), heartbeating every HEARTBEAT (default 15s, the coordinator's default),
#       scraped every 5 s; EXTRA more agents (default 0) in the store that never
#       connect (one process may hold ~20k sockets here, so 100k live channels do not
#       fit: `bash bench/scaletest.sh 10000 3m 1s 90000` judges 100k agents per scrape
#       and offers 10k heartbeats/s).
#
# Needs a release build of myco (`cargo build --release --bin myco`, or set $MYCO).
# Each agent holds a socket on both sides: run as root so the open-file limit can be
# raised. Everything stays on loopback (127.0.0.0/8).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${1:-10000}
DURATION=${2:-10m}
HEARTBEAT=${3:-15s}
EXTRA=${4:-0}
MYCO=${MYCO:-target/release/myco}
[ -x "$MYCO" ] || { echo "bench/scaletest.sh: build myco first: cargo build --release --bin myco" >&2; exit 1; }
ulimit -n $((COUNT + 4096)) 2>/dev/null || {
  echo "bench/scaletest.sh: cannot raise the open-file limit to $((COUNT + 4096)); run as root" >&2
  exit 1
}
source bench/lib.sh


export MYCO_CONFIG_DIR="$work/cfg"
# The coordinator logs each scrape's phases at debug level (read at the end).
RUST_LOG=${RUST_LOG:-warn,coordinator::metrics=debug} "$MYCO" server --http-address 127.0.0.1:0 --data-dir "$work/data" --heartbeat-interval "$HEARTBEAT" \
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
# One scrape's counters: heartbeats, and the sum and count of the coordinator's own
# scrape times (these scrapes count in them too, like the scaletest's).
counters() {
  curl -s -H "Authorization: Bearer $token" "$url/metrics" | awk '
    /^myco_coordinator_heartbeats_total /{h=$2}
    /^myco_agents_collection_seconds_sum /{s=$2}
    /^myco_agents_collection_seconds_count /{c=$2}
    END{print h, s, c}'
}

"$MYCO" scaletest agents --count "$COUNT" --extra-agents "$EXTRA" --apps 4 --duration "$DURATION" --scrape-interval 5s \
  >"$work/scaletest.out" 2>"$work/scaletest.err" &
st=$!
pids+=($st)
# Measure from when every agent is connected, so setup does not count.
until grep -q "agents connected" "$work/scaletest.err" 2>/dev/null; do
  kill -0 "$st" 2>/dev/null || { cat "$work/scaletest.err" >&2; exit 1; }
  sleep 0.5
done
cpu0=$(cpu_seconds); read -r hb0 sum0 n0 < <(counters); t0=$(date +%s.%N)
rc=0
wait "$st" || rc=$?
t1=$(date +%s.%N); cpu1=$(cpu_seconds); read -r hb1 sum1 n1 < <(counters)
peak_rss=$(awk '/VmHWM/{print $2/1024}' "/proc/$server/status")
# The coordinator's own time per scrape while the agents ran (read, judge, encode; no
# transfer), the empty-store baseline scrapes excluded.
collection=$(python3 -c "print('%.1f' % (($sum1 - $sum0) / ($n1 - $n0) * 1000))")

cat "$work/scaletest.err"
summary=$(grep '^summary:' "$work/scaletest.out")
echo "$summary"
python3 - "$COUNT" "$EXTRA" "$HEARTBEAT" "$empty" "$cpu0" "$cpu1" "$hb0" "$hb1" "$t0" "$t1" "$peak_rss" "$summary" "$collection" <<'PY'
import re, sys
count, extra, hb, empty, cpu0, cpu1, hb0, hb1, t0, t1, rss, summary, collection = sys.argv[1:]
wall = float(t1) - float(t0)
p50 = re.search(r"p50 ([\d.]+)(ms|s|µs)", summary)
def ms(m):
    v, unit = float(m.group(1)), m.group(2)
    return v * {"ms": 1, "s": 1000, "µs": 0.001}[unit]
p50ms = ms(p50)
print(f"agents {count} live + {extra} never connected, heartbeat {hb}, {wall:.0f} s measured")
print(f"coordinator CPU: {float(cpu1) - float(cpu0):.1f} s over {wall:.0f} s = {(float(cpu1) - float(cpu0)) / wall * 100:.1f}% of one core")
print(f"coordinator peak RSS: {float(rss):.0f} MiB")
print(f"heartbeats absorbed: {(float(hb1) - float(hb0)) / wall:.0f}/s")
print(f"scrape p50 {p50ms:.1f} ms vs {float(empty):.2f} ms for the empty store = {p50ms / float(empty):.1f}x")
print(f"coordinator's own time per scrape (read, judge, encode), mean: {collection} ms")
PY
# The coordinator's account of its scrapes: the first after its start reads, decodes and
# renders every agent; later ones by phase (read the store, judge and render what
# changed, build the changed family blocks).
python3 - "$work/server.err" <<'PY'
import re, statistics, sys
def ms(v):
    m = re.match(r"([\d.]+)(µs|ms|s)$", v)
    return float(m.group(1)) * {"µs": 0.001, "ms": 1, "s": 1000}[m.group(2)]
rows = []
for line in open(sys.argv[1], errors="replace"):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    m = re.search(r"scrape agents=(\d+) rendered=(\d+) rebuilt=\d+ read=(\S+) judged=(\S+) took=(\S+)", line)
    if m and m.group(1) != "0":
        rows.append((int(m.group(2)), ms(m.group(3)), ms(m.group(4)), ms(m.group(5))))
if len(rows) > 1:
    first, rest = rows[0], rows[1:]
    med = statistics.median
    print(f"coordinator's first scrape after start: {first[3]:.1f} ms ({first[0]} agents rendered)")
    print(f"coordinator's later scrapes (median of {len(rest)}): read {med([r[1] for r in rest]):.1f} ms, "
          f"judge and render {med([r[2] - r[1] for r in rest]):.1f} ms ({med([r[0] for r in rest]):.0f} agents rendered), "
          f"blocks {med([r[3] - r[2] for r in rest]):.1f} ms, all {med([r[3] for r in rest]):.1f} ms (max {max(r[3] for r in rest):.1f})")
PY
exit "$rc"
