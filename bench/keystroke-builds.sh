#!/usr/bin/env bash
# Keystroke echo of several builds of myco side by side with OpenSSH, in one run: for
# a change whose effect is smaller than the machine's run-to-run noise (a few %).
#
#   bash bench/keystroke-builds.sh ROUNDS N BIN...
#
# One coordinator (run by the first BIN); per BIN a workspace whose agent that BIN runs
# and a `BIN ssh -t` session; OpenSSH's own sshd beside them. Each round types N
# keystrokes into every session in turn (bench/keystroke.py) and prints one line: the
# median echo in ms for OpenSSH and for each BIN, in order, then each BIN's ratio to
# OpenSSH. To build an older commit beside the current one:
#   git worktree add /tmp/old OLDREV && (cd /tmp/old && cargo build --release --bin myco)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
ROUNDS=$1 N=$2
shift 2
bins=()
for b in "$@"; do bins+=("$(realpath "$b")"); done
MYCO=${bins[0]}
source bench/lib.sh
start_sshd
start_myco
sessions=(:: "${ossh[@]}" -tt 'echo READY; cat')
for i in "${!bins[@]}"; do
  add_agent "build$i" "${bins[$i]}"
  sessions+=(:: "${bins[$i]}" ssh -t "build$i" -- 'echo READY; cat')
done
echo "# OpenSSH $(for i in "${!bins[@]}"; do printf 'build%s ' "$i"; done)(median ms), then x OpenSSH"
for _ in $(seq "$ROUNDS"); do
  keystroke_round "$N" "${sessions[@]}"
done
