#!/usr/bin/env bash
# The agent's footprint: the binary's size (as built, and stripped of its symbols),
# and its RSS and CPU while idle (connected, heartbeating every 15 s, reporting stats,
# no session) over DURATION seconds, for the full `myco` and the agent-only build
# that the coordinator serves to workspace images, side by side in one run against
# one coordinator.
#
#   bash bench/agent-footprint.sh [DURATION]     (default 60)
#
# Needs both release builds:
#   cargo build --release --bin myco                         -> $MYCO  (target/release/myco)
#   cargo build --release -p cli --no-default-features --target-dir target/agent
#                                                            -> $AGENT (target/agent/release/myco)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-60}
MYCO=${MYCO:-target/release/myco}
AGENT=${AGENT:-target/agent/release/myco}
for b in "$MYCO" "$AGENT"; do
  [ -x "$b" ] || { echo "bench/agent-footprint.sh: build $b first (see the header)" >&2; exit 1; }
done
source bench/lib.sh

start_coordinator

# start NAME BIN: workspace NAME and its agent run by BIN (token by the environment);
# sets $started to the agent's pid once it is connected. (Not a command substitution:
# its subshell would run the EXIT trap and take everything down.)
start() {
  local name=$1 bin=$2 token
  token=$("$MYCO" create "$name" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent_tokens"][0]["token"])')
  MYCO_AGENT_TOKEN=$token "$bin" agent --url "$url" --data-dir "$work/agent-$name" 2>"$work/agent-$name.err" &
  local pid=$!
  pids+=($pid)
  for _ in $(seq 200); do
    "$MYCO" show "$name" -o json | python3 -c 'import json,sys; a=json.load(sys.stdin)["agents"][0]; sys.exit(0 if (a.get("connection") or {}).get("relay_url") and a.get("ssh_host_key") else 1)' && { started=$pid; return 0; }
    sleep 0.05
  done
  echo "the agent of $name never connected; see $work/agent-$name.err" >&2
  exit 1
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

start full "$MYCO"
full=$started
start small "$AGENT"
small=$started
sleep 5 # past start-up: the first netcheck, the first stats
f0=$(ticks "$full"); s0=$(ticks "$small")
sleep "$DURATION"
f1=$(ticks "$full"); s1=$(ticks "$small")
hz=$(getconf CLK_TCK)

row() {
  local label=$1 bin=$2 pid=$3 t0=$4 t1=$5 size stripped
  size=$(stat -c %s "$bin")
  strip -o "$work/stripped" "$bin"
  stripped=$(stat -c %s "$work/stripped")
  python3 - "$label" "$size" "$stripped" "$(kib "$pid" VmRSS)" "$(kib "$pid" VmHWM)" "$t0" "$t1" "$hz" "$DURATION" <<'PY'
import sys
label, size, stripped, rss, hwm, t0, t1, hz, dur = sys.argv[1:]
cpu = (int(t1) - int(t0)) / int(hz) / float(dur) * 100
mib = lambda b: int(b) / 2**20
print(f"| {label} | {mib(size):.1f} MiB | {mib(stripped):.1f} MiB | {int(rss)/1024:.1f} MiB | {int(hwm)/1024:.1f} MiB | {cpu:.2f}% |")
PY
}
echo "| agent binary | size | stripped | idle RSS | peak RSS | idle CPU over ${DURATION}s |"
echo "|---|---|---|---|---|---|"
row "myco (full)" "$MYCO" "$full" "$f0" "$f1"
row "myco agent-only" "$AGENT" "$small" "$s0" "$s1"
