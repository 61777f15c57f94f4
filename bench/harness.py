"""What bench/bench.py and bench/chaos.py share: a scratch directory, the
processes they start (all stopped at exit), free ports, CPU pinning."""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "gimlet")
TMP = tempfile.mkdtemp(prefix="gimlet-bench-")
PROCS = []


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 5
    for p in PROCS:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(TMP, ignore_errors=True)


atexit.register(cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

NCPU = os.cpu_count() or 1
PIN = NCPU >= 2 and shutil.which("taskset") is not None
GW_CPU, LOAD_CPU = "0", "1"


def pinned(cpu, cmd):
    return (["taskset", "-c", cpu] + cmd) if PIN and cpu is not None else cmd


def repin(pid, cpu):
    if PIN:
        subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], stdout=subprocess.DEVNULL, check=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, what, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start on port {port}")


def start(cmd, cpu=None, **kw):
    p = subprocess.Popen(pinned(cpu, cmd), **kw)
    PROCS.append(p)
    return p


def write(name, text):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def proc_status(pid, field):
    """A kB field of /proc/PID/status (VmRSS, VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# Every nginx here: one process in the foreground, its log in TMP.
NGINX_COMMON = f"""
worker_processes 1;
daemon off;
master_process off;
error_log {TMP}/nginx-error.log warn;
events {{ worker_connections 8192; }}
"""
