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
  start_coordinator
  add_agent bench "$MYCO"
}

# Starts a coordinator on loopback and its first user "bench", logged in; sets $url.
start_coordinator() {
  export MYCO_CONFIG_DIR="$work/cfg" MYCO_MESH_BIND=127.0.0.1:0 MYCO_PORTMAPPER=false
  # Port 0 for QUIC address discovery too: another coordinator may hold the default.
  "$MYCO" server --http-address 127.0.0.1:0 --relay-quic-address 127.0.0.1:0 --data-dir "$work/data" >"$work/server.out" 2>"$work/server.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$work/server.out" 2>/dev/null && break; sleep 0.05; done
  url=$(sed -n 's/^myco coordinator listening on //p' "$work/server.out")
  echo "bench-password" | "$MYCO" login "$url" --first-user --username bench --password-stdin >/dev/null
}

# add_agent NAME BIN: workspace NAME on the running coordinator, its agent run by the
# myco binary BIN; returns once the agent is connected and has its SSH host key.
add_agent() {
  local name=$1 bin=$2 token
  token=$("$MYCO" create "$name" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent_tokens"][0]["token"])')
  "$bin" agent --url "$url" --token "$token" --data-dir "$work/agent-$name" 2>"$work/agent-$name.err" &
  pids+=($!)
  wait_for_agent "$name" 30 || { echo "see $work/agent-$name.err" >&2; return 1; }
}

# wait_for_agent NAME SECONDS: returns once the agent of workspace NAME is connected
# and has its SSH host key, or fails after SECONDS.
wait_for_agent() {
  local name=$1 deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    "$MYCO" show "$name" -o json | python3 -c 'import json,sys; a=json.load(sys.stdin)["agents"][0]; sys.exit(0 if (a.get("connection") or {}).get("relay_url") and a.get("ssh_host_key") else 1)' && return 0
    sleep 0.05
  done
  echo "the agent of $name never connected" >&2
  return 1
}

# Starts OpenSSH's own sshd ($SSHD, default /usr/sbin/sshd) on a free loopback port,
# with a throwaway host key and one authorized client key; sets $ossh, the client
# command line that logs in to it.
start_sshd() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
  cp "$work/client_key.pub" "$work/authorized_keys"
  cat >"$work/sshd_config" <<CFG
Port $port
ListenAddress 127.0.0.1
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $work/sshd.pid
Subsystem sftp internal-sftp
CFG
  mkdir -p /run/sshd
  "${SSHD:-/usr/sbin/sshd}" -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
  pids+=($!)
  ossh=(ssh -F /dev/null -p "$port" -i "$work/client_key" -o IdentitiesOnly=yes -o BatchMode=yes
    -o UserKnownHostsFile="$work/known_hosts" -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR
    "$(id -un)@127.0.0.1")
  for _ in $(seq 100); do "${ossh[@]}" true 2>/dev/null && return 0; sleep 0.05; done
  echo "sshd did not start; see $work/sshd.log" >&2
  return 1
}

# ratio A B: A / B with two decimals.
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }

# keystroke_round N :: CMD... [:: CMD...]: one round of bench/keystroke.py, N keystrokes
# per session; prints one line: each session's median echo in ms, in order, then each
# session after the first as a ratio to the first (OpenSSH, in the scripts).
keystroke_round() {
  local n=$1
  shift
  python3 bench/keystroke.py "$n" "$@" | awk '
    { m[NR] = $1 }
    END { line = m[1]; for (i = 2; i <= NR; i++) line = line " " m[i];
          for (i = 2; i <= NR; i++) line = line sprintf(" %.2f", m[i] / m[1]); print line }'
}
