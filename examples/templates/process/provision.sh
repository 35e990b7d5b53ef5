#!/bin/sh
# Makes, stops and deletes the "machine": one agent process. Run by a Myco
# provisioner with MYCO_TRANSITION, MYCO_STATE_DIR (kept from build to build) and,
# at start, MYCO_AGENT_TOKEN and MYCO_INIT_SCRIPT in its environment.
set -eu

pidfile="$MYCO_STATE_DIR/agent.pid"
home="$MYCO_STATE_DIR/home"

stop_machine() {
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  # The whole process group (the session setsid made): the init script's sh, the
  # download and the agent it became. (dash's kill takes no "--".)
  if kill -0 -"$pid" 2>/dev/null; then
    echo "stopping the agent (process group $pid)"
    kill -TERM -"$pid" 2>/dev/null || true
    i=0
    while kill -0 -"$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
      sleep 0.1
      i=$((i + 1))
    done
    kill -KILL -"$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

case "$MYCO_TRANSITION" in
start)
  stop_machine
  mkdir -p "$home"
  echo "starting the agent of $MYCO_WORKSPACE_OWNER/$MYCO_WORKSPACE_NAME"
  # setsid: its own session, so it outlives this build and is stopped as a group.
  # Its output goes to a file, not to this build's (which would then never end).
  # A process on this host gains nothing from a port mapping on the router.
  HOME="$home" MYCO_PORTMAPPER=false \
    setsid sh -c "$MYCO_INIT_SCRIPT" >"$MYCO_STATE_DIR/agent.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "agent started (pid $(cat "$pidfile")); log: $MYCO_STATE_DIR/agent.log"
  ;;
stop)
  stop_machine
  echo "stopped"
  ;;
delete)
  stop_machine
  rm -rf "$home"
  echo "deleted"
  ;;
*)
  echo "unknown MYCO_TRANSITION $MYCO_TRANSITION" >&2
  exit 2
  ;;
esac
