#!/usr/bin/env bash
# Instructions and system calls per keystroke and per MiB on the IDE path (OpenSSH's
# client, through config-ssh's ProxyCommand `myco ssh --stdio`, the mesh, the agent)
# and on `myco ssh`. Instructions are counted by valgrind's callgrind: counts, not
# seconds, so the same whatever else the machine does. Every process runs under the
# tool; a figure is the difference between a long and a short session (so logins and
# exits cancel out), divided by the extra keystrokes or MiB, and split by what the code
# does (bench/ssh-instructions-split.py).
#
#   bash bench/ssh-instructions.sh               (instructions, callgrind)
#   TOOL=strace bash bench/ssh-instructions.sh   (system calls, strace -f -c)
#
# Sizes: KEYS_SHORT/KEYS_LONG keystrokes (default 50/250), MIB_SHORT/MIB_LONG MiB each
# way (default 8/40). PATHS=via measures only OpenSSH through config-ssh (default
# "via myco"). KEEP=DIR keeps the raw files. Needs valgrind, strace,
# openssh-client, python3 and a release build of myco (`cargo build --release --bin
# myco`, or set $MYCO). All on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

MYCO=${MYCO:-target/release/myco}
TOOL=${TOOL:-callgrind}
KEYS_SHORT=${KEYS_SHORT:-50}
KEYS_LONG=${KEYS_LONG:-250}
MIB_SHORT=${MIB_SHORT:-8}
MIB_LONG=${MIB_LONG:-40}
case $TOOL in
  callgrind | strace) ;;
  *) echo "bench/ssh-instructions.sh: TOOL is callgrind or strace, not $TOOL" >&2; exit 1 ;;
esac
for tool in valgrind callgrind_control callgrind_annotate strace ssh python3 "$MYCO"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || { echo "bench/ssh-instructions.sh: missing $tool" >&2; exit 1; }
done
MYCO=$(realpath "$MYCO")
source bench/lib.sh
extra_cleanup() { if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/{agent,client,stdio}.* "$KEEP"/ 2>/dev/null || true; fi; }

# tool_prefix FILE [nofollow]: sets $pre, the command line that runs a process under
# the tool, its counts written to FILE. OpenSSH's client is traced without its
# children (nofollow): its ProxyCommand is traced by a strace of its own, and a traced
# process cannot trace.
tool_prefix() {
  if [ "$TOOL" = callgrind ]; then
    pre=(valgrind -q --tool=callgrind "--callgrind-out-file=$1")
  elif [ "${2:-}" = nofollow ]; then
    pre=(strace -c -o "$1")
  else
    pre=(strace -f -c -o "$1")
  fi
}

start_coordinator
token=$("$MYCO" create bench -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["agent_tokens"][0]["token"])')
# The agent: under callgrind for the whole run (each measurement zeroes its counters
# first and dumps them after, with callgrind_control), or plain with strace attached
# to its threads for each measurement.
if [ "$TOOL" = callgrind ]; then
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.agent" \
    "$MYCO" agent --url "$url" --token "$token" --data-dir "$work/agent" 2>"$work/agent.err" &
else
  "$MYCO" agent --url "$url" --token "$token" --data-dir "$work/agent" 2>"$work/agent.err" &
fi
agent_pid=$!
pids+=($agent_pid)
wait_for_agent bench 60 # slower under valgrind
"$MYCO" config-ssh --ssh-config-file "$work/ssh_config" -y >/dev/null
# The same block with the ProxyCommand under the tool (its counts in $work/proxy.out).
tool_prefix "$work/proxy.out"
sed "s|ProxyCommand \"$MYCO\"|ProxyCommand ${pre[*]} \"$MYCO\"|" "$work/ssh_config" >"$work/ssh_config.tool"
# Once outside the tool: the host key pinned, the path up.
ssh -F "$work/ssh_config" -o BatchMode=yes myco.bench true

# run LABEL CMD...: runs CMD with the agent measured alone into $work/agent.LABEL.
run() {
  local label=$1
  shift
  if [ "$TOOL" = callgrind ]; then
    callgrind_control -z "$agent_pid" >/dev/null 2>&1
    "$@"
    callgrind_control -d "$label" "$agent_pid" >/dev/null 2>&1
    # The dump is written as cg.agent.<n>; name it.
    mv "$(ls -t "$work"/cg.agent.* | head -1)" "$work/agent.$label"
  else
    # Every thread of the agent, not its children (the commands it runs).
    local threads=()
    for t in /proc/"$agent_pid"/task/*; do threads+=(-p "${t##*/}"); done
    strace -c -o "$work/agent.$label" "${threads[@]}" 2>/dev/null &
    local tracer=$!
    sleep 1 # attached to every thread
    "$@"
    kill -INT "$tracer"
    wait "$tracer" || true
  fi
}

keys() { # keys N PATH: N keystrokes through a remote PTY
  local n=$1 path=$2
  tool_prefix "$work/client.$path.keys$n" "$([ "$path" = via ] && echo nofollow)"
  if [ "$path" = via ]; then
    python3 bench/keystroke.py "$n" "${pre[@]}" \
      ssh -F "$work/ssh_config.tool" -o BatchMode=yes -tt myco.bench 'echo READY; cat' >/dev/null
    mv "$work/proxy.out" "$work/stdio.via.keys$n"
  else
    python3 bench/keystroke.py "$n" "${pre[@]}" "$MYCO" ssh -t bench -- 'echo READY; cat' >/dev/null
  fi
}

bulk() { # bulk MIB up|down PATH
  local mib=$1 dir=$2 path=$3 client
  tool_prefix "$work/client.$path.$dir$mib" "$([ "$path" = via ] && echo nofollow)"
  if [ "$path" = via ]; then
    client=("${pre[@]}" ssh -F "$work/ssh_config.tool" -o BatchMode=yes myco.bench)
  else
    client=("${pre[@]}" "$MYCO" ssh bench --)
  fi
  if [ "$dir" = up ]; then
    head -c "${mib}M" /dev/zero | "${client[@]}" 'cat >/dev/null'
  else
    "${client[@]}" "head -c ${mib}M /dev/zero" >/dev/null
  fi
  if [ "$path" = via ]; then
    mv "$work/proxy.out" "$work/stdio.via.$dir$mib"
  fi
}

for path in ${PATHS:-via myco}; do
  for n in "$KEYS_SHORT" "$KEYS_LONG"; do run "$path.keys$n" keys "$n" "$path"; done
  for dir in up down; do
    for m in "$MIB_SHORT" "$MIB_LONG"; do run "$path.$dir$m" bulk "$m" "$dir" "$path"; done
  done
done

# The split: per keystroke and per MiB, by process and by what the code does.
python3 bench/ssh-instructions-split.py "$TOOL" "$work" "$KEYS_SHORT" "$KEYS_LONG" "$MIB_SHORT" "$MIB_LONG"
