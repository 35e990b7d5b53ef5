#!/bin/sh
# Builds a minimal workspace image from this host's files, for machines that cannot
# pull from a registry (the tests' machine): Debian's static busybox (a shell and
# wget for the init script) and the C library the agent links against.
#   ./local-image.sh [NAME]   (default localhost/myco-workspace-minimal:latest)
set -eu
name=${1:-localhost/myco-workspace-minimal:latest}
busybox=$(command -v busybox) || {
  echo "busybox is not installed (Debian: apt-get install busybox-static)" >&2
  exit 1
}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/proc" "$root/sys" "$root/dev"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
# The agent is a glibc program: its loader and libraries, where it looks for them.
for lib in /lib64/ld-linux-x86-64.so.2 /lib/x86_64-linux-gnu/libc.so.6 \
  /lib/x86_64-linux-gnu/libm.so.6 /lib/x86_64-linux-gnu/libgcc_s.so.1; do
  if [ -e "$lib" ]; then
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  fi
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
tar -C "$root" -c . | podman import --change 'ENV PATH=/bin' --change 'CMD ["sh"]' - "$name" >/dev/null
echo "$name"
