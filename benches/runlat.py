#!/usr/bin/env python3
"""runlat.py - latency of container runs, several tools side by side.

    runlat.py [--rounds N] [--warmup W] MEASURE/TOOL=COMMAND ...

COMMAND is split like a shell would (shlex); `{i}` in it becomes the round
number (unique container IDs). Each round runs every command once, in the
order given, so the tools share the machine's noise. For each run it records,
from the spawn:
  first  the first byte on the command's stdout (the container's first
         instruction having run: it wrote it), when the command prints;
  exit   the command's exit (its stdout closed and its status reaped).
A command that fails stops the benchmark with its stderr. A run whose output
differs from the first run's (ctr run sometimes loses a short-lived
container's output) counts for exit but not for first byte, and is reported.
Prints median and p90 in ms per tool and the ratio of the first tool's median
to each other tool's.

    runlat.py --once [--expect TEXT] -- COMMAND...

runs COMMAND once (benches/lazy.sh times its steps so) and prints
"FIRST EXIT OK": seconds from the spawn to the first byte on its stdout ("-"
if it printed nothing) and to its exit, and OK = 1 if its stdout contains
TEXT (always 1 without --expect), else 0. A command that fails exits 1 with
its stderr.
"""

import argparse
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def once(argv):
    """(first-byte seconds or None, exit seconds, output) of one run of argv."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        fd = p.stdout.fileno()
        chunk = os.read(fd, 65536)
        first = time.perf_counter() - t0 if chunk else None
        out = chunk
        while chunk:
            chunk = os.read(fd, 65536)
            out += chunk
        code = p.wait()
        done = time.perf_counter() - t0
        p.stdout.close()
        if code != 0:
            err.seek(0)
            sys.exit(f"runlat: {shlex.join(argv)} exited {code}:\n{err.read().decode(errors='replace')}")
    return first, done, out


def p90(xs):
    s = sorted(xs)
    return s[math.ceil(0.9 * len(s)) - 1]


def main_once(args):
    expect = None
    if args[:1] == ["--expect"]:
        expect, args = args[1].encode(), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("runlat: --once [--expect TEXT] -- COMMAND...")
    f, d, out = once(args)
    ok = expect is None or expect in out
    print(f"{'-' if f is None else f'{f:.4f}'} {d:.4f} {int(ok)}")


def main():
    if sys.argv[1:2] == ["--once"]:
        return main_once(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("cases", nargs="+", metavar="MEASURE/TOOL=COMMAND")
    a = ap.parse_args()

    cases = []  # (measure, tool, template)
    for c in a.cases:
        name, sep, cmd = c.partition("=")
        measure, slash, tool = name.rpartition("/")
        if not sep or not slash or not cmd:
            ap.error(f"{c!r}: expected MEASURE/TOOL=COMMAND")
        cases.append((measure, tool, cmd))

    first = {(m, t): [] for m, t, _ in cases}
    exit_ = {(m, t): [] for m, t, _ in cases}
    expected = {}
    odd = []
    for r in range(a.warmup + a.rounds):
        for m, t, cmd in cases:
            argv = [w.replace("{i}", str(r)) for w in shlex.split(cmd)]
            f, d, out = once(argv)
            if expected.setdefault((m, t), out) != out:
                odd.append(f"{shlex.join(argv)} printed {out!r}, the first run {expected[(m, t)]!r}")
                f = None
            if r < a.warmup:
                continue
            exit_[(m, t)].append(d)
            if f is not None:
                first[(m, t)].append(f)

    tools = list(dict.fromkeys(t for _, t, _ in cases))
    measures = list(dict.fromkeys(m for m, _, _ in cases))
    rows = []
    for m in measures:
        for kind, data in (("first byte", first), ("exit", exit_)):
            if not any(data.get((m, t)) for t in tools):
                continue
            rows.append((f"{m}: {kind}", [data.get((m, t)) or [] for t in tools]))

    w = max(len(r[0]) for r in rows)
    head = f"{'ms (median / p90)':<{w}}" + "".join(f"  {t:>17}" for t in tools)
    head += "".join(f"  {tools[0] + '/' + t:>14}" for t in tools[1:])
    print(head)
    for label, cols in rows:
        line = f"{label:<{w}}"
        for xs in cols:
            line += f"  {statistics.median(xs) * 1e3:8.1f} / {p90(xs) * 1e3:6.1f}" if xs else f"  {'-':>17}"
        for xs in cols[1:]:
            ok = cols[0] and xs
            line += f"  {statistics.median(cols[0]) / statistics.median(xs):14.2f}" if ok else f"  {'-':>14}"
        print(line)
    for o in odd:
        print(f"note: {o}")


if __name__ == "__main__":
    main()
