#!/usr/bin/env python3
"""Gimlet fault campaign (issue 15): the faults a gateway meets in
production, replayed on loopback, each row counted against what the gateway
answered. Every loop is bounded; every process it starts is stopped at exit.

The rule every counting row holds: an answer never claims less than what
happened. With `acked` increments answered 200, `unknown` answered 503 with
`X-Session-Write: unknown`, and `lost` requests that got no answer at all
(the gateway was killed under them), the counter read back afterwards must
satisfy  acked <= final <= acked + unknown + lost.  Anything else is a lost
acknowledged write (final < acked) or a write answered "failed" that was
applied anyway (final > acked + unknown + lost).

Rows: lost updates (one session, parallel Incr and Set) on memory, embedded
and Redis (two gateways sharing it); Redis SIGSTOP/SIGCONT under load, under
`on_error: fail` and `degrade`; Redis `kill -9` and restart under load, with
the first request after the restart; the gateway on the embedded store
killed with `kill -9` in rounds, every acknowledged write checked; the
embedded store's sweep of many expired sessions under writes; SIGHUP every
second under load; idle keep-alive and slowloris connections (RSS per
connection, latency of normal requests meanwhile); a soak sampling RSS and
open files. Prints a table, writes bench/CHAOS.md.

    bench/chaos [--soak 10m] [--only NAME[,NAME]]
"""

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

from harness import BIN, NCPU, NGINX_COMMON, ROOT, TMP, free_port, proc_status, start, wait_port, write

SECRET = "chaos-secret-0123456789abcdefghijklmnopqrstuv"
UP = free_port()

upstream_conf = write("upstream.conf", NGINX_COMMON + f"""
pid {TMP}/nginx.pid;
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{UP};
    location / {{ return 200 "ok\\n"; }}
    location /login {{ add_header X-Session-Set "user=u" always; return 200 "ok\\n"; }}
    location /read {{ return 200 "$http_x_session"; }}
    location /wo/incr {{ add_header X-Session-Incr "n=1" always; return 200 "ok\\n"; }}
    location ~ ^/wo/set/(\\w+)$ {{ add_header X-Session-Set "$1=1" always; return 200 "ok\\n"; }}
  }}
}}
""")


# --- processes ---------------------------------------------------------------

class Redis:
    """A private redis-server that fsyncs every write (so an acknowledged
    write survives kill -9), on a fixed port so it can be restarted."""

    def __init__(self):
        self.port = free_port()
        self.dir = os.path.join(TMP, f"redis-{self.port}")
        os.makedirs(self.dir)
        self.proc = None
        self.start()

    def start(self):
        self.proc = start(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir],
                          stdout=subprocess.DEVNULL)
        wait_port(self.port, "redis-server")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


class Gateway:
    """The release binary on fixed ports (a restart comes back on the same
    address, as under systemd)."""

    def __init__(self, name, store, extra="", session=""):
        self.name, self.port, self.admin = name, free_port(), free_port()
        self.cfg = write(f"{name}.yaml", f"""
listen: [{{ addr: 127.0.0.1:{self.port} }}]
admin: {{ addr: 127.0.0.1:{self.admin} }}
log: {{ format: text, level: warn }}
server: {{ threads: 2, grace_period: 1s }}
session:
  secrets: ["{SECRET}"]
{session}store: {store}
{extra}routes:
  - name: writeonly
    match: {{ path_prefix: /wo }}
    upstreams: ["127.0.0.1:{UP}"]
    session: {{ read: none, write: all }}
  - name: app
    upstreams: ["127.0.0.1:{UP}"]
""")
        self.proc = None
        self.start()

    def start(self):
        self.proc = start([BIN, "run", "-c", self.cfg], stdout=subprocess.DEVNULL,
                          stderr=open(os.path.join(TMP, f"{self.name}.log"), "a"))
        wait_port(self.port, f"gateway {self.name}")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def rss_kb(self):
        return proc_status(self.proc.pid, "VmRSS")

    def last_error(self):
        """The gateway's last warning or error line (it never logs values)."""
        with open(os.path.join(TMP, f"{self.name}.log")) as f:
            lines = [l.strip() for l in f if " WARN " in l or " ERROR " in l]
        return lines[-1][-300:] if lines else "(none)"

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0


def redis_store(r, on_error="fail"):
    return f'{{ kind: redis, url: "{r.url()}", timeout: 250ms, on_error: {on_error} }}'


def redis_gateway(name):
    """A private Redis, one gateway on it, and a logged-in session."""
    r = Redis()
    g = Gateway(name, redis_store(r))
    return r, g, login(g.port)


# --- clients -----------------------------------------------------------------

def request(port, path, cookie=None, timeout=10):
    """One request on a new connection: (status, headers, body) or None."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        r = c.getresponse()
        return r.status, r.getheaders(), r.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        c.close()


def login(port):
    res = request(port, "/login")
    assert res and res[0] == 200, f"login answered {res and res[0]}"
    cookies = [v.split(";")[0] for k, v in res[1] if k.lower() == "set-cookie"]
    assert cookies, "login set no cookie"
    return "; ".join(cookies)


def session_values(port, cookie, tries=50):
    """The session's keys as the app sees them (X-Session), retrying while
    the store recovers."""
    for _ in range(tries):
        res = request(port, "/read", cookie)
        if res and res[0] == 200:
            return dict(urllib.parse.parse_qsl(res[2].decode()))
        time.sleep(0.2)
    raise RuntimeError(f"could not read the session back from :{port}")


def counter(port, cookie):
    return int(session_values(port, cookie).get("n", "0"))


class Load:
    """`threads` clients, each on its own keep-alive connection, sending
    `path` with `cookie` to the ports in turn until stopped (or `count`
    requests each). Tallies every answer."""

    def __init__(self, ports, path, cookie, threads=8, count=None, timeout=5):
        self.ports, self.path, self.cookie, self.count, self.timeout = ports, path, cookie, count, timeout
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked = self.unknown = self.refused = self.lost = 0
        self.statuses = {}
        self.latencies = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, i):
        port = self.ports[i % len(self.ports)]
        conn = None
        sent = 0
        while not self.stop.is_set() and (self.count is None or sent < self.count):
            sent += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
                try:
                    conn.connect()
                except OSError:
                    # Nothing sent (the gateway is down): not a request.
                    conn = None
                    sent -= 1
                    time.sleep(0.05)
                    continue
            t0 = time.monotonic()
            try:
                conn.request("GET", self.path, headers={"Cookie": self.cookie} if self.cookie else {})
                r = conn.getresponse()
                r.read()
                status, unknown = r.status, r.getheader("X-Session-Write") == "unknown"
            except (OSError, http.client.HTTPException):
                # No answer: the request may or may not have been applied.
                conn.close()
                conn = None
                with self.lock:
                    self.lost += 1
                time.sleep(0.05)
                continue
            with self.lock:
                self.latencies.append(time.monotonic() - t0)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status == 200:
                    self.acked += 1
                elif unknown:
                    self.unknown += 1
                else:
                    self.refused += 1
            if status != 200:
                time.sleep(0.01)
        if conn:
            conn.close()

    def finish(self):
        if self.count is None:
            self.stop.set()
        for t in self.threads:
            t.join(30)
        return self

    def tally(self):
        return f"acked {self.acked}, unknown {self.unknown}, refused {self.refused}, no answer {self.lost}"


def holds(final, load):
    """The rule: never less than acknowledged, never more than acknowledged
    plus what was not answered as refused."""
    return load.acked <= final <= load.acked + load.unknown + load.lost


# --- rows ----------------------------------------------------------------------

ROWS = []


def row(name):
    def register(f):
        ROWS.append((name, f))
        return f
    return register


def lost_updates(ports, label):
    cookie = login(ports[0])
    incr = Load(ports, "/wo/incr", cookie, threads=8, count=150).finish()
    final = counter(ports[0], cookie)
    answers = [None] * 50

    def one(i):
        answers[i] = request(ports[i % len(ports)], f"/wo/set/k{i}", cookie)
    sets = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in sets:
        t.start()
    for t in sets:
        t.join()
    values = session_values(ports[0], cookie)
    kept = sum(1 for i in range(50) if values.get(f"k{i}") == "1")
    ok = final == incr.acked == 8 * 150 and kept == 50 and all(a and a[0] == 200 for a in answers)
    return ok, f"{label}: {incr.acked} Incr answered 200, counter {final}; 50 parallel Sets of different keys: {kept} kept"


@row("lost-update-memory")
def _():
    g = Gateway("lu-memory", "{ kind: memory }")
    return lost_updates([g.port], "1 gateway")


@row("lost-update-embedded")
def _():
    g = Gateway("lu-embedded", f'{{ kind: embedded, path: "{TMP}/lu.redb" }}')
    return lost_updates([g.port], "1 gateway")


@row("lost-update-redis")
def _():
    r = Redis()
    a, b = Gateway("lu-redis-a", redis_store(r)), Gateway("lu-redis-b", redis_store(r))
    return lost_updates([a.port, b.port], "2 gateways, 1 Redis")


def redis_pause(on_error):
    r = Redis()
    a, b = Gateway(f"pause-{on_error}-a", redis_store(r, on_error)), Gateway(f"pause-{on_error}-b", redis_store(r, on_error))
    cookie = login(a.port)
    load = Load([a.port, b.port], "/wo/incr", cookie, threads=8)
    time.sleep(2)
    for _ in range(2):
        r.proc.send_signal(signal.SIGSTOP)
        time.sleep(3)
        r.proc.send_signal(signal.SIGCONT)
        time.sleep(2)
    load.finish()
    final = counter(a.port, cookie)
    return holds(final, load), f"2 × 3 s SIGSTOP under 8 clients on 2 gateways: {load.tally()}; counter {final}"


@row("redis-stop-cont-fail")
def _():
    return redis_pause("fail")


@row("redis-stop-cont-degrade")
def _():
    return redis_pause("degrade")


@row("redis-kill9-restart")
def _():
    r, g, cookie = redis_gateway("kill-redis")
    load = Load([g.port], "/wo/incr", cookie, threads=8)
    firsts = []
    for _ in range(3):
        time.sleep(2)
        r.kill9()
        time.sleep(1)
        r.start()
        # The first request once Redis is back (issue 15, item 2).
        res = request(g.port, "/read", cookie)
        firsts.append(res[0] if res else None)
    time.sleep(2)
    load.finish()
    final = counter(g.port, cookie)
    ok = holds(final, load) and all(s == 200 for s in firsts)
    why = "" if ok else f"; last gateway error: {g.last_error()}"
    return ok, (f"3 × kill -9 + restart under 8 clients: {load.tally()}; counter {final}; "
                f"first request after each restart: {firsts}{why}")


@row("embedded-kill9-rounds")
def _():
    path = f"{TMP}/kill.redb"
    g = Gateway("kill-embedded", f'{{ kind: embedded, path: "{path}" }}')
    cookie = login(g.port)
    acked = unknown = lost = 0
    worst = ""
    ok = True
    for _ in range(5):
        load = Load([g.port], "/wo/incr", cookie, threads=8, timeout=2)
        time.sleep(1.5)
        g.kill9()
        load.finish()
        g.start()
        final = counter(g.port, cookie)
        acked, unknown, lost = acked + load.acked, unknown + load.unknown, lost + load.lost
        if not acked <= final <= acked + unknown + lost:
            ok = False
            worst = f" (broke: counter {final}, acked {acked})"
    return ok, f"5 rounds of kill -9 under 8 clients: acked {acked}, unknown {unknown}, no answer {lost}; counter {final}{worst}"


@row("embedded-sweep-stall")
def _():
    path = f"{TMP}/sweep.redb"
    g = Gateway("sweep", f'{{ kind: embedded, path: "{path}" }}', session="  lifetime: 3s\n")
    # Short-lived sessions, created as fast as 8 clients can.
    made = Load([g.port], "/login", None, threads=8)
    time.sleep(6)
    made.finish()
    # Then logins one after another while those expire and the sweeps
    # (every 10 s, then in batches until none is left) delete them.
    lat = []
    t_end = time.time() + 14
    while time.time() < t_end:
        t0 = time.monotonic()
        res = request(g.port, "/login")
        lat.append((time.monotonic() - t0) * 1000 if res and res[0] == 200 else 1e9)
    lat.sort()
    size = os.path.getsize(path) // 1024
    worst = lat[-1]
    ok = made.refused + made.lost == 0 and worst < 50
    return ok, (f"{made.acked} sessions of 3 s made in 6 s, then {len(lat)} logins one at a time while they were swept: "
                f"p50 {lat[len(lat) // 2]:.1f} ms, p99 {lat[int(len(lat) * 0.99) - 1]:.1f} ms, worst {worst:.1f} ms; "
                f"file {size} kB")


@row("reload-every-second")
def _():
    r, g, cookie = redis_gateway("reload")
    load = Load([g.port], "/wo/incr", cookie, threads=8)
    reads = Load([g.port], "/read", cookie, threads=2)
    for _ in range(10):
        time.sleep(1)
        g.proc.send_signal(signal.SIGHUP)
    load.finish()
    reads.finish()
    final = counter(g.port, cookie)
    ok = final == load.acked and load.unknown + load.refused + load.lost == 0 and reads.acked > 0 and \
        reads.refused + reads.lost == 0
    return ok, f"10 SIGHUP, 1 s apart, under 10 clients: {load.tally()}; reads {reads.tally()}; counter {final}"


def idle_connections(port, n, send):
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if send:
            s.sendall(b"GET / HTTP/1.1\r\nHost: chaos\r\n\r\n")
            buf = b""
            while b"ok\n" not in buf:
                buf += s.recv(4096)
        conns.append(s)
    return conns


@row("idle-and-slowloris")
def _():
    g = Gateway("idle", "{ kind: memory }")
    for _ in range(20):
        request(g.port, "/")
    time.sleep(0.5)
    before = g.rss_kb()
    idle = idle_connections(g.port, 2000, send=True)
    time.sleep(2)
    per_conn = (g.rss_kb() - before) / 2000
    # 200 slowloris clients: a header line, then one more byte a second.
    slow = [socket.create_connection(("127.0.0.1", g.port)) for _ in range(200)]
    for s in slow:
        s.sendall(b"GET / HTTP/1.1\r\nHost: chaos\r\nX-Slow: ")
    lat = []
    for i in range(200):
        t0 = time.monotonic()
        res = request(g.port, "/", timeout=5)
        lat.append((time.monotonic() - t0) * 1000 if res and res[0] == 200 else 1e9)
        if i % 20 == 0:
            for s in slow:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
        time.sleep(0.01)
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1]
    for s in idle + slow:
        s.close()
    # The allocator returns freed pages as its threads next run.
    for _ in range(200):
        request(g.port, "/")
    time.sleep(1)
    after = g.rss_kb()
    ok = per_conn <= 16 and p99 < 50
    return ok, (f"2,000 idle keep-alive connections: {per_conn:.1f} KB each (RSS {before} → {before + per_conn * 2000:.0f} kB, "
                f"{after} kB after they closed and 200 more requests); with 200 slowloris clients too, 200 normal requests: p50 "
                f"{lat[len(lat) // 2]:.1f} ms, p99 {p99:.1f} ms")


@row("soak")
def _():
    r, g, cookie = redis_gateway("soak")
    fds0 = g.fds()
    load = Load([g.port], "/wo/incr", cookie, threads=16)
    reads = Load([g.port], "/read", cookie, threads=16)
    samples = []
    t_end = time.time() + SOAK
    while time.time() < t_end:
        time.sleep(min(10, max(1, SOAK / 10)))
        samples.append((g.rss_kb(), g.fds()))
    load.finish()
    reads.finish()
    time.sleep(3)
    final = counter(g.port, cookie)
    fds1 = g.fds()
    rss = [s[0] for s in samples]
    fds = [s[1] for s in samples]
    # After the first quarter (warm-up: pools, caches), RSS and open files
    # stay flat; afterwards only the idle upstream and store pools remain.
    q = len(samples) // 4
    growth = (max(rss[q:]) - rss[q]) / rss[q]
    fd_growth = max(fds[q:]) - fds[q]
    ok = final == load.acked and load.unknown + load.refused + load.lost == 0 and growth < 0.10 and \
        fd_growth <= 4 and fds1 <= max(fds)
    return ok, (f"{SOAK:.0f} s at 32 clients: {load.acked + reads.acked} requests, {load.tally()}; counter {final}; "
                f"RSS {rss[0]} → {rss[-1]} kB (growth after warm-up {growth * 100:.1f} %); "
                f"open files {fds0} before, {fds[q]} → {fds[-1]} under load (max {max(fds)}), {fds1} after "
                "(the idle upstream and Redis pools)")


# --- main --------------------------------------------------------------------

def duration(s):
    m = re.fullmatch(r"(\d+)(s|m|h)?", s)
    if not m:
        raise argparse.ArgumentTypeError("a duration like 90s, 10m or 1h")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def machine():
    def out(*c):
        try:
            r = subprocess.run(c, capture_output=True, text=True)
            return (r.stdout or r.stderr).strip()
        except OSError:
            return "?"
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return (f"- CPU: {model}, {NCPU} cores; kernel {os.uname().release}\n"
            f"- {out(BIN, '--version')}, commit {out('git', '-C', ROOT, 'rev-parse', '--short', 'HEAD')}; "
            f"{out('redis-server', '--version').split(' sha=')[0]}; {out('nginx', '-v')}\n"
            "- Gateway: release build, `server.threads: 2`; upstream nginx on loopback; Redis with "
            "`appendonly yes`, `appendfsync always`")


def main():
    global SOAK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soak", type=duration, default=30, help="soak length (default 30s)")
    ap.add_argument("--only", help="comma-separated row names")
    args = ap.parse_args()
    SOAK = args.soak
    for tool in ("nginx", "redis-server"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"{tool} is missing (bench/chaos installs it)")
    start(["nginx", "-c", upstream_conf, "-p", TMP])
    wait_port(UP, "upstream nginx")
    only = set(args.only.split(",")) if args.only else None
    results = []
    for name, f in ROWS:
        if only and name not in only:
            continue
        t0 = time.time()
        try:
            ok, detail = f()
        except Exception as e:  # a row that breaks is a failed row, not a stopped campaign
            ok, detail = False, f"error: {e!r}"
        results.append((name, ok, detail, time.time() - t0))
        print(f"{'PASS' if ok else 'FAIL'} {name} ({time.time() - t0:.0f} s): {detail}", flush=True)
    table = "\n".join(["| row | result | what happened | s |", "|---|---|---|--:|"] +
                      [f"| {n} | {'pass' if ok else '**FAIL**'} | {d} | {t:.0f} |" for n, ok, d, t in results])
    text = "\n".join([
        "# Fault campaign",
        "",
        f"Written by `bench/chaos` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"{' (rows: ' + args.only + ')' if only else ''}, soak {SOAK} s. The rule every counting row holds: "
        "acked ≤ counter ≤ acked + unknown + no answer (an answer never claims less than what happened; "
        "no acknowledged write is lost).",
        "",
        machine(),
        "",
        table,
        "",
    ])
    if not only:
        with open(os.path.join(ROOT, "bench", "CHAOS.md"), "w") as f:
            f.write(text)
        print(f"\nwrote {os.path.join(ROOT, 'bench', 'CHAOS.md')}", file=sys.stderr)
    print("\n" + table)
    sys.exit(0 if all(r[1] for r in results) else 1)


SOAK = 30

if __name__ == "__main__":
    main()
