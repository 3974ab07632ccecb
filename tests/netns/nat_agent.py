"""Runs ``shoal.net.nat.punch`` inside a testbed host (with agents.py's rendezvous).

    python nat_agent.py NAME RENDEZVOUS_IP PORT

Registers at the rendezvous from a reusable socket, learns the peer's public address, punches
from the same local port, exchanges names over the punched socket, prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys

from shoal.errors import NetworkError
from shoal.net.nat.punch import PunchConfig, punch, reusable_socket


async def main(name: str, ip: str, port: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    control = reusable_socket()
    await asyncio.wait_for(loop.sock_connect(control, (ip, port)), 10)
    reader, writer = await asyncio.open_connection(sock=control)
    writer.write(f"{name}\n".encode())
    peer_name, peer_ip, peer_port = (await asyncio.wait_for(reader.readline(), 30)).decode().split()
    config = PunchConfig(attempts=2, attempt_timeout_s=3.0, total_timeout_s=8.0)
    try:
        result = await punch(control.getsockname()[1], (peer_ip, int(peer_port)), config)
    except NetworkError as exc:
        writer.close()
        return {"ok": False, "error": type(exc).__name__}
    p_reader, p_writer = await asyncio.open_connection(sock=result.sock)
    p_writer.write(f"{name}\n".encode())
    heard = (await asyncio.wait_for(p_reader.readline(), 5)).decode().strip()
    p_writer.close()
    writer.close()
    return {"ok": heard == peer_name, "heard": heard, "attempts": result.attempts}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))), flush=True)
