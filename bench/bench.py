#!/usr/bin/env python3
"""Gimlet benchmark: what sessions cost on top of a bare pass-through.

Starts, on loopback: nginx as a fast upstream (`return 200`), nginx as a
reverse proxy (the baseline a user would otherwise deploy), a private
redis-server, the gateway (release build, one worker thread) on the Redis
store and on the embedded store, then measures each row with wrk, one after
another. Prints a markdown table and writes it, with the machine and
parameters, to bench/RESULTS.md. Every process it starts is stopped at exit.

This machine is a small VM whose throughput drifts by ±30% from one run to
the next, so every row is measured in several rounds (all rows, round after
round) and the median is reported; the gateway's CPU time per request, read
from /proc, is reported too: it is far steadier than requests/s.

Environment: BENCH_DURATION (seconds per 64-connection run, default 10),
BENCH_ROUNDS (default 3), BENCH_CONNECTIONS (default 64),
BENCH_SKIP_CRITERION=1.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

from harness import (BIN, GW_CPU, LOAD_CPU, NCPU, NGINX_COMMON, PIN, ROOT, TMP, free_port, pinned, proc_status,
                     repin, start, wait_port, write)

DUR = int(os.environ.get("BENCH_DURATION", "10"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECRET = "bench-secret-0123456789abcdefghijklmnopqrstuv"


# --- processes -------------------------------------------------------------

UP = free_port()
PROXY = free_port()
REDIS = free_port()

upstream_conf = write("upstream.conf", NGINX_COMMON + f"""
pid {TMP}/upstream.pid;
http {{
  access_log off;
  default_type text/plain;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{UP};
    location / {{ return 200 "ok\\n"; }}
    location /set3c {{ add_header X-Session-Set "ca=alpha&cb=beta&cc=gamma" always; return 200 "ok\\n"; }}
    location /set3s {{ add_header X-Session-Set "sa=alpha&sb=beta&sc=gamma" always; return 200 "ok\\n"; }}
    location /cw {{ add_header X-Session-Set "cw=1" always; return 200 "ok\\n"; }}
    location /wo/sw {{ add_header X-Session-Set "sh=1" always; return 200 "ok\\n"; }}
    location /sw {{ add_header X-Session-Set "sh=1" always; return 200 "ok\\n"; }}
    location /wo/incr {{ add_header X-Session-Incr "n=1" always; return 200 "ok\\n"; }}
  }}
}}
""")

proxy_conf = write("proxy.conf", NGINX_COMMON + f"""
pid {TMP}/proxy.pid;
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream up {{ server 127.0.0.1:{UP}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{PROXY};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")


def gateway_config(name, store):
    return write(f"{name}.yaml", f"""
listen: [{{ addr: 127.0.0.1:0 }}]
log: {{ format: text, level: warn }}
server: {{ threads: 1 }}
session:
  secrets: ["{SECRET}"]
  keys:
    ca: {{ clientside: true }}
    cb: {{ clientside: true }}
    cc: {{ clientside: true }}
    cw: {{ clientside: true }}
store: {store}
routes:
  - name: off
    match: {{ path_prefix: /off }}
    upstreams: ["127.0.0.1:{UP}"]
    session: {{ read: none, write: none }}
  - name: writeonly
    match: {{ path_prefix: /wo }}
    upstreams: ["127.0.0.1:{UP}"]
    session: {{ read: none, write: all }}
  - name: app
    upstreams: ["127.0.0.1:{UP}"]
""")


def start_gateway(name, store):
    cfg = gateway_config(name, store)
    p = start([BIN, "run", "-c", cfg], GW_CPU, stdout=subprocess.PIPE, stderr=open(f"{TMP}/{name}.log", "w"), text=True)
    port = None
    for line in p.stdout:
        m = re.match(r"gimlet listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if line.startswith("gimlet started"):
            break
    if port is None:
        sys.exit(f"gateway {name} did not start; see {TMP}/{name}.log")
    wait_port(port, f"gateway {name}")
    return p, port


def redis_cli(*args):
    return subprocess.run(["redis-cli", "-p", str(REDIS), *args], capture_output=True, text=True, check=True).stdout


def commandstats():
    out = {}
    for line in redis_cli("INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
        if m and m.group(1) not in ("info", "config|resetstat", "config"):
            out[m.group(1)] = int(m.group(2))
    return out


def get_cookie(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as r:
        lines = r.headers.get_all("Set-Cookie") or []
    assert lines, f"no cookie from {path}"
    return "; ".join(l.split(";")[0] for l in lines)


def vm_hwm_mb(pid):
    return proc_status(pid, "VmHWM") / 1024


def cpu_seconds(pid):
    """utime + stime of a process and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def reset_hwm(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def wrk(url, conns, seconds, cookie):
    script = write("wrk.lua", f'wrk.headers["Cookie"] = "{cookie}"\n' if cookie else "")
    cmd = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script, url])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    res = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    res["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    for pct in ("50", "99"):
        res[f"p{pct}"] = to_ms(re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["errors"] = int(bad.group(1)) if bad else 0
    errs = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = errs.group(1) if errs else ""
    return res


def main():
    for tool in ("nginx", "wrk", "redis-server", "redis-cli"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (bench/run installs it)")
    up = start(["nginx", "-c", upstream_conf, "-p", TMP], LOAD_CPU)
    wait_port(UP, "upstream nginx")
    proxy = start(["nginx", "-c", proxy_conf, "-p", TMP], GW_CPU)
    wait_port(PROXY, "nginx proxy")
    start(["redis-server", "--port", str(REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", TMP],
          LOAD_CPU, stdout=subprocess.DEVNULL)
    wait_port(REDIS, "redis-server")
    gw, gport = start_gateway("redis", f'{{ kind: redis, url: "redis://127.0.0.1:{REDIS}" }}')
    emb, eport = start_gateway("embedded", f'{{ kind: embedded, path: "{TMP}/sessions.redb" }}')

    c3 = get_cookie(gport, "/set3c")       # 3 clientside keys
    s3 = get_cookie(gport, "/set3s")       # 3 server-side keys in Redis
    j3 = get_cookie(eport, "/set3s")       # 3 server-side keys, embedded
    for port, path, cookie in ((gport, "/wo/sw", s3), (gport, "/wo/incr", s3), (eport, "/wo/sw", j3)):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Cookie": cookie})
        urllib.request.urlopen(req).read()  # warm the script cache and the write path

    rows = [
        ("A", "direct to the upstream (nginx return 200)", UP, "/", None, up),
        ("B", "nginx proxy_pass, upstream keepalive", PROXY, "/", None, proxy),
        ("C", "gateway, sessions off (read: none, write: none)", gport, "/off/", None, gw),
        ("C'", "C carrying E's cookie (same request bytes as E; control row)", gport, "/off/", c3, gw),
        ("D", "gateway, sessions on, no cookie", gport, "/", None, gw),
        ("E", "cookie-only session read (3 clientside keys)", gport, "/", c3, gw),
        ("F", "clientside write every request (new Set-Cookie)", gport, "/cw", c3, gw),
        ("G", "Redis read (3 server-side keys forwarded)", gport, "/", s3, gw),
        ("H", "Redis Set of one key every request", gport, "/wo/sw", s3, gw),
        ("I", "Redis Incr every request", gport, "/wo/incr", s3, gw),
        ("J-read", "embedded store read (3 server-side keys)", eport, "/", j3, emb),
        ("J-write", "embedded store Set of one key every request", eport, "/wo/sw", j3, emb),
    ]
    runs = {key: [] for key, *_ in rows}
    for rnd in range(ROUNDS):
        for key, what, port, path, cookie, proc in rows:
            url = f"http://127.0.0.1:{port}{path}"
            if key == "A":
                repin(up.pid, GW_CPU)  # the upstream gets the measured core
            redis_cli("CONFIG", "RESETSTAT")
            if key not in ("A", "B"):
                reset_hwm(proc.pid)
            cpu0 = cpu_seconds(proc.pid)
            r = wrk(url, CONNS, DUR, cookie)
            r["cpu_us"] = (cpu_seconds(proc.pid) - cpu0) * 1e6 / max(r["requests"], 1)
            r["stats"] = commandstats()
            r["rss"] = vm_hwm_mb(proc.pid) if key not in ("A", "B") else None
            if key == "A":
                repin(up.pid, LOAD_CPU)
            runs[key].append(r)
            print(f"round {rnd + 1}/{ROUNDS} {key:8} {r['rps']:>10.0f} req/s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
                  f"cpu {r['cpu_us']:.1f} us/req  errors {r['errors']} {r['socket_errors']}", file=sys.stderr, flush=True)
    results = {}
    for key, what, port, path, cookie, proc in rows:
        rs = runs[key]
        r = {f: median([x[f] for x in rs]) for f in ("rps", "p50", "p99", "cpu_us")}
        r["errors"] = sum(x["errors"] for x in rs)
        r["rss"] = max((x["rss"] or 0) for x in rs) if key not in ("A", "B") else None
        # Redis counts come from the last round (they do not vary).
        last = rs[-1]
        r["stats"], r["requests"] = last["stats"], last["requests"]
        r["cmds"] = sum(last["stats"].values()) / max(last["requests"], 1)
        r["trips"] = sum(last["stats"].get(x, 0) for x in ("hgetall", "evalsha", "eval")) / max(last["requests"], 1)
        if key == "A":
            repin(up.pid, GW_CPU)
        r["p50_1"] = wrk(f"http://127.0.0.1:{port}{path}", 1, max(3, DUR // 2), cookie)["p50"]
        if key == "A":
            repin(up.pid, LOAD_CPU)
        results[key] = r

    c = results["C"]["rps"]
    lines = [
        f"| row | what | req/s | p50 ms ({CONNS}c) | p99 ms ({CONNS}c) | p50 ms (1c) | × C (req/s) | CPU µs/req | × C (CPU) | Redis round trips/req | Redis commands/req | gateway peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, what, *_ in rows:
        r = results[key]
        rss = f"{r['rss']:.1f}" if r["rss"] is not None else "—"
        redis = key not in ("A", "B", "J-read", "J-write")
        trips = f"{r['trips']:.2f}" if redis else "—"
        cmds = f"{r['cmds']:.2f}" if redis else "—"
        err = f" ({r['errors']} non-2xx)" if r["errors"] else ""
        lines.append(f"| {key} | {what}{err} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p50_1']:.3f} | "
                     f"{r['rps'] / c:.2f} | {r['cpu_us']:.1f} | {results['C']['cpu_us'] / r['cpu_us']:.2f} | {trips} | {cmds} | {rss} |")
    table = "\n".join(lines)

    def ratio(k):
        return results[k]["rps"] / c

    def per_req(k, *names):
        return sum(results[k]["stats"].get(n, 0) for n in names) / max(results[k]["requests"], 1)

    def cpu(k):
        return results["C"]["cpu_us"] / results[k]["cpu_us"]

    def target(name, k, want):
        control = results["C'"]
        return (name, ratio(k) >= want,
                f"req/s {ratio(k):.2f} × C; CPU/req {cpu(k):.2f} × C; "
                f"against C' (same request bytes): req/s {results[k]['rps'] / control['rps']:.2f}, CPU/req {control['cpu_us'] / results[k]['cpu_us']:.2f}")

    checks = [
        target("E ≥ 0.95 × C", "E", 0.95),
        target("D ≥ 0.98 × C", "D", 0.98),
        target("G ≥ 0.80 × C", "G", 0.80),
        target("H ≥ 0.70 × C", "H", 0.70),
        target("I ≥ 0.70 × C", "I", 0.70),
        target("J read ≥ 0.85 × C", "J-read", 0.85),
        ("C within 10% of B", abs(c / results["B"]["rps"] - 1) <= 0.10,
         f"C/B = {c / results['B']['rps']:.2f} (req/s); CPU/req C {results['C']['cpu_us']:.1f} µs vs B {results['B']['cpu_us']:.1f} µs"),
        ("0 Redis commands for D, E, F", all(results[k]["cmds"] == 0 for k in "DEF"),
         ", ".join(f"{k}: {results[k]['cmds']:.2f}" for k in "DEF")),
        ("G: one read round trip, no write command", abs(per_req("G", "hgetall") - 1) < 0.01 and per_req("G", "evalsha", "eval", "hset", "del", "exec") == 0,
         f"hgetall/req {per_req('G', 'hgetall'):.2f}, writes/req {per_req('G', 'evalsha', 'eval', 'hset', 'del', 'exec'):.2f}"),
        ("H, I: one atomic write round trip (EVALSHA), no read", all(abs(per_req(k, "evalsha", "eval") - 1) < 0.01 and per_req(k, "hgetall") == 0 for k in "HI"),
         ", ".join(f"{k}: evalsha/req {per_req(k, 'evalsha', 'eval'):.2f}, hgetall/req {per_req(k, 'hgetall'):.2f}" for k in "HI")),
        ("gateway RSS < 64 MB in every row", all((results[k]["rss"] or 0) < 64 for k in results if k not in "AB"),
         f"max {max((results[k]['rss'] or 0) for k in results):.1f} MB"),
    ]
    check_lines = ["| target | met | measured |", "|---|---|---|"]
    check_lines += [f"| {name} | {'yes' if ok else '**no**'} | {got} |" for name, ok, got in checks]
    checks_md = "\n".join(check_lines)

    print(table)
    print()
    print(checks_md)

    criterion_md = run_criterion()
    write_results(table, checks_md, criterion_md)


def run_criterion():
    if os.environ.get("BENCH_SKIP_CRITERION"):
        return "(skipped: BENCH_SKIP_CRITERION set)"
    out = "".join(subprocess.run(
        ["cargo", "bench", "--bench", b, "--", "--warm-up-time", "1", "--measurement-time", "3"],
        cwd=ROOT, capture_output=True, text=True).stdout for b in ("codec", "request"))
    rows = ["| benchmark | time (median estimate) |", "|---|---:|"]
    name = None
    for line in out.splitlines():
        m = re.match(r"^(\S+/\S+(?:/\S+)?)\s*(time:.*)?$", line.strip())
        if m and not line.startswith(" "):
            name = m.group(1)
        t = re.search(r"time:\s+\[\S+ \S+ (\S+ \S+) \S+ \S+\]", line)
        if t and name:
            rows.append(f"| {name} | {t.group(1)} |")
            name = None
    return "\n".join(rows)


def machine():
    def cmd(*c):
        try:
            return subprocess.run(c, capture_output=True, text=True).stdout.strip() or \
                subprocess.run(c, capture_output=True, text=True).stderr.strip()
        except OSError:
            return "?"
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return [
        f"- CPU: {model}, {NCPU} cores; kernel {os.uname().release}",
        f"- {cmd('rustc', '--version')}; {cmd(BIN, '--version')}",
        f"- {cmd('nginx', '-v')}; {cmd('redis-server', '--version').split(' sha=')[0]}; {cmd('wrk', '-v').splitlines()[0] if cmd('wrk', '-v') else 'wrk'}",
        f"- Pinning: {'gateway / nginx proxy on CPU ' + GW_CPU + ', wrk + upstream nginx + redis-server on CPU ' + LOAD_CPU + ' (row A: the upstream moves to CPU ' + GW_CPU + ')' if PIN else 'none (fewer than 2 CPUs or no taskset)'}",
        f"- Load: wrk -t1 -c{CONNS} -d{DUR}s per row, {ROUNDS} rounds (all rows, round after round), median reported; then -c1 for {max(3, DUR // 2)}s (p50 at 1 connection); keep-alive; loopback",
        "- CPU µs/req: user + system time of the measured server process (the gateway; nginx for A and B) per request, from /proc",
        "- Gateway: release build, `server.threads: 1`, `log.level: warn` (no access line per request), default `encrypt: true` (AES-256-GCM)",
    ]


def write_results(table, checks_md, criterion_md):
    text = "\n".join([
        "# Benchmark results",
        "",
        f"Written by `bench/run` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Numbers from one run on one machine: compare rows with each other (ratios), not with other machines.",
        "",
        *machine(),
        "",
        "## Throughput and latency",
        "",
        table,
        "",
        "Redis round trips/req counts `HGETALL` (reads; one per channel read, pipelined) plus `EVALSHA`/`EVAL` (the atomic write script) per request "
        "(commands the gateway sends); Redis commands/req counts every command Redis executed, including those the write script runs inside.",
        "",
        "## Targets",
        "",
        checks_md,
        "",
        "## Micro-benchmarks (Criterion, `cargo bench --bench codec` and `--bench request`)",
        "",
        criterion_md,
        "",
    ])
    path = os.path.join(ROOT, "bench", "RESULTS.md")
    notes = os.path.join(ROOT, "bench", "NOTES.md")
    if os.path.exists(notes):
        with open(notes) as f:
            text += "\n" + f.read()
    with open(path, "w") as f:
        f.write(text)
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
