#!/usr/bin/env bash
# Mesh throughput and time to first pong, beside two baselines measured in the same run:
#   raw TCP on loopback (the ceiling) and a userspace WireGuard tunnel (boringtun, one
#   thread) between two network namespaces, the kind of tunnel Coder and Tailscale use.
#
#   bash bench/mesh.sh [SECONDS]        (as root; SECONDS per throughput run, default 5)
#
# Needs: iperf3, wireguard-tools (wg), boringtun-cli on PATH or in $BORINGTUN
# (`cargo install --locked boringtun-cli`), and a release build of myco
# (`cargo build --release --bin myco`, or set $MYCO). All traffic stays on loopback or
# inside the two namespaces this script makes and removes.
set -euo pipefail
cd "$(dirname "$0")/.."

T=${1:-5}
MYCO=${MYCO:-target/release/myco}
BORINGTUN=${BORINGTUN:-$(command -v boringtun-cli || echo /tmp/bt/bin/boringtun-cli)}
for tool in iperf3 wg python3 "$BORINGTUN" "$MYCO"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || { echo "bench/mesh.sh: missing $tool" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "bench/mesh.sh: run as root (network namespaces)" >&2; exit 1; }

extra_cleanup() {
  ip netns del mb-a 2>/dev/null || true
  ip netns del mb-b 2>/dev/null || true
}
source bench/lib.sh

mbps() { python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/8e6))'; }

# 1. Raw TCP on loopback.
iperf3 -s -1 -B 127.0.0.1 -p 5301 >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
tcp=$(iperf3 -c 127.0.0.1 -p 5301 -t "$T" -J | mbps)

# 2. boringtun between two namespaces joined by a veth pair.
ip netns add mb-a
ip netns add mb-b
ip link add mb-va type veth peer name mb-vb
ip link set mb-va netns mb-a
ip link set mb-vb netns mb-b
ip -n mb-a addr add 10.201.0.1/30 dev mb-va
ip -n mb-b addr add 10.201.0.2/30 dev mb-vb
for ns in mb-a mb-b; do
  ip -n "$ns" link set lo up
done
ip -n mb-a link set mb-va up
ip -n mb-b link set mb-vb up
(umask 077; wg genkey >"$work/a.key"; wg genkey >"$work/b.key")
pub_a=$(wg pubkey <"$work/a.key")
pub_b=$(wg pubkey <"$work/b.key")
# Distinct interface names: both namespaces share /var/run/wireguard/<if>.sock.
for side in a b; do
  WG_SUDO=1 ip netns exec "mb-$side" "$BORINGTUN" -f -t 1 --disable-drop-privileges \
    --log "$work/bt-$side.log" "mbwg$side" >/dev/null 2>&1 &
  pids+=($!)
done
for _ in $(seq 50); do
  ip -n mb-a link show mbwga >/dev/null 2>&1 && ip -n mb-b link show mbwgb >/dev/null 2>&1 && break
  sleep 0.1
done
ip netns exec mb-a wg set mbwga private-key "$work/a.key" listen-port 51820 \
  peer "$pub_b" allowed-ips 10.202.0.2/32 endpoint 10.201.0.2:51820
ip netns exec mb-b wg set mbwgb private-key "$work/b.key" listen-port 51820 \
  peer "$pub_a" allowed-ips 10.202.0.1/32 endpoint 10.201.0.1:51820
ip -n mb-a addr add 10.202.0.1/24 dev mbwga
ip -n mb-b addr add 10.202.0.2/24 dev mbwgb
ip -n mb-a link set mbwga up
ip -n mb-b link set mbwgb up
ip netns exec mb-b iperf3 -s -1 -B 10.202.0.2 -p 5302 >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
wgbt=$(ip netns exec mb-a iperf3 -c 10.202.0.2 -p 5302 -t "$T" -J | mbps)

# 3. Myco: a coordinator, a user, a workspace and its agent, all on loopback.
start_myco

st() { "$MYCO" speedtest bench -t "${T}s" -o json "$@" | python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["mbits_per_sec"]/8))'; }
direct_down=$(st --direction down)
direct_up=$(st --direction up)
relay_down=$(st --direction down --relay-only)

# Time to first pong: whole `myco ping -n 1` process (API call, endpoint, QUIC
# handshake, ticket, one round trip), median of 10, and the in-process figure it prints.
first_pong() {
  python3 - "$MYCO" "$@" <<'EOF'
import re, statistics, subprocess, sys, time
walls, inproc = [], []
for _ in range(10):
    t = time.perf_counter()
    out = subprocess.run([sys.argv[1], "ping", "bench", "-n", "1", *sys.argv[2:]], check=True, capture_output=True, text=True).stdout
    walls.append((time.perf_counter() - t) * 1000)
    inproc.append(float(re.search(r"first pong after (\d+) ms", out).group(1)))
print("%.0f %.0f" % (statistics.median(walls), statistics.median(inproc)))
EOF
}
read -r fp_direct_wall fp_direct_in <<<"$(first_pong)"
read -r fp_relay_wall fp_relay_in <<<"$(first_pong --relay-only)"

cat <<EOF
throughput, ${T}s each, MB/s (1 MB = 10^6 bytes)
  raw TCP loopback (iperf3)               $tcp
  WireGuard, boringtun -t 1, netns (iperf3) $wgbt
  myco speedtest direct, down             $direct_down   = $(ratio "$direct_down" "$tcp") x raw TCP, $(ratio "$direct_down" "$wgbt") x WireGuard
  myco speedtest direct, up               $direct_up   = $(ratio "$direct_up" "$tcp") x raw TCP, $(ratio "$direct_up" "$wgbt") x WireGuard
  myco speedtest relayed, down            $relay_down   = $(ratio "$relay_down" "$direct_down") x direct
time to first pong, ms (median of 10): whole process / inside the process
  direct                                  $fp_direct_wall / $fp_direct_in
  relayed                                 $fp_relay_wall / $fp_relay_in
EOF
