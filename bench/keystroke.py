#!/usr/bin/env python3
"""Warm keystroke round trip through a terminal, for one or more sessions side by side.

Each CMD runs on a local PTY of its own (as a user's terminal would) and must run
`echo READY; cat` on a remote PTY. Once every session printed READY, one byte at a time
is typed into each session in turn (in a shuffled order each time) and the remote
terminal's echo awaited, so all of them are measured keystroke by keystroke
under the same machine noise. Prints one line
per CMD, in order: the median and p90 round trip in ms.

    python3 bench/keystroke.py N CMD...                  (one session)
    python3 bench/keystroke.py N :: CMD1... :: CMD2...   (several, interleaved)
"""
import os, pty, random, select, statistics, sys, time

n = int(sys.argv[1])
GAP = float(os.environ.get("KEYSTROKE_GAP_MS", "5")) / 1000  # pause after each echo
args = sys.argv[2:]
if args and args[0] == "::":
    cmds, cur = [], None
    for a in args:
        if a == "::":
            cur = []
            cmds.append(cur)
        else:
            cur.append(a)
else:
    cmds = [args]


def start(cmd):
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    return pid, fd


def read_until(fd, want, timeout):
    buf = b""
    deadline = time.monotonic() + timeout
    while want not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            sys.exit("keystroke.py: timed out waiting for %r; got %r" % (want, buf[-200:]))
        r, _, _ = select.select([fd], [], [], left)
        if r:
            buf += os.read(fd, 4096)
    return buf


sessions = [start(c) for c in cmds]
for _, fd in sessions:
    read_until(fd, b"READY", 30)
time.sleep(0.2)  # let any trailing output of the logins settle
for _, fd in sessions:
    while select.select([fd], [], [], 0.05)[0]:
        os.read(fd, 4096)
rtts = [[] for _ in sessions]
for i in range(n + 20):
    ch = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
    # A fresh order for every keystroke (seeded: the same in every run), so no session
    # is always typed into first, or always right after the same other one: in a fixed
    # order, two sessions of one build differed by 3-7%.
    order = list(range(len(sessions)))
    random.Random(i).shuffle(order)
    for k in order:
        fd = sessions[k][1]
        t = time.perf_counter()
        os.write(fd, ch)
        read_until(fd, ch, 10)
        if i >= 20:  # the first 20 warm the path
            rtts[k].append((time.perf_counter() - t) * 1000)
        time.sleep(GAP)
for pid, fd in sessions:
    os.write(fd, b"\x03")  # ^C ends the remote cat
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
for r in rtts:
    r.sort()
    print("%.3f %.3f" % (statistics.median(r), r[int(len(r) * 0.9)]))
