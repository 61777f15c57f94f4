#!/usr/bin/env python3
"""Instructions per request under callgrind (issue 12): unlike requests/s on
a shared machine, the count is repeatable for the same binary and input,
so it can hold targets. Each row's server runs under
`valgrind --tool=callgrind`: 300 warm-up requests (`ab -k -c1`), then
`callgrind_control -z`, 2,000 requests, `callgrind_control -d`, and the
dump's total instructions (every thread) ÷ 2,000. Ratios are to the bare
pingora pass-through (bench/passthrough.rs) built in the same run. The
upstream nginx runs natively. Run by `bench/run --instructions`; prints the
table and writes it to bench/INSTRUCTIONS.md.

Environment: BENCH_REQUESTS (default 2000), BENCH_WARMUP (default 300),
BENCH_KEEP_DUMPS=DIR (copy each row's callgrind dump there, as
DIR/ROW.callgrind, for `callgrind_annotate --inclusive=yes`).
"""

import glob
import os
import shutil
import re
import subprocess
import sys
import time

import bench
from harness import BIN, ROOT, TMP, free_port, start, wait_port

N = int(os.environ.get("BENCH_REQUESTS", "2000"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "300"))
PASS = os.path.join(ROOT, "target", "release", "examples", "passthrough")

# (key, label, target: ×pass-through, or None for no target)
ROWS = [
    ("nginx", "nginx `proxy_pass`, keepalive (reference)", None),
    ("pingora", "bare pingora pass-through (`ProxyHttp` with only `upstream_peer`)", None),
    ("like", "pingora pass-through like the gateway: peer timeouts, `X-Forwarded-For`/`-Proto` (like for like)", None),
    ("off", "gateway, sessions off (`read: none`)", 1.05),
    ("cookie", "cookie-only session read (3 clientside keys)", 1.10),
    ("cwrite", "clientside write (new Set-Cookie)", 1.20),
    ("embedded", "embedded store read (3 server-side keys)", 1.10),
    ("redis", "Redis read (3 server-side keys)", 1.25),
    ("rwrite", "Redis write (`read: all` route: one read + one write round trip)", 1.45),
]


def valgrind(name, cmd, **kw):
    out = os.path.join(TMP, f"callgrind.{name}")
    p = start(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
               "--collect-jumps=no", *cmd], stderr=open(os.path.join(TMP, f"{name}.valgrind.log"), "w"), **kw)
    return p, out


def gateway(name, store):
    cfg = bench.gateway_config(name, store)
    p, out = valgrind(name, [BIN, "run", "-c", cfg], stdout=subprocess.PIPE, text=True)
    port = None
    for line in p.stdout:
        m = re.match(r"gimlet listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if line.startswith("gimlet started"):
            break
    if port is None:
        sys.exit(f"gateway {name} did not start under valgrind; see {TMP}/{name}.valgrind.log")
    wait_port(port, f"gateway {name}", 120)
    return p, out, port


def ab(port, path, cookie, n):
    cmd = ["ab", "-q", "-k", "-c1", f"-n{n}"]
    if cookie:
        cmd += ["-H", f"Cookie: {cookie}"]
    res = subprocess.run(cmd + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=600)
    failed = re.search(r"Failed requests:\s+(\d+)", res.stdout)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", res.stdout)
    if res.returncode or (failed and int(failed.group(1))) or non2xx:
        sys.exit(f"ab {path} on :{port} failed:\n{res.stdout[-800:]}{res.stderr[-400:]}")


def measure(proc, out, port, path, cookie=None):
    ab(port, path, cookie, WARMUP)
    subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
    ab(port, path, cookie, N)
    before = set(glob.glob(out + "*"))
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        dumps = sorted(set(glob.glob(out + "*")) - before, key=os.path.getmtime)
        if dumps:
            time.sleep(0.5)  # let it finish writing
            with open(dumps[-1]) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        return int(line.split()[1]) / N, dumps[-1]
        time.sleep(0.2)
    sys.exit(f"no callgrind dump for :{port}")


# Where a row's instructions go: inclusive instructions per request of the
# functions that make up the difference to the pass-through, matched on the
# demangled name callgrind_annotate prints. Buckets overlap (a hook includes
# the header inserts and allocations it makes); each line is read on its own.
BUCKETS = [
    ("Gimlet hook `request_filter` (route, cookie open, store read, gate)", [r"Gateway as pingora_proxy::proxy_trait::ProxyHttp>::request_filter"]),
    ("Gimlet hook `upstream_request_filter` (strip, forward headers)", [r"Gateway as pingora_proxy::proxy_trait::ProxyHttp>::upstream_request_filter"]),
    ("Gimlet hook `upstream_response_filter` (directives)", [r"Gateway as pingora_proxy::proxy_trait::ProxyHttp>::upstream_response_filter"]),
    ("Gimlet hook `response_filter` (apply, store write, Set-Cookie)", [r"Gateway as pingora_proxy::proxy_trait::ProxyHttp>::response_filter"]),
    ("Gimlet hooks `new_ctx`, `upstream_peer`, `logging`", [r"Gateway as pingora_proxy::proxy_trait::ProxyHttp>::(new_ctx|upstream_peer|logging)"]),
    ("of which the store client (redis-rs / redb, inside the hooks)", [r"gimlet::proxy::Gateway::measured"]),
    ("of which the cookie codec (`Codec::open` + `Codec::seal`)", [r"gimlet::codec::Codec::(open|seal)$"]),
    ("pingora: header inserts (`insert_header` / `append_header`)", [r"^pingora_http::(insert|append)_header_value$"]),
    ("pingora: timers of the peer's `connection_timeout` and `read_timeout`", [r"^pingora_timeout::timer::TimerManager::register_timer$", r"^pingora_timeout::timer::TimerStub::poll", r"^pingora_timeout::timer::TimerManager::should_i_start_clock$"]),
    ("idle wait for the next request's first byte (`downstream::Downstream`: peek, shutdown watch) and tokio timers (it, store timeouts)", [r"Stream as pingora_core::protocols::Peek>::try_peek", r"tokio::sync::watch::Receiver<T>::changed", r"^<tokio::time::sleep::Sleep as core::future::future::Future>::poll$", r"^core::ptr::drop_in_place<.*tokio::time::timeout::Timeout<"]),
    ("`memcpy` (futures moved into boxes, buffers)", [r"^__memcpy_avx_unaligned_erms$", r"^__memmove_avx_unaligned_erms$"]),
    ("allocator (`mi_malloc_aligned`, `mi_free`, realloc)", [r"^mi_malloc_aligned$", r"^mi_free$", r"^mi_realloc_aligned$", r"^mi_zalloc_aligned$"]),
]


def inclusive(dump):
    """Function name -> inclusive instructions, from callgrind_annotate."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--tree=none", "--auto=no", "--threshold=100", dump],
                         capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)", line)
        if not m or "=>" in line:
            continue
        name = re.sub(r" \[[^\]]*\]$", "", m.group(2))
        if ":" in name and name.startswith(("/", ".", "src")):
            name = name.split(":", 1)[1]
        if name.endswith("'2") or name.endswith("'3"):
            continue  # recursion: counted in the outer entry
        d[name] = d.get(name, 0) + int(m.group(1).replace(",", ""))
    return d


def breakdown(results):
    keys = ["pingora", "like", "off", "cookie", "cwrite", "embedded", "redis", "rwrite"]
    costs = {k: inclusive(results[k][1]) for k in keys}
    head = "| instructions / request (inclusive) | " + " | ".join(keys) + " |"
    lines = [head, "|---|" + "--:|" * len(keys)]
    lines.append("| total | " + " | ".join(f"{results[k][0]:,.0f}" for k in keys) + " |")
    for label, pats in BUCKETS:
        cells = []
        for k in keys:
            total = sum(v for name, v in costs[k].items() if any(re.search(p, name) for p in pats))
            cells.append(f"{total / N:,.0f}" if total else "·")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    for tool in ("valgrind", "callgrind_control", "ab", "nginx", "redis-server"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            sys.exit(f"{tool} is missing (bench/run installs it)")
    start(["nginx", "-c", bench.upstream_conf, "-p", TMP])
    wait_port(bench.UP, "upstream nginx")
    start(["redis-server", "--port", str(bench.REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", TMP], stdout=subprocess.DEVNULL)
    wait_port(bench.REDIS, "redis-server")
    results = {}

    nginx, out = valgrind("nginx", ["nginx", "-c", bench.proxy_conf, "-p", TMP])
    wait_port(bench.PROXY, "nginx proxy", 120)
    results["nginx"] = measure(nginx, out, bench.PROXY, "/")
    nginx.terminate()

    port = free_port()
    passthrough, out = valgrind("pingora", [PASS, f"127.0.0.1:{port}", f"127.0.0.1:{bench.UP}"])
    wait_port(port, "pingora pass-through", 120)
    results["pingora"] = measure(passthrough, out, port, "/")
    passthrough.terminate()

    port = free_port()
    like, out = valgrind("like", [PASS, f"127.0.0.1:{port}", f"127.0.0.1:{bench.UP}", "--like-gateway"])
    wait_port(port, "pingora pass-through like the gateway", 120)
    results["like"] = measure(like, out, port, "/")
    like.terminate()

    # A generous store timeout: under valgrind the gateway runs ~50x slower.
    gw, out, gport = gateway("redis", f'{{ kind: redis, url: "redis://127.0.0.1:{bench.REDIS}", timeout: 10s }}')
    c3 = bench.get_cookie(gport, "/set3c")
    s3 = bench.get_cookie(gport, "/set3s")
    results["off"] = measure(gw, out, gport, "/off/")
    results["cookie"] = measure(gw, out, gport, "/", c3)
    results["cwrite"] = measure(gw, out, gport, "/cw", c3)
    results["redis"] = measure(gw, out, gport, "/", s3)
    results["rwrite"] = measure(gw, out, gport, "/sw", s3)
    gw.terminate()

    emb, out, eport = gateway("embedded", f'{{ kind: embedded, path: "{TMP}/sessions.redb", timeout: 10s }}')
    j3 = bench.get_cookie(eport, "/set3s")
    results["embedded"] = measure(emb, out, eport, "/", j3)
    emb.terminate()

    keep = os.environ.get("BENCH_KEEP_DUMPS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        for key, (_, dump) in results.items():
            shutil.copy(dump, os.path.join(keep, f"{key}.callgrind"))
    base, like_base = results["pingora"][0], results["like"][0]
    lines = ["| row | instructions / request | × bare pingora | target | | × like for like |",
             "|---|--:|--:|--:|---|--:|"]
    for key, label, target in ROWS:
        ir = results[key][0]
        ratio = ir / base
        verdict = "" if target is None else ("met" if ratio <= target else "**not met**")
        lines.append(f"| {label} | {ir:,.0f} | {ratio:.2f} | {'' if target is None else f'≤ {target:.2f}'} | {verdict} "
                     f"| {ir / like_base:.2f} |")
    table = "\n".join(lines)
    print(table)
    where = breakdown(results)
    print("\n" + where)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "src", "bench", "Cargo.toml", "Cargo.lock"]).returncode:
        commit += " with uncommitted changes"
    text = "\n".join([
        "# Instructions per request (callgrind)",
        "",
        f"Written by `bench/run --instructions` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}. "
        f"Each server under `valgrind --tool=callgrind`, one worker thread; `ab -k -c1`: {WARMUP} warm-up requests, "
        f"`callgrind_control -z`, {N} requests, `callgrind_control -d`; total instructions of the process (every thread) ÷ {N}. "
        "Upstream: nginx `return 200`, native. Same request for every row of a kind; the gateway rows carry the cookie "
        "their row names (3 keys, AES-GCM). The targets are the issue's, against the bare pass-through; the last column "
        "is against the like-for-like one (`bench/passthrough.rs --like-gateway`): the same pingora doing what any "
        "production proxy does and the gateway must (peer connect and read timeouts, `X-Forwarded-For` and "
        "`-Proto`), so what is left above 1.00 there is Gimlet's own work.",
        "",
        *bench.machine()[:2],
        "",
        table,
        "",
        "## Where the instructions go",
        "",
        "From the same dumps: inclusive instructions per request of the functions that make up each row's "
        "difference to the pass-through (`callgrind_annotate --inclusive=yes`; lines overlap, read each on its own; "
        "· is none).",
        "",
        where,
        "",
        "To see where a row's instructions go: `BENCH_KEEP_DUMPS=/tmp/cg bench/run --instructions`, then "
        "`callgrind_annotate --inclusive=yes /tmp/cg/ROW.callgrind` (rows: nginx, pingora, like, off, cookie, cwrite, "
        "embedded, redis, rwrite).",
        "",
    ])
    with open(os.path.join(ROOT, "bench", "INSTRUCTIONS.md"), "w") as f:
        f.write(text)
    print(f"\nwrote {os.path.join(ROOT, 'bench', 'INSTRUCTIONS.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
