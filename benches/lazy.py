#!/usr/bin/env python3
"""lazy.py - the tables of benches/lazy.sh, and its tree reader.

    lazy.py table [--lazy 0|1] RESULTS.tsv
        RESULTS: one line per run, tab-separated:
        LINK CASE WORKLOAD ROUND PULL_S FIRST_S EXIT_S OK BYTES EXTRA
        (LINK in Mbit/s, 0 = unlimited; FIRST_S and EXIT_S from the spawn of
        the run command, FIRST_S "-" when it printed nothing; OK 0 when the
        output lacked what the workload prints last; BYTES from the proxy;
        EXTRA the tool's own count of bytes fetched, or "-").
        Prints per link and workload the median [min-max] of the pull, the
        run, and the totals from the pull's spawn to the first output and to
        the exit, the MB fetched, then the ratios the lazy goals are about.
    lazy.py treeread DIR
        Reads every regular file below DIR once (1 MiB reads, no symlinks
        followed) and prints MB/s (10^6 bytes per second of the whole walk).
    lazy.py reads READS.txt
        READS: lines "SIDE WHAT MODE MB_PER_S CACHED_BEFORE CACHED_AFTER"
        (SIDE unpacked or lazy, MODE buffered or direct, CACHED_* bytes of
        the backing file or tree in the page cache around the read); prints
        median [min-max] per side, the ratio lazy / unpacked, the cache
        state, and a note for every read that was not cold or whose
        O_DIRECT went through the page cache.
    lazy.py fetches LOGDIR
        LOGDIR: benches/lazy.sh's LOGS (daemon logs at debug level, access
        traces, indexes); prints per lazy run the spans each priority
        (read, look-ahead, trace, background) fetched and how many of them
        were then needed by a read or an open (the access trace).
    lazy.py stall OUT KILLS
        OUT: what benches/stallread.py printed in the container (its last
        line is JSON); KILLS: lines "KILLED_AT BACK_AT" (wall seconds: the
        kill -9 of the lazy daemon, its successor's pid alive). Prints the
        read latency p50/p99/max after the first loop, the errors, and per
        restart the time to the new daemon and the longest read in flight
        across it; the goal (#15) is a stall <= 1 s.
"""

import json

import os
import stat
import statistics
import sys
import time

CASES = [
    ("cstore", "cstore pull + run"),
    ("stargz", "stargz lazy (ctr-remote rpull + ctr run)"),
    ("ctr", "ctr pull + run (overlayfs)"),
    ("ctr+cs", "ctr pull + run (cstore snapshotter)"),
    ("cstore-lazy", "cstore lazy (pull --lazy + run)"),
    ("ctr+cs-lazy", "ctr + cstore lazy (rpull + ctr run)"),
]
LAZY = {"cstore-lazy", "ctr+cs-lazy"}


def fmt(xs, scale=1.0, prec=2):
    if not xs:
        return "-"
    xs = [x * scale for x in xs]
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.{prec}f}"
    return f"{m:.{prec}f} [{min(xs):.{prec}f}-{max(xs):.{prec}f}]"


def med(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def link_name(link):
    return "unlimited" if float(link) == 0 else f"{link} Mbit/s"


def table(path, lazy):
    runs = {}
    links, wls = [], []
    for line in open(path):
        f = line.rstrip("\n").split("\t")
        if len(f) != 10:
            continue
        link, case, wl, _round, pull, first, exit_, ok, nbytes, extra = f
        if link not in links:
            links.append(link)
        if wl not in wls:
            wls.append(wl)
        r = runs.setdefault((link, wl, case), {"pull": [], "run": [], "first": [], "exit": [],
                                               "mb": [], "extra": [], "lost": 0})
        pull, exit_ = float(pull), float(exit_)
        r["pull"].append(pull)
        r["run"].append(exit_)
        r["exit"].append(pull + exit_)
        if ok == "1" and first != "-":
            r["first"].append(pull + float(first))
        if ok != "1":
            r["lost"] += 1
        r["mb"].append(int(nbytes) / 1e6)
        if extra != "-":
            r["extra"].append(int(float(extra)) / 1e6)

    notes = []
    for link in links:
        for wl in wls:
            n = max((len(r["pull"]) for (l, w, _), r in runs.items() if l == link and w == wl), default=0)
            if not n:
                continue
            print(f"\n{link_name(link)}, workload {wl}: seconds, median [min-max] of {n}; "
                  f"MB fetched from the registry (proxy count, at the run's exit)")
            head = ["case", "pull", "run", "to first output", "to exit", "MB fetched", "MB (tool's count)"]
            rows = []
            for case, label in CASES:
                r = runs.get((link, wl, case))
                if r is None:
                    if case in LAZY and not lazy:
                        rows.append([label, "not available yet"] + [""] * 5)
                    continue
                rows.append([label, fmt(r["pull"]), fmt(r["run"]), fmt(r["first"]), fmt(r["exit"]),
                             fmt(r["mb"], prec=1), fmt(r["extra"], prec=1)])
                if r["lost"]:
                    notes.append(f"{link_name(link)}, {wl}, {case}: {r['lost']} run(s) without the "
                                 "workload's full output (not counted for first output)")
            w = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
            print("  " + "  ".join(h.ljust(w[i]) for i, h in enumerate(head)).rstrip())
            for x in rows:
                print("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(x)).rstrip())

            def m(case, key):
                r = runs.get((link, wl, case))
                return med(r[key]) if r else None

            print("  ratios of the medians to exit: "
                  f"stargz/ctr {ratio(m('stargz', 'exit'), m('ctr', 'exit'))}, "
                  f"stargz/cstore {ratio(m('stargz', 'exit'), m('cstore', 'exit'))}, "
                  f"cstore/ctr {ratio(m('cstore', 'exit'), m('ctr', 'exit'))}, "
                  f"ctr+cs/ctr {ratio(m('ctr+cs', 'exit'), m('ctr', 'exit'))}")
            if lazy:
                print("  lazy goals, medians to exit (goal): "
                      f"cstore-lazy/stargz {ratio(m('cstore-lazy', 'exit'), m('stargz', 'exit'))} (<= 1), "
                      f"cstore-lazy/cstore {ratio(m('cstore-lazy', 'exit'), m('cstore', 'exit'))} (<= 0.2), "
                      f"ctr+cs-lazy/stargz {ratio(m('ctr+cs-lazy', 'exit'), m('stargz', 'exit'))} (<= 1); "
                      f"MB fetched cstore-lazy/stargz {ratio(m('cstore-lazy', 'mb'), m('stargz', 'mb'))} (<= 1)")
            else:
                print("  lazy goals (cstore-lazy/stargz <= 1, cstore-lazy/cstore <= 0.2, "
                      "ctr+cs-lazy/stargz <= 1, MB fetched cstore-lazy/stargz <= 1): not available yet")
    for n in notes:
        print(f"note: {n}")


def treeread(top):
    buf = bytearray(1 << 20)
    total = 0
    t0 = time.perf_counter()
    for d, _dirs, files in os.walk(top):
        for name in files:
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue  # a symlink, a socket, a fifo
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                while True:
                    n = os.readv(fd, [buf])
                    if n == 0:
                        break
                    total += n
            finally:
                os.close(fd)
    dt = time.perf_counter() - t0
    print(f"{total / dt / 1e6:.1f}")
    print(f"treeread {top}: {total} bytes in {dt:.2f} s", file=sys.stderr)


def mib(x):
    """Bytes as MiB; a few cached pages stay visible (not rounded to 0.0)."""
    if 0 < x < 1 << 20:
        return f"{x >> 10} KiB"
    return f"{x / (1 << 20):.1f} MiB"


def reads(path):
    data = {}
    for line in open(path):
        f = line.split()
        if len(f) == 3:  # read.txt before the modes: SIDE WHAT MB/S
            f = [f[0], f[1], "?", f[2], "-", "-"]
        if len(f) != 6:
            continue
        side, what, mode, mb, before, after = f
        r = data.setdefault((what, mode), {}).setdefault(side, {"mb": [], "before": [], "after": []})
        if mb not in ("null", "-"):
            r["mb"].append(float(mb))
        for k, v in (("before", before), ("after", after)):
            if v != "-":
                r[k].append(int(v))
    print("\nread throughput, MB/s, median [min-max]: unpacked layer vs completed lazy layer, the same "
          "reads on both sides;\ncached = bytes of the backing file (tree) on the store's disk in the page "
          "cache before / after each read (max over the repetitions)")
    rows = [["read", "mode", "unpacked", "lazy", "lazy / unpacked (>= 0.9)",
             "cached unpacked", "cached lazy"]]
    notes = []
    for (what, mode), sides in data.items():
        u, z = sides.get("unpacked"), sides.get("lazy")

        def cache(r):
            if r is None or not r["before"]:
                return "-"
            return f"{mib(max(r['before']))} / {mib(max(r['after']))}"

        rows.append([what, mode, fmt(u["mb"], prec=0) if u else "-",
                     fmt(z["mb"], prec=0) if z else "not available yet",
                     ratio(med(z["mb"]) if z else None, med(u["mb"]) if u else None),
                     cache(u), cache(z)])
        for side, r in (("unpacked", u), ("lazy", z)):
            if r is None or not r["before"]:
                continue
            if max(r["before"]) > 0:
                notes.append(f"{what} {mode} on the {side} side: NOT cold, {mib(max(r['before']))} "
                             "of the backing file(s) cached before a read")
            if mode == "direct" and max(r["after"]) > 0:
                notes.append(f"{what} {mode} on the {side} side: the backing file was read through the "
                             f"page cache ({mib(max(r['after']))} cached after): O_DIRECT did not reach "
                             "the disk on that side")
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())
    for n in notes:
        print(f"note: {n}")


def index_spans(path):
    """Compressed byte ranges of the spans of an index blob (docs/lazy.md's v1
    format: 128-byte header, 64-byte entries, 96-byte spans)."""
    import struct
    b = open(path, "rb").read()
    n, m = struct.unpack_from("<II", b, 96)
    csize = struct.unpack_from("<Q", b, 80)[0]
    at = 128 + n * 64
    starts = []
    for i in range(m):
        cin = struct.unpack_from("<Q", b, at + i * 96)[0]
        bits = b[at + i * 96 + 48]
        starts.append((cin, cin - (1 if bits else 0)))
    return [starts[i][1] for i in range(m)], [starts[i + 1][0] if i + 1 < m else csize for i in range(m)]


def fetches(logdir):
    """Per lazy run in LOGDIR (benches/lazy.sh LOGS=..., with
    CSTORE_LOG=warn,cstore_fuse_fs=debug): the spans each priority fetched
    and how many of them a read or an open then needed (the layer's access
    trace), in compressed bytes of the layer (windows not included)."""
    import glob
    import re
    import struct
    pat = re.compile(r"(sha256:[0-9a-f]{64}): spans (\d+)\.\.=(\d+) \(([a-z-]+)\): fetched")
    for log in sorted(glob.glob(os.path.join(logdir, "*.daemon.log"))):
        run = os.path.basename(log)[: -len(".daemon.log")]
        fetched = {}  # (layer12, span) -> first priority that fetched it
        requests = {}
        for line in open(log, errors="replace"):
            mm = pat.search(line)
            if not mm:
                continue
            layer, a, b, prio = mm.group(1)[7:19], int(mm.group(2)), int(mm.group(3)), mm.group(4)
            requests[prio] = requests.get(prio, 0) + 1
            for sp in range(a, b + 1):
                fetched.setdefault((layer, sp), prio)
        stats = {}
        for layer in sorted({l for l, _ in fetched}):
            ix = os.path.join(logdir, f"{run}.{layer}.index")
            tr = os.path.join(logdir, f"{run}.{layer}.trace")
            if not os.path.exists(ix):
                print(f"{run}: no index for layer {layer}", file=sys.stderr)
                continue
            start, end = index_spans(ix)
            traced = set()
            if os.path.exists(tr):
                t = open(tr, "rb").read()
                traced = set(struct.unpack(f"<{len(t) // 4}I", t[: len(t) // 4 * 4]))
            for (l, sp), prio in fetched.items():
                if l != layer:
                    continue
                r = stats.setdefault(prio, {"spans": 0, "bytes": 0, "used": 0, "used_bytes": 0})
                size = end[sp] - start[sp]
                r["spans"] += 1
                r["bytes"] += size
                if sp in traced:
                    r["used"] += 1
                    r["used_bytes"] += size
        print(f"\n{run}: spans fetched by priority (requests), and those a read or open needed")
        for prio, r in sorted(stats.items()):
            print(f"  {prio:<11} {requests.get(prio, 0):>4} req  {r['spans']:>5} spans {r['bytes'] / 1e6:7.2f} MB"
                  f"   needed {r['used']:>5} spans {r['used_bytes'] / 1e6:7.2f} MB"
                  f"   unused {(r['bytes'] - r['used_bytes']) / 1e6:6.2f} MB")


def stall(out, kills):
    res = None
    for line in open(out):
        if line.startswith("{"):
            res = json.loads(line)
    if res is None:
        sys.exit(f"stall: no result in {out}:\n{open(out).read()[-2000:]}")
    ks = [tuple(map(float, l.split())) for l in open(kills) if l.strip()]
    ms = lambda x: f"{x * 1e3:.1f} ms"
    print(f"\nrestart stall through containerd: a container reading {res['files']} files of a lazy layer "
          f"in a loop, the lazy daemon killed (-9) {len(ks)} times after the first loop")
    print(f"  {res['reads']} reads after the first loop, {res['errors']} errors"
          + (f" (first: {res['first_errors']})" if res["errors"] else ""))
    print(f"  read latency p50 {ms(res['p50'])}, p99 {ms(res['p99'])}, max {ms(res['max'])}")
    worst = 0.0
    for i, (a, b) in enumerate(ks):
        over = [dt for (w, dt) in res["slow"] if w <= b and w + dt >= a]
        longest = max(over, default=0.0)
        worst = max(worst, longest)
        print(f"  restart {i + 1}: new daemon after {ms(b - a)}, longest read across it "
              f"{ms(longest) if over else '< 20 ms'}")
    print(f"  longest read across a restart {ms(worst)} (goal <= 1 s: {'met' if worst <= 1.0 else 'NOT met'})")


def main():
    a = sys.argv[1:]
    if a[:1] == ["stall"] and len(a) == 3:
        return stall(a[1], a[2])
    if a[:1] == ["table"]:
        lazy = True
        if a[1:2] == ["--lazy"]:
            lazy, a = a[2] == "1", a[2:]
        return table(a[1], lazy)
    if a[:1] == ["treeread"] and len(a) == 2:
        return treeread(a[1])
    if a[:1] == ["reads"] and len(a) == 2:
        return reads(a[1])
    if a[:1] == ["fetches"] and len(a) == 2:
        return fetches(a[1])
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
