"""Raw TCP check of an emulated link (run inside network namespaces by scripts/bench_wan.py).

    python socktest.py server PORT            # one namespace: ping-pong 20 x 1 byte, then sink N bytes
    python socktest.py client HOST PORT MIB   # another: prints one JSON line {rtt_ms_min, rtt_ms_median, mbit_s, ...}
"""
import json
import socket
import struct
import sys
import time


def recv_exact(c, n):
    out = b""
    while len(out) < n:
        b = c.recv(n - len(out))
        if not b:
            raise ConnectionError("peer closed")
        out += b
    return out


if sys.argv[1] == "server":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.listen(1)
    s.settimeout(60)
    print("listening", flush=True)
    c, _ = s.accept()
    c.settimeout(120)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(20):
        c.sendall(recv_exact(c, 1))
    n = struct.unpack("!Q", recv_exact(c, 8))[0]
    got = 0
    while got < n:
        b = c.recv(1 << 20)
        if not b:
            break
        got += len(b)
    c.sendall(b"k")
    c.close()
    s.close()
else:
    host, port, mib = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    deadline = time.monotonic() + 20
    while True:
        try:
            c = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    c.settimeout(120)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(20):
        t = time.perf_counter()
        c.sendall(b"x")
        recv_exact(c, 1)
        rtts.append((time.perf_counter() - t) * 1e3)
    n = mib << 20
    buf = b"\0" * (1 << 20)
    t = time.perf_counter()
    c.sendall(struct.pack("!Q", n))
    for _ in range(mib):
        c.sendall(buf)
    recv_exact(c, 1)
    dt = time.perf_counter() - t
    print(json.dumps({"rtt_ms_min": min(rtts), "rtt_ms_median": sorted(rtts)[10], "mib": mib,
                      "seconds": dt, "mbit_s": n * 8 / dt / 1e6}), flush=True)
