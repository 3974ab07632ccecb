"""Optional LAN discovery with mDNS (``zeroconf``): advertise our DHT address, find others.

Off by default; enabled only by an explicit flag (``shoal dht serve --mdns``). ``zeroconf``
is an optional extra (``pip install 'shoal[mdns]'``) imported only when this is used, and
multicast is exercised only inside test network namespaces. Discovered addresses are mere
bootstrap hints: the DHT handshake still authenticates whoever answers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from typing import Any

from shoal.errors import ConfigError
from shoal.net.aio import within
from shoal.net.identity import PeerID

__all__ = ["SERVICE_TYPE", "MdnsAdvertiser", "discover"]

SERVICE_TYPE = "_shoal-dht._tcp.local."
_MAX_FOUND = 64


def _zeroconf() -> Any:
    try:
        import zeroconf.asyncio as zc
    except ImportError as exc:
        raise ConfigError(
            "mDNS discovery needs the optional extra: pip install 'shoal[mdns]'"
        ) from exc
    return zc


class MdnsAdvertiser:
    """Announces ``host:port`` and our PeerID on the LAN until ``close``."""

    def __init__(self, peer_id: PeerID, host: str, port: int) -> None:
        ip = ipaddress.ip_address(host)
        if ip.is_loopback or ip.is_unspecified:
            raise ConfigError(f"--mdns needs a LAN address to advertise, got {host!r}")
        self._peer_id, self._ip, self._port = peer_id, ip, port
        self._azc: Any = None
        self._info: Any = None

    async def start(self) -> None:
        zc = _zeroconf()
        from zeroconf import ServiceInfo

        name = f"{self._peer_id.to_string()[:40]}.{SERVICE_TYPE}"
        self._info = ServiceInfo(
            SERVICE_TYPE,
            name,
            addresses=[self._ip.packed],
            port=self._port,
            properties={"peer_id": self._peer_id.to_string()},
        )
        self._azc = zc.AsyncZeroconf()
        await self._azc.async_register_service(self._info)

    async def close(self) -> None:
        if self._azc is None:
            return
        azc, self._azc = self._azc, None
        with contextlib.suppress(Exception):
            await azc.async_unregister_service(self._info)
        await azc.async_close()


async def discover(timeout_s: float) -> list[str]:
    """``host:port`` of shoal DHT nodes announced on the LAN within ``timeout_s``."""
    zc = _zeroconf()
    from zeroconf import ServiceStateChange

    names: asyncio.Queue[str] = asyncio.Queue(maxsize=_MAX_FOUND)

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is ServiceStateChange.Added and not names.full():
            names.put_nowait(name)

    azc = zc.AsyncZeroconf()
    browser = zc.AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    found: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while (remaining := deadline - loop.time()) > 0 and len(found) < _MAX_FOUND:
            try:
                name = await within(names.get(), remaining)
            except asyncio.TimeoutError:
                break
            info = zc.AsyncServiceInfo(SERVICE_TYPE, name)
            wait_ms = max(1, int(min(remaining, 3.0) * 1000))
            if await info.async_request(azc.zeroconf, wait_ms) and info.port:
                found.extend(f"{a}:{info.port}" for a in info.parsed_addresses()[:4])
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return list(dict.fromkeys(found))
