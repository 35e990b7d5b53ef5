# Shared by the benchmarks (sourced, not run). Needs $MYCO (a release build of myco).

# A temp dir in $work and a pids array; on exit the processes are killed and the dir
# removed (after the caller's own `extra_cleanup`, if it defines one).
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if declare -F extra_cleanup >/dev/null; then extra_cleanup; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a coordinator on loopback, its first user "bench", workspace "bench" and its
# agent; sets $url. Everything lives in $work.
start_myco() {
  export MYCO_CONFIG_DIR="$work/cfg" MYCO_MESH_BIND=127.0.0.1:0 MYCO_PORTMAPPER=false
  "$MYCO" server --http-address 127.0.0.1:0 --data-dir "$work/data" >"$work/server.out" 2>"$work/server.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  url=$(sed -n 's/^myco coordinator listening on //p' "$work/server.out")
  echo "bench-password" | "$MYCO" login "$url" --first-user --username bench --password-stdin >/dev/null
  local token
  token=$("$MYCO" create bench -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent_tokens"][0]["token"])')
  "$MYCO" agent --url "$url" --token "$token" --data-dir "$work/agent" 2>"$work/agent.err" &
  pids+=($!)
  for _ in $(seq 200); do
    "$MYCO" show bench -o json | python3 -c 'import json,sys; a=json.load(sys.stdin)["agents"][0]; sys.exit(0 if (a.get("connection") or {}).get("relay_url") and a.get("ssh_host_key") else 1)' && return 0
    sleep 0.05
  done
  echo "the agent never connected; see $work/agent.err" >&2
  return 1
}

# ratio A B: A / B with two decimals.
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
