"""Small network programs the netns tests run inside testbed hosts (stdlib only).

    python agents.py echo PORT             greet with "you are IP:PORT", then echo; many clients
    python agents.py sink PORT SECONDS WARMUP  one client; bytes received in SECONDS after WARMUP
    python agents.py source IP PORT SECONDS  send as fast as possible for SECONDS (+ margin)
    python agents.py whoami IP PORT LOCAL_PORT  connect from LOCAL_PORT, print the greeting
    python agents.py connect IP PORT TIMEOUT   try one connect, report ok / error
    python agents.py pingpong IP PORT COUNT    round-trip times of 1-byte messages, ms
    python agents.py rendezvous PORT       pair two clients, tell each the other's address
    python agents.py punch NAME IP PORT ATTEMPTS ATTEMPT_S   simultaneous open via rendezvous

Servers print "ready" once listening. Results are one JSON line on stdout.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def reusable_socket(local_port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("0.0.0.0", local_port))
    return sock


def listen(port: int) -> socket.socket:
    sock = reusable_socket(port)
    sock.listen(16)
    print("ready", flush=True)
    return sock


def read_line(sock: socket.socket, limit: int = 200) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def echo(port: int) -> None:
    server = listen(port)

    def serve(conn: socket.socket, addr: tuple[str, int]) -> None:
        with conn:
            conn.sendall(f"you are {addr[0]}:{addr[1]}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)

    for _ in range(1000):
        conn, addr = server.accept()
        threading.Thread(target=serve, args=(conn, addr), daemon=True).start()


def sink(port: int, seconds: float, warmup_s: float) -> None:
    conn, _ = listen(port).accept()
    conn.settimeout(10)
    total, first, start = 0, None, None
    while data := conn.recv(1 << 20):
        now = time.monotonic()
        if first is None:
            first = now
        if start is None and now - first >= warmup_s:
            start = now  # measure after slow start
        elif start is not None and now - start >= seconds:
            break
        elif start is not None:
            total += len(data)
    assert start is not None
    print(json.dumps({"bytes": total, "seconds": time.monotonic() - start}), flush=True)


def source(ip: str, port: int, seconds: float) -> None:
    sock = socket.create_connection((ip, port), timeout=5)
    block, end = b"x" * 65536, time.monotonic() + seconds + 5
    try:
        while time.monotonic() < end:
            sock.sendall(block)
    except OSError:
        pass  # the sink closed after its measurement window
    print(json.dumps({"ok": True}), flush=True)


def whoami(ip: str, port: int, local_port: int) -> None:
    sock = reusable_socket(local_port)
    sock.settimeout(5)
    sock.connect((ip, port))
    print(json.dumps({"local": sock.getsockname(), "seen_as": read_line(sock).split()[-1]}))


def connect(ip: str, port: int, timeout_s: float) -> None:
    started = time.monotonic()
    try:
        socket.create_connection((ip, port), timeout=timeout_s).close()
        result = {"ok": True}
    except OSError as exc:
        result = {"ok": False, "error": type(exc).__name__}
    result["seconds"] = time.monotonic() - started
    print(json.dumps(result))


def pingpong(ip: str, port: int, count: int) -> None:
    sock = socket.create_connection((ip, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    read_line(sock)
    rtts = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(b"p")
        sock.recv(1)
        rtts.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"rtt_ms": rtts}))


def rendezvous(port: int) -> None:
    server = listen(port)
    server.settimeout(90)  # clients import torch first; slow on a loaded machine
    clients = []
    for _ in range(2):
        conn, addr = server.accept()
        conn.settimeout(10)
        clients.append((conn, addr, read_line(conn)))
    for (conn, _, _), (_, addr, name) in zip(clients, reversed(clients), strict=True):
        conn.sendall(f"{name} {addr[0]} {addr[1]}\n".encode())
    for conn, _, _ in clients:
        conn.recv(1)  # wait until the client is done (or gone) before exiting


def punch(name: str, ip: str, port: int, attempts: int, attempt_s: float) -> None:
    """Register at the rendezvous from a fixed local port, then connect to the peer's
    public address from that same port, at the same time as the peer does."""
    control = reusable_socket(0)
    local_port = control.getsockname()[1]
    control.settimeout(30)
    control.connect((ip, port))
    control.sendall(f"{name}\n".encode())
    peer_name, peer_ip, peer_port = read_line(control).split()
    result: dict[str, object] = {"ok": False, "attempts": 0, "peer": f"{peer_ip}:{peer_port}"}
    for attempt in range(1, attempts + 1):
        result["attempts"] = attempt
        sock = reusable_socket(local_port)
        sock.settimeout(attempt_s)
        try:
            sock.connect((peer_ip, int(peer_port)))
            sock.sendall(f"{name}\n".encode())
            heard = read_line(sock)
            result.update(ok=heard == peer_name, heard=heard)
            sock.close()
            break
        except OSError as exc:
            result["error"] = type(exc).__name__
            sock.close()
    control.close()
    print(json.dumps(result), flush=True)


COMMANDS = {
    "echo": (echo, [int]),
    "sink": (sink, [int, float, float]),
    "source": (source, [str, int, float]),
    "whoami": (whoami, [str, int, int]),
    "connect": (connect, [str, int, float]),
    "pingpong": (pingpong, [str, int, int]),
    "rendezvous": (rendezvous, [int]),
    "punch": (punch, [str, str, int, int, float]),
}

if __name__ == "__main__":
    func, types = COMMANDS[sys.argv[1]]
    func(*(t(a) for t, a in zip(types, sys.argv[2:], strict=True)))
