#!/usr/bin/env python3
"""Warm keystroke round trip through a terminal: runs CMD on a local PTY (as a user's
terminal would), waits for the remote side to print READY, then types one byte at a
time and waits for the remote terminal's echo. Prints the median and p90 in ms.

    python3 bench/keystroke.py N CMD...   (CMD must run `echo READY; cat` on a remote PTY)
"""
import os, pty, select, statistics, sys, time

n = int(sys.argv[1])
cmd = sys.argv[2:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(cmd[0], cmd)

def read_until(want, timeout):
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

read_until(b"READY", 30)
time.sleep(0.2)  # let any trailing output of the login settle
while select.select([fd], [], [], 0.05)[0]:
    os.read(fd, 4096)
rtts = []
for i in range(n + 20):
    ch = b"abcdefghijklmnopqrstuvwxyz"[i % 26:i % 26 + 1]
    t = time.perf_counter()
    os.write(fd, ch)
    read_until(ch, 10)
    if i >= 20:  # the first 20 warm the path
        rtts.append((time.perf_counter() - t) * 1000)
    time.sleep(0.005)
os.write(fd, b"\x03")  # ^C ends the remote cat
try:
    os.waitpid(pid, 0)
except ChildProcessError:
    pass
rtts.sort()
print("%.3f %.3f" % (statistics.median(rtts), rtts[int(len(rtts) * 0.9)]))
