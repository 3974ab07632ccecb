"""`shoal dht ...`: run a bootstrap node and read or write the swarm's DHT by hand.

* ``shoal dht serve``: a DHT node (and swarm member with role ``dht``); prints
  ``ADDRESS PEER_ID`` as its first stdout line, then runs until interrupted or ``--duration``.
  It answers the dial-back checks of joining peers, and with ``--relay`` holds relay
  reservations for peers behind NATs (a public bootstrap that lets them reduce).
* ``shoal dht put KEY VALUE --join ADDR``: store a UTF-8 value (prints replicas that took it).
* ``shoal dht get KEY --join ADDR``: print the freshest value, or ``SUBKEY_OWNER VALUE`` lines
  for a dictionary key; exits 1 when nobody holds the key.
* ``shoal dht peers --join ADDR``: the live membership view of the swarm.

Every command that talks to the network has ``--timeout`` and fails with one clear line.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.dht.peer import DHT
    from shoal.net import NetRuntime

__all__ = ["register"]

_JOIN_HELP = "host:port of a swarm peer to join through (repeatable; any may be down)."


def _runtime(host: str, port: int, key_file: Path | None) -> NetRuntime:
    from shoal.net import Identity, NetConfig, NetRuntime

    identity = Identity.load_or_create(key_file) if key_file else Identity.generate()
    return NetRuntime(identity, NetConfig(host=host, port=port, unix_socket=False)).start()


def _client(join: list[str], timeout_s: float, key_file: Path | None) -> tuple[NetRuntime, DHT]:
    """A started runtime and a client-only DHT joined through ``join``."""
    from shoal.dht.config import DHTConfig
    from shoal.dht.peer import DHT
    from shoal.net.config import RetryPolicy

    if not join:
        raise ConfigError("--join is required: give at least one host:port of a swarm peer")
    if not timeout_s > 0:
        raise ConfigError(f"--timeout must be > 0, got {timeout_s!r}")
    rpc_s = min(2.0, timeout_s)
    config = DHTConfig(
        rpc_timeout_s=rpc_s, slow_rpc_s=min(0.6, rpc_s), lookup_timeout_s=max(rpc_s, timeout_s / 2)
    )
    runtime = _runtime("127.0.0.1", 0, key_file)
    dht = DHT(runtime, config, serve=False)
    try:
        dht.bootstrap(join, RetryPolicy(attempts=3, initial_s=0.3, deadline_s=timeout_s / 2))
    except BaseException:
        dht.close()
        runtime.close()
        raise
    return runtime, dht


def _serve(
    host: str,
    port: int,
    join: list[str],
    key_file: Path | None,
    swarm: str,
    mdns: bool,
    duration_s: float | None,
    relay: bool = False,
) -> None:
    from shoal import __version__ as version
    from shoal.dht.peer import DHT
    from shoal.net.nat.limits import RelayConfig
    from shoal.net.nat.traversal import Traversal, TraversalConfig
    from shoal.swarm import Membership, PeerInfo, Reachability, SwarmConfig

    runtime = _runtime(host, port, key_file)
    # Joiners ask bootstrap peers to dial them back: without an answer, a peer behind a NAT
    # would take itself for reachable.
    nat = Traversal(runtime, TraversalConfig(relay=RelayConfig() if relay else None))
    runtime.run(nat.start(), timeout_s=5.0)
    dht = DHT(runtime)
    advertiser = None
    membership: Membership | None = None
    try:
        if mdns:
            from shoal.dht.mdns import MdnsAdvertiser, discover

            if not join:
                join = runtime.run(discover(3.0), timeout_s=5.0)
            advertiser = MdnsAdvertiser(runtime.peer_id, host, runtime.port)
            runtime.run(advertiser.start(), timeout_s=5.0)
        if join:
            dht.bootstrap(join)
        info = PeerInfo(
            addresses=(runtime.address,),
            reachability=Reachability.DIRECT
            if host not in ("127.0.0.1", "::1")
            else Reachability.UNKNOWN,
            roles=("dht", "relay") if relay else ("dht",),
            version=version,
        )
        membership = Membership(dht.node, SwarmConfig(swarm=swarm), lambda: info)

        async def start() -> None:
            membership.start()

        runtime.run(start(), timeout_s=5.0)
        sys.stdout.write(f"{runtime.address} {runtime.peer_id}\n")
        sys.stdout.flush()
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait(duration_s)
    finally:
        if membership is not None:
            runtime.run(membership.close(), timeout_s=3.0)
        if advertiser is not None:
            runtime.run(advertiser.close(), timeout_s=3.0)
        dht.close()
        runtime.run(nat.close(), timeout_s=3.0)
        runtime.close()


def _show(value: bytes) -> str:
    return value.decode("utf-8", errors="backslashreplace")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The swarm's distributed hash table.", no_args_is_help=True)
    app.add_typer(group, name="dht")

    @group.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(0, "--port", help="TCP port (0 picks a free one)."),
        join: list[str] = typer.Option(None, "--join", help=_JOIN_HELP),  # noqa: B008
        key_file: Path = typer.Option(None, "--key-file", help="Persistent identity key."),  # noqa: B008
        swarm: str = typer.Option("default", "--swarm", help="Swarm name for membership."),
        mdns: bool = typer.Option(False, "--mdns", help="Advertise/discover on the LAN (opt-in)."),
        duration_s: float = typer.Option(None, "--duration", help="Stop after this many seconds."),
        relay: bool = typer.Option(
            False, "--relay", help="Relay for peers behind NATs (needs a public address)."
        ),
    ) -> None:
        """Run a DHT node; prints 'ADDRESS PEER_ID' first."""
        _serve(host, port, list(join or []), key_file, swarm, mdns, duration_s, relay)

    @group.command("put")
    def put(
        key: str = typer.Argument(..., help="Key (UTF-8)."),
        value: str = typer.Argument(..., help="Value (UTF-8)."),
        join: list[str] = typer.Option(None, "--join", help=_JOIN_HELP),  # noqa: B008
        ttl_s: float = typer.Option(3600.0, "--ttl", help="Seconds until the record expires."),
        subkey: str = typer.Option(
            None, "--subkey", help="Write your own subkey of a dictionary key."
        ),
        key_file: Path = typer.Option(None, "--key-file", help="Identity that signs the record."),  # noqa: B008
        timeout_s: float = typer.Option(15.0, "--timeout", help="Overall deadline, seconds."),
    ) -> None:
        """Store KEY = VALUE; prints how many replicas accepted it."""
        runtime, dht = _client(list(join or []), timeout_s, key_file)
        try:
            sub = None if subkey is None else subkey.encode()
            n = dht.store(
                key.encode(), value.encode(), time.time() + ttl_s, sub, timeout_s=timeout_s
            )
        finally:
            dht.close()
            runtime.close()
        if n == 0:
            print("shoal: error: no node accepted the record", file=sys.stderr)
            raise typer.Exit(1)
        typer.echo(f"stored on {n} node(s)")

    @group.command("get")
    def get(
        key: str = typer.Argument(..., help="Key (UTF-8)."),
        join: list[str] = typer.Option(None, "--join", help=_JOIN_HELP),  # noqa: B008
        timeout_s: float = typer.Option(15.0, "--timeout", help="Overall deadline, seconds."),
    ) -> None:
        """Print the freshest value of KEY (exit 1 when absent)."""
        from shoal.net.identity import PeerID

        runtime, dht = _client(list(join or []), timeout_s, None)
        try:
            value = dht.get(key.encode(), timeout_s=timeout_s)
        finally:
            dht.close()
            runtime.close()
        if value is None:
            print(f"shoal: no value for key {key!r}", file=sys.stderr)
            raise typer.Exit(1)
        if isinstance(value, bytes):
            typer.echo(_show(value))
            return
        for sub, val in sorted(value.items()):
            owner = PeerID(sub[:32]).to_string()
            suffix = _show(sub[32:])
            typer.echo(f"{owner}{'/' + suffix if suffix else ''} {_show(val)}")

    @group.command("peers")
    def peers(
        join: list[str] = typer.Option(None, "--join", help=_JOIN_HELP),  # noqa: B008
        swarm: str = typer.Option("default", "--swarm", help="Swarm name."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
        timeout_s: float = typer.Option(15.0, "--timeout", help="Overall deadline, seconds."),
    ) -> None:
        """List the live peers of the swarm."""
        from shoal.swarm import Membership, PeerInfo, SwarmConfig

        runtime, dht = _client(list(join or []), timeout_s, None)
        try:
            view = Membership(dht.node, SwarmConfig(swarm=swarm, timeout_s=timeout_s), PeerInfo)
            runtime.run(view.refresh(), timeout_s=timeout_s)
            members = view.peers()
        finally:
            dht.close()
            runtime.close()
        now = time.time()
        for m in members:
            row = {
                "peer_id": m.peer_id.to_string(),
                "addresses": list(m.info.addresses),
                "reachability": m.info.reachability.value,
                "roles": list(m.info.roles),
                "throughput": m.info.throughput,
                "version": m.info.version,
                "expires_in_s": round(m.expires_at - now, 1),
            }
            if as_json:
                typer.echo(json.dumps(row))
            else:
                typer.echo(
                    f"{m.peer_id.short()}  {','.join(m.info.addresses) or '-'}  "
                    f"{','.join(m.info.roles) or '-'}  {m.info.throughput:g}/s  {m.info.version}"
                )
        if not as_json:
            print(f"{len(members)} live peer(s)", file=sys.stderr)
