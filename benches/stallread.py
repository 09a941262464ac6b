# stallread.py - run INSIDE a container by benches/lazy.sh (python3 -c):
# reads every regular file of a list in a loop, timing each whole-file read,
# until /stop exists (the bench creates it through /proc/PID/root), then
# finishes the loop and prints one JSON line: loops, reads, errors, the
# latency percentiles of the reads after the first loop (whose misses fetch
# from the registry), and every read of 20 ms or more after the first loop
# as [wall start, seconds] so the bench can tell which ones a daemon restart
# caused. argv: ROOT MAX_FILES.
import json
import os
import sys
import time

root, most = sys.argv[1], int(sys.argv[2])
files = []
for d, _, names in os.walk(root):
    for n in names:
        p = os.path.join(d, n)
        if os.path.isfile(p) and not os.path.islink(p):
            files.append(p)
files = sorted(files)[:most]
lat, slow, errors, loops = [], [], [], 0
while True:
    stopping = os.path.exists("/stop")
    for f in files:
        w, t = time.time(), time.monotonic()
        try:
            with open(f, "rb") as fh:
                while fh.read(1 << 20):
                    pass
        except OSError as e:
            errors.append(f"{f}: {e}")
        dt = time.monotonic() - t
        if loops > 0:
            lat.append(dt)
            if dt >= 0.02:
                slow.append([w, dt])
    loops += 1
    if loops == 1:
        print(f"first loop done: {len(files)} files", flush=True)
    if stopping and loops > 1:
        break
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * (len(lat) - 1)))] if lat else 0.0
print(json.dumps({"files": len(files), "loops": loops, "reads": len(lat), "errors": len(errors),
                  "first_errors": errors[:5], "p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0),
                  "slow": slow}), flush=True)
