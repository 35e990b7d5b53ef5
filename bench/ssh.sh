#!/usr/bin/env bash
# SSH side by side with OpenSSH's own sshd on loopback, measured in the same run:
#   (a) cold whole-process `myco ssh bench -- true` vs `ssh -p PORT 127.0.0.1 true`
#   (b) 1 GiB through the session each way (up: into `cat >/dev/null`; down: out of
#       `head -c 1GiB /dev/zero`), plus OpenSSH's client to our agent via config-ssh
#   (c) warm keystroke echo round trip through a remote PTY, the sessions interleaved
#   (d) `rsync -a -e ssh` of a tree of 10,000 small files (an IDE's first sync, a
#       `git clone`'s shape) into an empty remote directory, then again with nothing
#       changed (the sync an editor runs on every save)
#
#   bash bench/ssh.sh [RUNS]     (RUNS cold logins per side, default 20;
#                                 BULK_ROUNDS=N bulk rounds per side, default 3;
#                                 RSYNC_ROUNDS=N rsync rounds per side, default 3;
#                                 SECTIONS=bd runs only (b) and (d), default abcd)
#
# Needs: openssh-server, openssh-client and rsync (Debian), python3, and a release build of
# myco (`cargo build --release --bin myco`, or set $MYCO). sshd runs unprivileged
# features only, from its own config on a high port, for this run; all on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-20}
SECTIONS=${SECTIONS:-abcd}
want() { [[ $SECTIONS == *$1* ]]; }
MYCO=${MYCO:-target/release/myco}
SSHD=${SSHD:-/usr/sbin/sshd}
for tool in ssh ssh-keygen rsync python3 "$SSHD" "$MYCO"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "$tool" ] || { echo "bench/ssh.sh: missing $tool" >&2; exit 1; }
done

source bench/lib.sh

start_sshd
start_myco
"$MYCO" config-ssh --ssh-config-file "$work/ssh_config" -y >/dev/null
viamyco=(ssh -F "$work/ssh_config" -o BatchMode=yes myco.bench)
mssh=("$MYCO" ssh bench --)
# What OpenSSH's client negotiates with each server (ssh -vv).
for side in ossh viamyco; do
  declare -n cmd=$side
  echo "$side: $("${cmd[@]}" -vv true 2>&1 | sed -n 's/.*debug1: kex: client->server cipher: \(.*\)/\1/p' | head -1)"
done

if want a; then
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

fi

if want b; then
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

fi

if want c; then
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

fi

if want d; then
# (d) rsync -a of 10,000 small files (100 directories of 100, 1-4 KiB each, 25 MB in
# all), RSYNC_ROUNDS rounds interleaved, into a fresh remote directory each round, then
# once more with nothing changed; median seconds. `myco ssh` takes its command after
# `--`, so rsync reaches it through a two-line wrapper.
python3 - "$work/tree" <<'PY'
import os, random, sys
random.seed(1)
for d in range(100):
    os.makedirs(os.path.join(sys.argv[1], "d%03d" % d))
    for f in range(100):
        with open(os.path.join(sys.argv[1], "d%03d" % d, "f%03d.txt" % f), "wb") as fh:
            fh.write(random.randbytes(random.randint(1024, 4096)))
PY
printf '#!/bin/sh\nh=$1; shift; exec %q ssh "$h" -- "$@"\n' "$MYCO" >"$work/myco-rsh"
chmod +x "$work/myco-rsh"
read -r rs_ossh rs_ossh_nc rs_myco rs_myco_nc rs_via rs_via_nc <<<"$(python3 - "${RSYNC_ROUNDS:-3}" "$work" \
  "${ossh[*]:0:${#ossh[@]}-1}" "${ossh[-1]}" \
  "$work/myco-rsh" bench \
  "ssh -F $work/ssh_config -o BatchMode=yes" myco.bench <<'PY'
import shutil, statistics, subprocess, sys, time
rounds, work, sides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
sides = [(sides[i], sides[i + 1]) for i in range(0, len(sides), 2)]
times = [([], []) for _ in sides]
def rsync(rsh, host, dest):
    t = time.perf_counter()
    subprocess.run(["rsync", "-a", "-e", rsh, work + "/tree/", "%s:%s/" % (host, dest)], check=True)
    return time.perf_counter() - t
for _ in range(rounds):
    for i, (rsh, host) in enumerate(sides):
        dest = "%s/rsync-dest-%d" % (work, i)
        shutil.rmtree(dest, ignore_errors=True)
        times[i][0].append(rsync(rsh, host, dest))
        times[i][1].append(rsync(rsh, host, dest))
print(" ".join("%.3f %.3f" % (statistics.median(a), statistics.median(b)) for a, b in times))
PY
)"

fi

if want a; then
  cat <<OUT
(a) cold login + \`true\`, whole process, median of $RUNS (ms)
  OpenSSH ssh -> sshd                     $cold_ossh
  myco ssh -> agent                       $cold_myco   = $(ratio "$cold_myco" "$cold_ossh") x OpenSSH
  OpenSSH ssh -> agent (config-ssh)       $cold_via   = $(ratio "$cold_via" "$cold_ossh") x OpenSSH
OUT
fi
if want b; then
  cat <<OUT
(b) 1 GiB through the session, MB/s, median of ${BULK_ROUNDS:-3}   up / down
  OpenSSH ssh -> sshd                     $up_ossh / $down_ossh
  myco ssh -> agent                       $up_myco / $down_myco   = $(ratio "$up_myco" "$up_ossh") / $(ratio "$down_myco" "$down_ossh") x OpenSSH
  OpenSSH ssh -> agent (config-ssh)       $up_via / $down_via   = $(ratio "$up_via" "$up_ossh") / $(ratio "$down_via" "$down_ossh") x OpenSSH
OUT
fi
if want c; then
  cat <<OUT
(c) keystroke echo through a PTY, ms (3 x 300, interleaved)   median / p90
  OpenSSH ssh -> sshd                     $ks_ossh / $ks_ossh90
  myco ssh -> agent                       $ks_myco / $ks_myco90   = $(ratio "$ks_myco" "$ks_ossh") x OpenSSH
  OpenSSH ssh -> agent (config-ssh)       $ks_via / $ks_via90   = $(ratio "$ks_via" "$ks_ossh") x OpenSSH
OUT
fi
if want d; then
  cat <<OUT
(d) rsync -a -e ssh, 10,000 files of 1-4 KiB, s, median of ${RSYNC_ROUNDS:-3}   first sync / nothing changed
  OpenSSH ssh -> sshd                     $rs_ossh / $rs_ossh_nc
  myco ssh -> agent                       $rs_myco / $rs_myco_nc   = $(ratio "$rs_ossh" "$rs_myco") / $(ratio "$rs_ossh_nc" "$rs_myco_nc") x OpenSSH's rate
  OpenSSH ssh -> agent (config-ssh)       $rs_via / $rs_via_nc   = $(ratio "$rs_ossh" "$rs_via") / $(ratio "$rs_ossh_nc" "$rs_via_nc") x OpenSSH's rate
OUT
fi
