#!/usr/bin/env python3
"""Run a command with a custom EEVDF time slice (Linux >= 6.12).

    python3 bench/with-slice.py NS CMD...

Sets SCHED_OTHER with sched_runtime = NS nanoseconds (the kernel clamps it to
0.1-100 ms) and the reset-on-fork flag on this process, then execs CMD, so CMD runs
with the short slice and anything it starts gets the default again. A shorter slice
lets a woken task preempt the running one sooner. For the keystroke experiment in
BENCHMARKS.md ("Session 15").
"""
import ctypes
import os
import struct
import sys

SYS_SCHED_SETATTR = 314  # x86_64
SCHED_FLAG_RESET_ON_FORK = 0x01

if len(sys.argv) < 3:
    sys.exit(__doc__)
ns = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
# struct sched_attr: size, policy, flags, nice, priority, runtime, deadline, period,
# util_min, util_max (56 bytes).
attr = struct.pack("IIQiIQQQII", 56, 0, SCHED_FLAG_RESET_ON_FORK, 0, 0, ns, 0, 0, 0, 0)
if libc.syscall(SYS_SCHED_SETATTR, 0, ctypes.create_string_buffer(attr, 56), 0) != 0:
    sys.exit(f"sched_setattr: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[2], sys.argv[2:])
