#!/usr/bin/env bash
# SSH side by side with OpenSSH's own sshd on loopback, measured in the same run:
#   (a) cold whole-process `myco ssh bench -- true` vs `ssh -p PORT 127.0.0.1 true`
#   (b) 1 GiB through the session each way (up: into `cat >/dev/null`; down: out of
#       `head -c 1GiB /dev/zero`), plus OpenSSH's client to our agent via config-ssh
#   (c) warm keystroke echo round trip through a remote PTY, the sessions interleaved
#
#   bash bench/ssh.sh [RUNS]     (RUNS cold logins per side, default 20;
#                                 BULK_ROUNDS=N bulk rounds per side, default 3)
#
# Needs: openssh-server and openssh-client (Debian), python3, and a release build of
# myco (`cargo build --release --bin myco`, or set $MYCO). sshd runs unprivileged
# features only, from its own config on a high port, for this run; all on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-20}
MYCO=${MYCO:-target/release/myco}
SSHD=${SSHD:-/usr/sbin/sshd}
for tool in ssh ssh-keygen python3 "$SSHD" "$MYCO"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || { echo "bench/ssh.sh: missing $tool" >&2; exit 1; }
done

source bench/lib.sh

start_sshd
start_myco
"$MYCO" config-ssh --ssh-config-file "$work/ssh_config" -y >/dev/null
viamyco=(ssh -F "$work/ssh_config" -o BatchMode=yes myco.bench)
mssh=("$MYCO" ssh bench --)

# (a) Cold logins, interleaved so both sides see the same machine noise.
read -r cold_myco cold_ossh cold_via <<<"$(python3 - "$RUNS" <<PY
import statistics, subprocess, sys, time
runs = int(sys.argv[1])
sides = {"myco": [$(printf '"%s",' "${mssh[@]}") "true"],
         "ossh": [$(printf '"%s",' "${ossh[@]}") "true"],
         "via":  [$(printf '"%s",' "${viamyco[@]}") "true"]}
times = {k: [] for k in sides}
for _ in range(runs):
    for k, cmd in sides.items():
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        times[k].append((time.perf_counter() - t) * 1000)
print(" ".join("%.1f" % statistics.median(times[k]) for k in ("myco", "ossh", "via")))
PY
)"

# (b) 1 GiB each way, BULK_ROUNDS rounds interleaved, median; MB/s (1 MB = 10^6 bytes).
GIB=1073741824
q() { printf '%q ' "$@"; }
read -r up_myco up_ossh up_via down_myco down_ossh down_via <<<"$(python3 bench/bulk.py "${BULK_ROUNDS:-3}" \
  "head -c $GIB /dev/zero | $(q "${mssh[@]}") 'cat >/dev/null'" \
  "head -c $GIB /dev/zero | $(q "${ossh[@]}") 'cat >/dev/null'" \
  "head -c $GIB /dev/zero | $(q "${viamyco[@]}") 'cat >/dev/null'" \
  "$(q "${mssh[@]}") 'head -c $GIB /dev/zero' >/dev/null" \
  "$(q "${ossh[@]}") 'head -c $GIB /dev/zero' >/dev/null" \
  "$(q "${viamyco[@]}") 'head -c $GIB /dev/zero' >/dev/null" | awk '{ printf "%s ", $1 }')"

# (c) Keystroke echo through a remote PTY: the three sessions typed into in turn, one
# keystroke each, so they share the machine's noise keystroke by keystroke; 3 rounds of
# 300 keystrokes; the median of the rounds' medians and of their p90s.
read -r ks_ossh ks_ossh90 ks_myco ks_myco90 ks_via ks_via90 <<<"$(
  for _ in 1 2 3; do
    python3 bench/keystroke.py 300 :: "${ossh[@]}" -tt 'echo READY; cat' \
      :: "$MYCO" ssh -t bench -- 'echo READY; cat' \
      :: "${viamyco[@]}" -tt 'echo READY; cat' | tr '\n' ' '
    echo
  done | python3 -c '
import statistics, sys
rounds = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print(" ".join("%.3f" % statistics.median(r[i] for r in rounds) for i in range(6)))
')"

cat <<OUT
(a) cold login + \`true\`, whole process, median of $RUNS (ms)
  OpenSSH ssh -> sshd                     $cold_ossh
  myco ssh -> agent                       $cold_myco   = $(ratio "$cold_myco" "$cold_ossh") x OpenSSH
  OpenSSH ssh -> agent (config-ssh)       $cold_via   = $(ratio "$cold_via" "$cold_ossh") x OpenSSH
(b) 1 GiB through the session, MB/s, median of ${BULK_ROUNDS:-3}   up / down
  OpenSSH ssh -> sshd                     $up_ossh / $down_ossh
  myco ssh -> agent                       $up_myco / $down_myco   = $(ratio "$up_myco" "$up_ossh") / $(ratio "$down_myco" "$down_ossh") x OpenSSH
  OpenSSH ssh -> agent (config-ssh)       $up_via / $down_via   = $(ratio "$up_via" "$up_ossh") / $(ratio "$down_via" "$down_ossh") x OpenSSH
(c) keystroke echo through a PTY, ms (3 x 300, interleaved)   median / p90
  OpenSSH ssh -> sshd                     $ks_ossh / $ks_ossh90
  myco ssh -> agent                       $ks_myco / $ks_myco90   = $(ratio "$ks_myco" "$ks_ossh") x OpenSSH
  OpenSSH ssh -> agent (config-ssh)       $ks_via / $ks_via90   = $(ratio "$ks_via" "$ks_ossh") x OpenSSH
OUT
