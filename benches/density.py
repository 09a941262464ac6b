#!/usr/bin/env python3
"""density.py SYNCDIR READBACK ROUNDS N[,N..] LABEL=CMD [LABEL=CMD...]

The suite's density workload by hand, for comparing builds: N copies of each CMD (a
shell command with {id} for a unique container name, e.g.
"BIN --root ROOT run --rm --name {id} REF echo ok", or a `ctr run --rm` of a containerd
with the image) started at once with a cold cache (SYNCDIR's filesystem synced, the page
cache dropped, the comma-separated READBACK files read back: the tools' executables),
the tools' order reversed every other round; prints the time until all N have written
their first output and until all have exited, per round (with the load), then medians
with min and max. Set up the class first (e.g. the HDD model as benches/hddpolicy.sh
does with MODEL=1); docs/benchmarks.md has a run."""
import os, subprocess, sys, time, statistics, selectors
root, readback, rounds, ns = sys.argv[1], sys.argv[2].split(','), int(sys.argv[3]), [int(x) for x in sys.argv[4].split(',')]
bins = [a.split('=', 1) for a in sys.argv[5:]]
def cold():
    subprocess.run(['sync', '-f', root], check=True)
    open('/proc/sys/vm/drop_caches', 'w').write('3\n')
    for b in readback:
        with open(b, 'rb') as f:
            while f.read(1 << 20): pass
res = {}
for n in ns:
    for r in range(rounds):
        order = bins if r % 2 == 0 else bins[::-1]
        for label, b in order:
            cold()
            t0 = time.monotonic()
            ps = [subprocess.Popen(b.format(id=f'd{os.getpid()}-{label}-{n}-{r}-{i}'), shell=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(n)]
            sel = selectors.DefaultSelector()
            for p in ps: sel.register(p.stdout, selectors.EVENT_READ, p)
            first = {}
            open_ = len(ps)
            while open_:
                for key, _ in sel.select():
                    d = os.read(key.fileobj.fileno(), 4096)
                    if d: first.setdefault(key.data.pid, time.monotonic() - t0)
                    else:
                        sel.unregister(key.fileobj); open_ -= 1
            for p in ps:
                p.wait()
                if p.returncode != 0: print(label, 'failed', p.stderr.read().decode()[-500:], file=sys.stderr)
            ex = time.monotonic() - t0
            fo = max(first.values()) if len(first) == n else float('nan')
            res.setdefault((label, n), []).append((fo, ex))
            print(f'N={n} round {r+1} {label}: first outputs {fo:.3f} s, exited {ex:.3f} s  load {open("/proc/loadavg").read().split()[0]}', flush=True)
for (label, n), v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    f = [x[0] for x in v]; e = [x[1] for x in v]
    print(f'N={n} {label}: first output median {statistics.median(f):.3f} (min {min(f):.3f} max {max(f):.3f}), exited median {statistics.median(e):.3f} (min {min(e):.3f} max {max(e):.3f})')
