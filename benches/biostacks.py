#!/usr/bin/env python3
"""biostacks.py TRACE [DEPTH] - the bios in an ftrace buffer of
block:block_bio_queue events with kernel stacks (benches/hddpolicy.sh
TRACE=1), counted per submitter (thread name without digits), rwbs flags (R
read, W write, A readahead, M metadata, S sync, F flush) and the DEPTH
(default 10) innermost frames above submit_bio: who issues which requests,
and how large."""
import collections
import re
import sys

EVENT = re.compile(r'^\s*(.+?)-(\d+)\s+\[\d+\].*?block_bio_queue: \S+ (\S+) \d+ \+ (\d+)')
SKIP = {'trace_event_raw_event_block_bio', 'submit_bio_noacct_nocheck', 'submit_bio_noacct', 'submit_bio', '__submit_bio'}
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 10
stats = collections.defaultdict(lambda: [0, 0])
totals = collections.defaultdict(lambda: [0, 0])
cur, frames = None, []


def flush():
    if cur is None:
        return
    comm, rwbs, size = cur
    key = (comm, rwbs, tuple(frames[:depth]))
    for d, k in ((stats, key), (totals, (comm, rwbs))):
        d[k][0] += 1
        d[k][1] += size


for line in open(sys.argv[1], errors='replace'):
    m = EVENT.match(line)
    if m:
        flush()
        frames = []
        cur = (re.sub(r'[\d/:]+$', '', m.group(1).strip()), m.group(3), int(m.group(4)) * 512)
        continue
    if line.startswith(' => '):
        f = line[4:].strip().split('+')[0]
        if f not in SKIP:
            frames.append(f)
flush()
for (comm, rwbs, st), (n, b) in sorted(stats.items(), key=lambda kv: -kv[1][0])[:20]:
    print(f"{n:7d} {b / 1e6:8.1f} MB {b / n / 1024:7.1f} KiB  {comm:14.14s} {rwbs:4s} {' < '.join(st)}")
for (comm, rwbs), (n, b) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
    print(f"total {comm} {rwbs}: {n} bios, {b / 1e6:.1f} MB ({b / n / 1024:.1f} KiB avg)")
