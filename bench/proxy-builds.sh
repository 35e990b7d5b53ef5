#!/usr/bin/env bash
# The OpenSSH client through `config-ssh` (the ProxyCommand path VS Code Remote-SSH
# takes) with several builds of myco as its ProxyCommand, side by side with OpenSSH in
# one run: for a change to `myco ssh --stdio`.
#
#   bash bench/proxy-builds.sh ROUNDS BIN...
#
# One coordinator and agent (run by a copy of the last BIN); per BIN a `config-ssh`
# file whose ProxyCommand is that BIN. Each round types 300 keystrokes into OpenSSH ->
# sshd and into `ssh myco.bench` through each BIN in turn (bench/keystroke.py) and
# prints the medians in ms, then each BIN's ratio to OpenSSH. Then 1 GiB up and down
# through each BIN, ROUNDS rounds interleaved, in MB/s: every round, then the median.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
ROUNDS=$1
shift
bins=()
for b in "$@"; do bins+=("$(realpath "$b")"); done
source bench/lib.sh
# The coordinator and agent run a copy of the last BIN. When the agent ran the last
# BIN itself, that build's keystrokes came out 2-7% faster whichever build it was
# (likely the code pages, and so the CPU caches, it shared with the agent).
cp "${bins[-1]}" "$work/myco-agent"
MYCO=$work/myco-agent
start_sshd
start_myco
sessions=(:: "${ossh[@]}" -tt 'echo READY; cat')
bulk=()
for i in "${!bins[@]}"; do
  "${bins[$i]}" config-ssh --ssh-config-file "$work/ssh_config$i" -y >/dev/null
  via="ssh -F $work/ssh_config$i -o BatchMode=yes myco.bench"
  sessions+=(:: ssh -F "$work/ssh_config$i" -o BatchMode=yes -tt myco.bench 'echo READY; cat')
  bulk+=("head -c 1073741824 /dev/zero | $via 'cat >/dev/null'" "$via 'head -c 1073741824 /dev/zero' >/dev/null")
done
echo "# keystroke: OpenSSH $(for i in "${!bins[@]}"; do printf 'build%s ' "$i"; done)(median ms), then x OpenSSH"
for _ in $(seq "$ROUNDS"); do
  keystroke_round 300 "${sessions[@]}"
done
echo "# 1 GiB through each build (MB/s): up, down"
python3 bench/bulk.py "$ROUNDS" "${bulk[@]}" | awk '{
  printf "build%d %-4s median %s, rounds", int((NR - 1) / 2), (NR % 2 ? "up" : "down"), $1
  for (i = 2; i <= NF; i++) printf " %s", $i
  print "" }'
