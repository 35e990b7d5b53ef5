#!/usr/bin/env python3
"""Rates of shell commands that each move 1 GiB, in rounds interleaved so all of them
see the same machine noise. Prints one line per command, in order: the median MB/s
(1 MB = 10^6 bytes), then each round's.

    python3 bench/bulk.py ROUNDS CMD...
"""
import statistics, subprocess, sys, time

rounds, cmds = int(sys.argv[1]), sys.argv[2:]
rates = [[] for _ in cmds]
for _ in range(rounds):
    for i, cmd in enumerate(cmds):
        t = time.perf_counter()
        subprocess.run(cmd, shell=True, check=True)
        rates[i].append(1073741824 / 1e6 / (time.perf_counter() - t))
for r in rates:
    print("%.0f %s" % (statistics.median(r), " ".join("%.0f" % x for x in r)))
