"""`shoal monitor`: the swarm dashboard in a browser, served from this machine.

Sources (one of):

* ``--events PATH ...``: follow the JSONL event logs of local peers (their summary events
  feed the charts; the rest are listed as events).
* ``--join ADDR ...``: join the swarm's DHT as an observer (fresh identity, a client-only
  node that serves nothing) and read the summaries every peer publishes there. Open swarms
  only for now (no swarm-key option yet).

The page and its JSON endpoint (``/api/state``) bind 127.0.0.1 unless ``--host`` says
otherwise. The command prints the page's URL as its first stdout line and runs until
interrupted (or for ``--duration`` seconds).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

import typer

from shoal.errors import ConfigError
from shoal.monitor.config import DashboardConfig, SwarmViewConfig
from shoal.monitor.dashboard import Dashboard
from shoal.monitor.sources import DashboardSource, EventLogSource
from shoal.net.aio import within

__all__ = ["register", "run_dashboard", "serve_joined"]


async def run_dashboard(
    source: DashboardSource,
    config: DashboardConfig,
    duration_s: float | None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (by default: SIGINT/SIGTERM) or ``duration_s`` passed;
    prints the URL first, once the first poll is done."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
    async with Dashboard(source, config) as dash:
        with contextlib.suppress(asyncio.TimeoutError):  # the page shows the failure itself
            await dash.wait_first_poll(config.poll_timeout_s + 1.0)
        sys.stdout.write(dash.url + "\n")
        sys.stdout.flush()
        print(f"shoal monitor: dashboard at {dash.url} ({source.name})", file=sys.stderr)
        with contextlib.suppress(asyncio.TimeoutError):
            await within(stop.wait(), duration_s)


def serve_joined(
    addresses: list[str],
    config: DashboardConfig,
    duration_s: float | None,
    *,
    swarm_key: bytes = b"",
) -> None:
    """Observe a swarm: a client-only DHT node (fresh identity, serves nothing) on a network
    runtime, bootstrapped through ``addresses``; the dashboard runs on that runtime's loop
    and reads every peer's published summary. Blocks until SIGINT/SIGTERM or the duration.
    """
    from shoal.dht.peer import DHT
    from shoal.monitor.publish import DhtSummaryStore
    from shoal.monitor.sources import StoreSource
    from shoal.net.config import NetConfig
    from shoal.net.identity import Identity
    from shoal.net.runtime import NetRuntime

    runtime = NetRuntime(
        Identity.generate(), NetConfig(port=0, unix_socket=False, swarm_key=swarm_key)
    ).start()
    try:
        dht = DHT(runtime, serve=False)
        try:
            dht.bootstrap(addresses)
            store = DhtSummaryStore(dht.node, config=config.swarm_view)
            source = StoreSource(store, name="swarm via " + ", ".join(addresses))
            stop = asyncio.Event()
            future = runtime.submit(run_dashboard(source, config, duration_s, stop))
            in_main = threading.current_thread() is threading.main_thread()
            previous = (
                signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main else None
            )
            try:
                future.result()
            except KeyboardInterrupt:
                runtime.loop.call_soon_threadsafe(stop.set)
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    future.result(timeout=5.0)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
        finally:
            dht.close()
    finally:
        runtime.close()


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor(
        events: list[Path] = typer.Option(  # noqa: B008
            None, "--events", help="Event log(s) of local peers to follow (repeatable)."
        ),
        join: list[str] = typer.Option(  # noqa: B008
            None, "--join", help="host:port of a swarm peer to observe through (repeatable)."
        ),
        swarm: str = typer.Option("default", "--swarm", help="Name of the swarm to observe."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address the dashboard binds."),
        port: int = typer.Option(8321, "--port", help="Dashboard port (0 picks a free one)."),
        poll_interval_s: float = typer.Option(
            2.0, "--poll-interval", help="Seconds between refreshes of the swarm view."
        ),
        stale_after_s: float = typer.Option(
            45.0, "--stale-after", help="Seconds after which a silent peer counts as stale."
        ),
        duration_s: float = typer.Option(
            None, "--duration", help="Stop after this many seconds (default: run until Ctrl-C)."
        ),
    ) -> None:
        """Serve a web dashboard of the swarm: losses, throughput, peers, time, alerts."""
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        if bool(events) == bool(join):
            raise ConfigError("give exactly one source: --events PATH... or --join ADDR...")
        view = SwarmViewConfig(
            swarm=swarm,
            stale_after_s=stale_after_s,
            record_ttl_s=max(60.0, stale_after_s),
        )
        config = DashboardConfig(
            host=host, port=port, poll_interval_s=poll_interval_s, swarm_view=view
        )
        if duration_s is not None and not duration_s > 0:
            raise ConfigError(f"--duration must be positive, got {duration_s!r}")
        try:
            if events:
                missing = [str(p) for p in events if not p.exists()]
                if missing:
                    raise ConfigError(f"--events: no such file: {', '.join(missing)}")
                asyncio.run(run_dashboard(EventLogSource(events), config, duration_s))
            else:
                serve_joined(list(join), config, duration_s)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc}") from exc
