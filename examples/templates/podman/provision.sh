#!/bin/sh
# Makes, stops and deletes the machine: one podman container per workspace, named
# myco-<workspace id>, with a volume myco-home-<workspace id> as its home. Run by a
# Myco provisioner with MYCO_TRANSITION, MYCO_WORKSPACE_ID, MYCO_WORKSPACE_NAME,
# MYCO_ACCESS_URL and, at start, MYCO_AGENT_TOKEN and MYCO_INIT_SCRIPT.
set -eu

# The image: any with a POSIX shell and curl, wget or busybox (the init script
# fetches the agent with one of them); a file `image` in the template names
# another. Build this one with `podman build -t myco-workspace .` from the
# Containerfile here.
image=localhost/myco-workspace:latest
if [ -f image ]; then
  image=$(cat image)
fi
# Where the volume is mounted, and HOME inside (the agent keeps its keys there, so
# its SSH host key survives a stop and start).
home=/root

name="myco-$MYCO_WORKSPACE_ID"
volume="myco-home-$MYCO_WORKSPACE_ID"

# Host settings podman needs on this machine (a cgroup manager, limits), if the
# template carries them: see README.md.
if [ -f containers.conf ]; then
  CONTAINERS_CONF="$PWD/containers.conf"
  export CONTAINERS_CONF
fi

# Whether the coordinator is on this host: plain HTTP to it then crosses the
# containers' bridge only, and the agent may send its token that way (it refuses
# plain HTTP off loopback unless told).
insecure_http=false
host=$(printf '%s\n' "$MYCO_ACCESS_URL" | sed -E 's#^[a-z]+://([^/:]*).*#\1#')
case "$MYCO_ACCESS_URL" in
http://*)
  ip=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')
  if [ -n "$ip" ] && ip route get "$ip" 2>/dev/null | grep -q '^local '; then
    insecure_http=true
  fi
  ;;
esac
case "$host" in
127.* | localhost)
  echo "the coordinator's URL ($MYCO_ACCESS_URL) is on loopback, which a container cannot reach; run myco server on an address of this host" >&2
  exit 1
  ;;
esac

remove_container() {
  if podman container exists "$name"; then
    echo "stopping container $name"
    podman stop --time 10 "$name" >/dev/null
    podman rm --force "$name" >/dev/null
  fi
}

case "$MYCO_TRANSITION" in
start)
  remove_container
  podman volume exists "$volume" || podman volume create "$volume" >/dev/null
  echo "starting container $name from $image"
  # The token goes in by the environment podman passes on (`--env NAME` without
  # a value), never on its command line. The init script fetches the agent and
  # becomes it: the container lives as long as the agent. --init: a PID 1 that
  # passes `podman stop`'s SIGTERM on (a shell as PID 1 ignores it).
  podman run --detach --init --name "$name" --hostname "$MYCO_WORKSPACE_NAME" \
    --label "myco.workspace=$MYCO_WORKSPACE_ID" \
    --volume "$volume:$home" --env HOME="$home" \
    --env MYCO_AGENT_TOKEN --env MYCO_INSECURE_HTTP="$insecure_http" \
    --env MYCO_PORTMAPPER=false \
    "$image" sh -c "$MYCO_INIT_SCRIPT"
  echo "container $name started"
  ;;
stop)
  remove_container
  echo "stopped"
  ;;
delete)
  remove_container
  if podman volume exists "$volume"; then
    podman volume rm --force "$volume" >/dev/null
  fi
  echo "deleted"
  ;;
*)
  echo "unknown MYCO_TRANSITION $MYCO_TRANSITION" >&2
  exit 2
  ;;
esac
