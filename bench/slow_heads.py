#!/usr/bin/env python3
"""Slow-loris check: N TLS connections to a running dps HTTPS listener, each sending half a
request head and then nothing; prints how long until the server has closed every one.

Usage: python3 bench/slow_heads.py DATA_DIR [N [PID]]   (DATA_DIR: the server's data_dir, for
run.json and ca.pem; PID: the server's, to print its resident memory before and with all N open). With the defaults every connection is closed at http_header_timeout_ms (10 s).
"""
import json, selectors, socket, ssl, sys, time
DIR = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 500
PID = sys.argv[3] if len(sys.argv) > 3 else None


def rss_kb():
    if not PID:
        return 0
    for line in open(f"/proc/{PID}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


rss0 = rss_kb()
d = json.load(open(f"{DIR}/run.json"))
host, port = d["https"].rsplit(":", 1)
ctx = ssl.create_default_context(cafile=f"{DIR}/ca.pem")
conns = []
t0 = time.monotonic()
for i in range(N):
    s = socket.create_connection((host, int(port)))
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.sendall(b"PUT /0ne/registrations/x/register?api-version=2021-06-01 HTTP/1.1\r\nHost: local" if i == 0 else b"GET /healthz HTTP/1.1\r\nHo")
    t.setblocking(False)
    conns.append(t)
sel = selectors.DefaultSelector()
for i, c in enumerate(conns):
    sel.register(c, selectors.EVENT_READ, i)
print(f"opened {N} in {time.monotonic()-t0:.1f}s", flush=True)
if PID:
    rss1 = rss_kb()
    print(f"server RSS {rss0} kB before, {rss1} kB with {N} open: {(rss1 - rss0) / N:.1f} kB each")
open_ = set(range(N)); closed_at = {}
deadline = time.monotonic() + 60
while open_ and time.monotonic() < deadline:
    for key, _ in sel.select(1.0):
        i = key.data
        c = conns[i]
        try:
            data = c.recv(4096)
        except ssl.SSLWantReadError:
            continue
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            open_.discard(i); closed_at[i] = time.monotonic() - t0
            sel.unregister(c)
print(f"still open after {time.monotonic()-t0:.1f}s: {len(open_)}; closed: {len(closed_at)}; "
      f"first close at {min(closed_at.values()):.1f}s, last at {max(closed_at.values()):.1f}s")
