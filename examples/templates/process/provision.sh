#!/bin/sh
# Makes, stops and deletes the "machine": one agent process in a network namespace
# of its own. Run by a Myco provisioner with MYCO_TRANSITION, MYCO_WORKSPACE_ID,
# MYCO_ACCESS_URL, MYCO_STATE_DIR (kept from build to build) and, at start,
# MYCO_AGENT_TOKEN and MYCO_INIT_SCRIPT in its environment. See README.md.
set -eu

pidfile="$MYCO_STATE_DIR/agent.pid"
netfile="$MYCO_STATE_DIR/net"
home="$MYCO_STATE_DIR/home"

# The namespaces' bridge and network: the bridge holds .0.1; a workspace's
# namespace gets one other address, leased by a directory under $leases.
bridge=myco0
prefix=10.213
leases=/run/myco-process-template
netns="myco-$MYCO_WORKSPACE_ID"
insecure_http=false

# Why this machine shares the host's network, or nothing when it gets its own.
no_netns_reason() {
  if [ "$(id -u)" != 0 ]; then
    echo "the provisioner does not run as root"
    return
  fi
  for tool in ip flock; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "'$tool' is not installed"
      return
    fi
  done
  host=$(printf '%s\n' "$MYCO_ACCESS_URL" | sed -E 's#^[a-z]+://(\[[^]]*\]|[^/:]*).*#\1#')
  case "$host" in
  127.* | localhost | "[::1]")
    echo "the coordinator's URL ($MYCO_ACCESS_URL) is on loopback, which a namespace cannot reach"
    ;;
  esac
}

# Under the lock: the bridge, a leased address, the namespace and its veth link.
netns_up() {
  exec 9>"$leases.lock"
  flock 9
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    ip addr add "$prefix.0.1/16" dev "$bridge"
    ip link set "$bridge" up
  fi
  mkdir -p "$leases"
  # Start from a number the workspace's ID picks; step past leased ones.
  n=$(($(printf %s "$MYCO_WORKSPACE_ID" | cksum | cut -d' ' -f1) % 65533 + 2))
  tries=0
  until mkdir "$leases/$n" 2>/dev/null; do
    n=$((n % 65533 + 2))
    tries=$((tries + 1))
    if [ "$tries" -gt 65533 ]; then
      echo "no address left in $prefix.0.0/16 for another namespace" >&2
      exit 1
    fi
  done
  echo "$n" >"$netfile"
  addr="$prefix.$((n / 256)).$((n % 256))"
  ip netns add "$netns"
  # Without IPv6, no link-local address finishes duplicate address detection a
  # moment after the link is up, which the agent would take for a network change.
  ip netns exec "$netns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip link add "mycov$n" type veth peer name eth0 netns "$netns"
  ip link set "mycov$n" master "$bridge" up
  ip -n "$netns" link set lo up
  ip -n "$netns" addr add "$addr/16" dev eth0
  ip -n "$netns" link set eth0 up
  ip -n "$netns" route add default via "$prefix.0.1"
  outbound
  exec 9>&-
  echo "network namespace $netns, address $addr on bridge $bridge"
}

# A coordinator on another host is reached through this one: forwarding and a
# masquerade for the bridge's network. One on this host needs neither.
outbound() {
  host=$(printf '%s\n' "$MYCO_ACCESS_URL" | sed -E 's#^[a-z]+://([^/:]*).*#\1#')
  ip=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')
  if [ -n "$ip" ] && ip route get "$ip" | grep -q '^local '; then
    # Plain HTTP to it crosses this host's bridge only: the agent may send its
    # token that way (it refuses plain HTTP off loopback unless told).
    case "$MYCO_ACCESS_URL" in
    http://*) insecure_http=true ;;
    esac
    return 0
  fi
  if ! command -v nft >/dev/null 2>&1; then
    echo "warning: $host is not on this host and 'nft' is not installed: the namespace has no way out" >&2
    return 0
  fi
  sysctl -qw net.ipv4.ip_forward=1
  nft -f - <<EOF
table ip myco_process {}
delete table ip myco_process
table ip myco_process {
  chain postrouting {
    type nat hook postrouting priority srcnat;
    ip saddr $prefix.0.0/16 oifname != "$bridge" masquerade
  }
}
EOF
}

# Under the lock: the namespace (which takes its end of the veth link with it), the
# lease, and the bridge with the last of them.
netns_down() {
  [ -f "$netfile" ] || return 0
  exec 9>"$leases.lock"
  flock 9
  n=$(cat "$netfile")
  if ip netns list | awk '{ print $1 }' | grep -qx "$netns"; then
    for pid in $(ip netns pids "$netns"); do
      kill -KILL "$pid" 2>/dev/null || true
    done
    ip netns del "$netns"
  fi
  ip link del "mycov$n" 2>/dev/null || true
  rmdir "$leases/$n" 2>/dev/null || true
  rm -f "$netfile"
  if ip link show "$bridge" >/dev/null 2>&1 && [ -z "$(ip -o link show master "$bridge")" ]; then
    ip link del "$bridge"
    if command -v nft >/dev/null 2>&1; then
      nft delete table ip myco_process 2>/dev/null || true
    fi
  fi
  exec 9>&-
}

stop_machine() {
  if [ -f "$pidfile" ]; then
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
  fi
  netns_down
}

case "$MYCO_TRANSITION" in
start)
  stop_machine
  mkdir -p "$home"
  # Not the template's directory, which is gone once this build ends.
  cd "$home"
  reason=$(no_netns_reason)
  if [ -n "$reason" ]; then
    echo "sharing the host's network: $reason"
    in_netns=""
  else
    netns_up
    in_netns="ip netns exec $netns"
  fi
  echo "starting the agent of $MYCO_WORKSPACE_OWNER/$MYCO_WORKSPACE_NAME"
  # setsid: its own session, so it outlives this build and is stopped as a group
  # (`ip netns exec` and setsid exec, so $! is the session's leader).
  # Its output goes to a file, not to this build's (which would then never end).
  # A machine behind this host gains nothing from a port mapping on the router.
  HOME="$home" MYCO_PORTMAPPER=false MYCO_INSECURE_HTTP="$insecure_http" \
    $in_netns setsid sh -c "$MYCO_INIT_SCRIPT" >"$MYCO_STATE_DIR/agent.log" 2>&1 </dev/null &
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
