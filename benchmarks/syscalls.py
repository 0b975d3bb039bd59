#!/usr/bin/env python3
"""Where a forwarder spends its system calls: N MiB down through it, under ``strace -c``.

    python benchmarks/syscalls.py LOOP MIB [strace [EXTRA CLI FLAGS...]]
    python benchmarks/syscalls.py epoll 1000 strace --splice

A server sends MIB MiB to a client through ``python -m asyncore_fwd --loop
LOOP`` (a subprocess); prints the rate, and with ``strace`` writes the
forwarder's system-call counts and times to /tmp/strace-LOOP.txt.  strace
slows everything down: compare its counts, not the rate it prints.
"""
import re
import socket
import subprocess
import sys
import threading
import time

loop, mib, trace = sys.argv[1], int(sys.argv[2]), sys.argv[3:4] == ["strace"]
srv = socket.create_server(("127.0.0.1", 0))
args = [sys.executable, "-m", "asyncore_fwd", "-p", "0", "-r", "127.0.0.1", "-P", str(srv.getsockname()[1]),
        "--loop", loop, *sys.argv[4:]]
fwd = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
port = int(re.search(r":(\d+) to", fwd.stderr.readline()).group(1))
st = subprocess.Popen(["strace", "-c", "-f", "-p", str(fwd.pid), "-o", f"/tmp/strace-{loop}.txt"]) if trace else None
time.sleep(0.5)
c = socket.create_connection(("127.0.0.1", port))
s, _ = srv.accept()
chunk = b"x" * (1 << 20)
def send():
    for _ in range(mib):
        s.sendall(chunk)
    s.close()
t0 = time.perf_counter()
th = threading.Thread(target=send)
th.start()
got = 0
buf = bytearray(1 << 20)
while True:
    n = c.recv_into(buf)
    if not n:
        break
    got += n
dt = time.perf_counter() - t0
print(f"{loop}: {got / dt / 1e6:.0f} MB/s")
if st:
    st.terminate()
    st.wait()
fwd.terminate()
fwd.wait()
