#!/usr/bin/env python3
"""rateproxy.py - a TCP proxy in front of a registry that counts the bytes it
carries and can limit the bandwidth, for benches/lazy.sh.

    rateproxy.py --upstream 127.0.0.1:PORT [--listen 127.0.0.1:0] [--mbit N]
                 [--portfile F]

Every connection to the listening address is forwarded to the upstream, bytes
moved with splice(2) through a pipe (no copy into Python), two threads per
connection (one per direction), so the proxy itself is not what limits a
loopback pull. It knows nothing of HTTP: keep-alive, Range GETs and
redirects pass through untouched; counts include HTTP headers (a few hundred
bytes per request).

The limit is a token bucket per direction shared by all connections, like one
link: N Mbit/s (10^6 bit/s), 0 = unlimited, burst 10 ms worth (at least
64 KiB). It paces what goes out of the proxy: a chunk read from one side
waits for its tokens before it is written to the other side.

Prints "PORT CONTROL_PORT" on stdout (and into --portfile). The control port
speaks HTTP (curl):
  GET  /stats           {"down": bytes upstream->client, "up": bytes client->upstream,
                         "conns": connections accepted, "mbit": current limit}
  POST /reset           counters to zero
  POST /rate?mbit=N     change the limit (0 = unlimited); applies to open connections too
"""

import argparse
import fcntl
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20


class Bucket:
    """Token bucket in bytes; rate 0 = unlimited."""

    def __init__(self):
        self.lock = threading.Lock()
        self.set_rate(0)

    def set_rate(self, bytes_per_s):
        with self.lock:
            self.rate = bytes_per_s
            self.burst = max(64 << 10, bytes_per_s // 100)
            self.tokens = self.burst
            self.last = time.monotonic()

    def chunk(self):
        """Bytes to move per splice: at most the burst, so pacing stays smooth."""
        return min(256 << 10, self.burst) if self.rate else PIPE_SIZE

    def take(self, n):
        with self.lock:
            if not self.rate:
                return
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0
        if wait > 0:
            time.sleep(wait)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.down = self.up = self.conns = 0

    def add(self, field, n):
        with self.lock:
            setattr(self, field, getattr(self, field) + n)


def pump(src, dst, bucket, stats, field):
    """src -> dst until EOF or error, through a pipe with splice; then half-close dst."""
    pr, pw = os.pipe()
    try:
        fcntl.fcntl(pw, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    try:
        while True:
            n = os.splice(src.fileno(), pw, bucket.chunk())
            if n == 0:
                break
            bucket.take(n)
            left = n
            while left:
                left -= os.splice(pr, dst.fileno(), left)
            stats.add(field, n)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        # One side is gone: tear both down so the other pump wakes up too.
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    finally:
        os.close(pr)
        os.close(pw)


def serve_conn(client, upstream, down, up, stats):
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=pump, args=(client, server, up, stats, "up"), daemon=True)
    t.start()
    pump(server, client, down, stats, "down")
    t.join()
    client.close()
    server.close()


def control(stats, down, up):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def stats(self):
            with stats.lock:
                return {"down": stats.down, "up": stats.up, "conns": stats.conns,
                        "mbit": down.rate * 8 / 1e6}

        def do_GET(self):
            if urlsplit(self.path).path == "/stats":
                return self.reply(self.stats())
            self.send_error(404)

        def do_POST(self):
            u = urlsplit(self.path)
            if u.path == "/reset":
                with stats.lock:
                    stats.down = stats.up = stats.conns = 0
                return self.reply(self.stats())
            if u.path == "/rate":
                mbit = float(parse_qs(u.query).get("mbit", ["0"])[0])
                for b in (down, up):
                    b.set_rate(int(mbit * 1e6 / 8))
                return self.reply(self.stats())
            self.send_error(404)

    return H


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="host:port")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free one)")
    ap.add_argument("--mbit", type=float, default=0, help="limit in Mbit/s per direction, 0 = none")
    ap.add_argument("--portfile")
    a = ap.parse_args()
    uh, _, upo = a.upstream.rpartition(":")
    lh, _, lpo = a.listen.rpartition(":")
    down, up, stats = Bucket(), Bucket(), Stats()
    for b in (down, up):
        b.set_rate(int(a.mbit * 1e6 / 8))

    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((lh, int(lpo)))
    lsock.listen(256)
    ctl = ThreadingHTTPServer((lh, 0), control(stats, down, up))
    ctl.daemon_threads = True
    threading.Thread(target=ctl.serve_forever, daemon=True).start()
    ports = f"{lsock.getsockname()[1]} {ctl.server_address[1]}"
    if a.portfile:
        with open(a.portfile + ".tmp", "w") as f:
            f.write(ports + "\n")
        os.replace(a.portfile + ".tmp", a.portfile)
    print(ports, flush=True)

    upstream = (uh, int(upo))
    try:
        while True:
            c, _ = lsock.accept()
            stats.add("conns", 1)
            threading.Thread(target=serve_conn, args=(c, upstream, down, up, stats), daemon=True).start()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
