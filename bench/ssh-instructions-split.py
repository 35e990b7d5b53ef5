#!/usr/bin/env python3
"""The split of bench/ssh-instructions.sh: reads its callgrind (or strace -c) files,
and prints, per path (OpenSSH through config-ssh; myco ssh) and per process (the
client, the `myco ssh --stdio` proxy, the agent), instructions per keystroke and per
MiB each way, by what the code does (a function's own instructions, grouped by its
name), or system calls by name.

    python3 bench/ssh-instructions-split.py callgrind|strace WORK KEYS_SHORT KEYS_LONG MIB_SHORT MIB_LONG
"""
import os, re, subprocess, sys

tool, work = sys.argv[1], sys.argv[2]
ks, kl, ms, ml = (int(a) for a in sys.argv[3:7])

# First match wins; a function's own (exclusive) instructions.
GROUPS = [
    ("cipher: AES-GCM (ring)", r"aes|gcm|ghash|gfmul|clmul"),
    ("cipher: ChaCha20-Poly1305", r"chacha|poly1305"),
    ("cipher: OpenSSL libcrypto (OpenSSH's)", r"libcrypto"),
    ("other crypto (handshakes, signatures)", r"sha2|sha256|sha512|x25519|curve25519|ed25519|hmac|umac|bn_|ecp_"),
    ("QUIC (noq)", r"noq|quinn"),
    ("iroh: sockets, paths, relay", r"iroh|netwatch|portmapper|n0_"),
    ("TLS (rustls)", r"rustls"),
    ("tokio: scheduler, timers, I/O", r"tokio|mio::"),
    ("SSH protocol (russh, ssh_encoding / OpenSSH)", r"russh|ssh_encoding|sshbuf|ssh_packet|channel_|cipher_|client_loop|chan_|packet_"),
    ("memcpy / memset", r"memcpy|memmove|memset|memcmp|__mem"),
    ("allocation", r"malloc|free|realloc|calloc|_int_|alloc::|mi_|sdallocx|mallocx"),
    ("libc: syscall wrappers, poll, locks", r"__libc|__GI_|read|write|send|recv|poll|epoll|futex|pthread|clock_gettime|syscall|__lll"),
    ("myco (cli, agent, mesh)", r"\bcli::|\bagent::|\bmesh::|myco"),
    ("bytes, hashing, std", r"bytes::|hashbrown|core::|std::|alloc::"),
]
COMPILED = [(g, re.compile(p, re.I)) for g, p in GROUPS]
# callgrind_annotate 3.19: `  100,435 (16.37%)  file:function [object]`
LINE = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*?)(?:\s+\[(.*)\])?$")


def split(path):
    """Per group: the file's exclusive instructions, or per system call its calls."""
    if not os.path.exists(path):
        return None
    if tool == "strace":
        return syscalls(path)
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no", path],
        capture_output=True, text=True, check=True,
    ).stdout
    groups = {}
    # Only the table of functions (after its `file:function` header), not the
    # annotated source that may follow.
    table = out.split("file:function", 1)[-1].split("\n\n")[0]
    total = int(re.search(r"([\d,]+) \S+\s+PROGRAM TOTALS", out).group(1).replace(",", ""))
    rows = []
    for line in table.splitlines():
        m = LINE.match(line)
        if m:
            file, _, function = m.group(2).partition(":")
            rows.append((int(m.group(1).replace(",", "")), function, file, m.group(3) or ""))
    # A dump taken while the program runs (callgrind_control -d, the agent) charges
    # the functions on a thread's stack at that moment (main, a thread's start) with
    # everything below them; drop those, largest first, while the rows add up to more
    # than the program's total.
    rows.sort(reverse=True)
    excess = sum(r[0] for r in rows) - total
    while rows and excess > 0.005 * total and rows[0][0] <= excess * 1.01:
        excess -= rows.pop(0)[0]
    for ir, function, file, obj in rows:
        # The function's name decides; failing that, the source file (code inlined
        # from a crate) or the object (a C library).
        group = next(
            (g for text in (function, file, obj) for g, rx in COMPILED if rx.search(text)),
            "other",
        )
        groups[group] = groups.get(group, 0) + ir
    return groups


def syscalls(path):
    """strace -c's table: `% time seconds usecs/call calls [errors] syscall`."""
    calls = {}
    for line in open(path):
        words = line.split()
        if len(words) in (5, 6) and words[0][0].isdigit() and words[-1] != "total":
            calls[words[-1]] = calls.get(words[-1], 0) + int(words[3])
    return calls


def per_unit(short, long, units):
    if short is None or long is None:
        return None
    keys = set(short) | set(long)
    return {k: (long.get(k, 0) - short.get(k, 0)) / units for k in keys}


def table(title, unit, columns):
    """columns: [(name, {group: instructions per unit})]"""
    columns = [(n, c) for n, c in columns if c is not None]
    groups = sorted(
        {g for _, c in columns for g in c},
        key=lambda g: -max(c.get(g, 0) for _, c in columns),
    )
    what, fmt = ("instructions", ",.0f") if tool == "callgrind" else ("system calls", ",.1f")
    print(f"\n{title} ({what} per {unit})\n")
    print("| what | " + " | ".join(n for n, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for g in groups:
        cells = [c.get(g, 0) for _, c in columns]
        if all(abs(x) < 0.005 * max(1, sum(cc.values())) for x, (_, cc) in zip(cells, columns)):
            continue
        print(f"| {g} | " + " | ".join(f"{x:{fmt}}" for x in cells) + " |")
    print("| **total** | " + " | ".join(f"**{sum(c.values()):{fmt}}**" for _, c in columns) + " |")


for path, label in (("via", "OpenSSH through config-ssh"), ("myco", "myco ssh")):
    if not os.path.exists(os.path.join(work, f"agent.{path}.keys{ks}")):
        continue
    procs = [("client", "client"), ("stdio", "myco ssh --stdio"), ("agent", "agent")]
    if path == "myco":
        procs = [("client", "myco ssh"), ("agent", "agent")]
    else:
        procs[0] = ("client", "OpenSSH ssh")

    def f(proc, what):
        return os.path.join(work, f"{proc}.{path}.{what}")

    keys = [
        (name, per_unit(split(f(p, f"keys{ks}")), split(f(p, f"keys{kl}")), kl - ks))
        for p, name in procs
    ]
    table(f"{label}: a keystroke and its echo", "keystroke", keys)
    for d in ("up", "down"):
        mib = [
            (name, per_unit(split(f(p, f"{d}{ms}")), split(f(p, f"{d}{ml}")), ml - ms))
            for p, name in procs
        ]
        table(f"{label}: bulk {d}", "MiB", mib)
