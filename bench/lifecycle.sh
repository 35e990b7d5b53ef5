#!/usr/bin/env bash
# The lifecycle's costs.
#
# 1. `myco ssh WS -- true` on a stopped workspace of the process template, until the
#    command's exit: split into the start build (queued to ended), the agent's connect
#    (build ended to the agent's control channel up, from `myco show`) and the rest
#    (the ticket, the mesh and SSH), against `myco ssh WS -- true` on the running
#    workspace in the same run. ROUNDS rounds, each stop then start-by-ssh.
# 2. Judging 10,000 workspaces' deadlines in one schedule tick, against reading them
#    from the store (what every tick and every /metrics scrape does).
#
#   bash bench/lifecycle.sh [ROUNDS]     (default 5)
#
# Needs a release build: cargo build --release --bin myco (-> $MYCO), curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-5}
MYCO=${MYCO:-target/release/myco}
[ -x "$MYCO" ] || { echo "bench/lifecycle.sh: build $MYCO first (see the header)" >&2; exit 1; }
MYCO=$(realpath "$MYCO")
source bench/lib.sh

start_coordinator
"$MYCO" templates push examples/templates/process >/dev/null
"$MYCO" create bench --template process >/dev/null 2>&1
now_ms() { date +%s%3N; }
for _ in $(seq 200); do "$MYCO" ssh bench -- true 2>/dev/null && break; sleep 0.1; done

printf 'round total_ms build_ms connect_ms rest_ms running_ssh_ms\n'
for r in $(seq "$ROUNDS"); do
  t0=$(now_ms)
  "$MYCO" ssh bench -- true
  running=$(( $(now_ms) - t0 ))
  "$MYCO" stop bench >/dev/null 2>&1
  # The agent must be seen gone, or `connect` would still find it.
  for _ in $(seq 200); do
    "$MYCO" show bench -o json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["agents"][0]["status"]!="connected" else 1)' && break
    sleep 0.1
  done
  t0=$(now_ms)
  "$MYCO" ssh bench -- true 2>/dev/null
  t1=$(now_ms)
  "$MYCO" show bench -o json | python3 -c '
import json, sys, datetime
t0, t1, r, running = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ws = json.load(sys.stdin)
ms = lambda s: int(datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)
b = ws["latest_build"]
built = ms(b["ended_at"]) - ms(b["created_at"])
connected = ms(ws["agents"][0]["connection"]["connected_at"]) - ms(b["ended_at"])
total = t1 - t0
print(r, total, built, connected, total - built - connected, running)
' "$t0" "$t1" "$r" "$running"
done

echo
cargo test --release -q -p coordinator --lib autostop::tests::bench_judging_ten_thousand_workspaces -- --ignored --nocapture 2>/dev/null | grep '^workspaces='
