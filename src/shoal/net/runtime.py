"""The network runtime of a peer: one asyncio loop on a dedicated thread owns every socket.

    runtime = NetRuntime(identity, NetConfig(port=0)).start()   # blocking, any thread
    runtime.add_servicer(my_pb2_grpc.add_MyServicer_to_server, MyService())
    stub = runtime.stub(peer_pb2_grpc.PeerStub, "127.0.0.1:4000")
    reply = runtime.run(stub.Ping(peer_pb2.PingRequest()), timeout_s=5)   # from compute thread
    future = runtime.submit(some_coroutine())                             # concurrent future
    runtime.close()                                                        # <= 2 s, idempotent

Code already on the loop (handlers, DHT, averaging) awaits stubs directly and starts
background work with ``runtime.spawn(coro)`` so that every task is owned and cancelled on
``close()``. ``run``/``submit`` coroutines are owned too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc

from shoal.errors import ConfigError, PeerTimeout
from shoal.net.aio import within
from shoal.net.allocator import keep_freed_memory
from shoal.net.auth import SessionTable
from shoal.net.client import Stub
from shoal.net.config import NetConfig
from shoal.net.eventloop import new_event_loop
from shoal.net.health import PeerHealth
from shoal.net.identity import Identity, PeerID
from shoal.net.peer_service import PeerService
from shoal.net.pool import ConnectionPool
from shoal.net.proto.v1 import peer_pb2_grpc
from shoal.net.server import Dispatcher, server_options
from shoal.net.supervisor import Supervisor
from shoal.net.traffic import Traffic

log = logging.getLogger(__name__)
T = TypeVar("T")
CLOSE_TIMEOUT_S = 2.0


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class NetRuntime:
    """Server, connection pool, accounting and the loop thread of one peer."""

    def __init__(self, identity: Identity, config: NetConfig | None = None) -> None:
        self.identity = identity
        self.config = config or NetConfig()
        self.traffic = Traffic(self.config.max_tracked_peers)
        self.health = PeerHealth(self.config.health)
        self.sessions = SessionTable(
            identity,
            swarm_key=self.config.swarm_key,
            allowlist=self.config.allowlist,
            ttl_s=self.config.session_ttl_s,
            max_sessions=self.config.max_sessions,
            replay_window=self.config.replay_window,
            max_skew_s=self.config.max_clock_skew_s,
        )
        self.dispatcher = Dispatcher(self.sessions, self.traffic)
        self.pool = ConnectionPool(identity, self.config, self.traffic, self.health)
        self.supervisor = Supervisor()
        self.state = State.NEW
        self.port = 0
        self.unix_path: str | None = None
        self.roles: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._tmpdir: str | None = None
        self._close_lock = threading.Lock()
        self._closing: asyncio.Task[None] | None = None  # close() called on the loop itself
        self.dispatcher.add(
            peer_pb2_grpc.add_PeerServicer_to_server,
            PeerService(
                identity,
                self.sessions,
                self.config,
                self.addresses,
                lambda: list(self.roles),
                on_session=self.pool.peer_returned,
            ),
        )

    # -- properties ---------------------------------------------------------------------
    @property
    def peer_id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("runtime not started")
        return self._loop

    @property
    def address(self) -> str:
        """``host:port`` other peers dial: ``NetConfig.announce``, else the TCP listener's."""
        if self.config.announce is not None:
            return self.config.announce
        return f"{self.config.host}:{self.port}"

    def addresses(self) -> list[str]:
        """Every address this peer listens on (TCP first, then ``unix:`` if any)."""
        out = [self.address] if self.port else []
        if self.unix_path:
            out.append(f"unix:{self.unix_path}")
        return out

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> NetRuntime:
        """Start the loop thread and the server; blocks until listening. Returns self."""
        if self.state is not State.NEW:
            raise RuntimeError(f"runtime is {self.state.value}, cannot start")
        loop = new_event_loop(self.config.event_loop)  # run by the loop thread
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            if self.config.keep_freed_memory:
                keep_freed_memory()
            self._thread = threading.Thread(
                target=self._thread_main,
                args=(ready,),
                name=f"shoal-net-{self.peer_id.short()}",
                daemon=True,
            )
            self._loop = loop
            self.state = State.RUNNING
            self._thread.start()
        except BaseException:  # e.g. KeyboardInterrupt
            if self._thread is None or self._thread.ident is None:  # never ran: ours to close
                loop.close()
                self._loop, self._thread, self.state = None, None, State.CLOSED
            else:  # it runs the loop now: let it come up, then stop it as any runtime
                with contextlib.suppress(BaseException):
                    ready.result(timeout_s)
                self.close()
            raise
        try:
            ready.result(timeout_s)
        except concurrent.futures.TimeoutError:
            self.close()
            raise PeerTimeout(f"network runtime did not start within {timeout_s} s") from None
        except BaseException:
            self.state = State.CLOSED  # the loop thread cleaned up after itself
            self._thread.join(CLOSE_TIMEOUT_S)
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        return self

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._serve_start())
            except BaseException as exc:
                loop.run_until_complete(self._shutdown(CLOSE_TIMEOUT_S / 2))
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve_start(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            options=server_options(cfg.max_message_bytes, cfg.keepalive_s, cfg.keepalive_timeout_s)
        )
        server.add_generic_rpc_handlers((self.dispatcher,))
        self._server = server
        check_bindable(cfg.host, cfg.port)
        try:
            self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError as exc:  # grpc's "Failed to bind"
            raise ConfigError(
                f"NetConfig.port: cannot listen on {cfg.host}:{cfg.port} (in use?)"
            ) from exc
        if self.port == 0:
            raise ConfigError(f"NetConfig.port: cannot listen on {cfg.host}:{cfg.port}")
        if cfg.unix_socket:
            folder = cfg.unix_socket_dir or tempfile.mkdtemp(prefix="shoal-")
            self._tmpdir = None if cfg.unix_socket_dir else folder
            self.unix_path = os.path.join(folder, f"peer-{self.port}.sock")
            server.add_insecure_port(f"unix:{self.unix_path}")
        await server.start()
        self.supervisor.spawn(self._sweeper(), name="net-sweeper")

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            await self.pool.sweep()
            self.sessions.drop_expired(time.time())

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Cancel owned tasks, close channels, stop the server and the loop. Idempotent."""
        with self._close_lock:
            if self.state is State.CLOSED:
                return
            was_running = self.state is State.RUNNING
            self.state = State.CLOSED
        loop, thread = self._loop, self._thread
        if thread is threading.current_thread() and loop is not None:
            # called from a handler or task on the loop itself: it cannot block here
            self._closing = loop.create_task(self._shutdown_and_stop(timeout_s * 0.7))
            return
        if was_running and loop is not None and thread is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout_s * 0.7), loop)
            try:
                future.result(timeout_s * 0.8)
            except Exception:
                log.exception("network shutdown did not finish cleanly")
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.1, timeout_s * 0.2))
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _shutdown_and_stop(self, budget_s: float) -> None:
        try:
            await self._shutdown(budget_s)
        finally:
            asyncio.get_running_loop().stop()
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _shutdown(self, budget_s: float) -> None:
        grace = min(self.config.shutdown_grace_s, budget_s / 3)
        if self._server is not None:
            await self._server.stop(grace)
        await self.supervisor.close(budget_s / 3)
        await within(self.pool.close(), budget_s / 3)

    def __enter__(self) -> NetRuntime:
        return self.start() if self.state is State.NEW else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- services and calls -------------------------------------------------------------
    def add_servicer(self, register: Callable[[Any, Any], None], servicer: Any) -> list[str]:
        """Serve ``servicer`` (any time); ``register`` is the generated ``add_*_to_server``."""
        return self.dispatcher.add(register, servicer)

    def remove_service(self, service: str) -> None:
        """Stop serving a service by full name, e.g. ``shoal.v1.Stage``."""
        self.dispatcher.remove(service)

    def stub(self, stub_cls: type, address: str, peer_id: PeerID | None = None) -> Stub:
        """Calls to the peer at ``address`` (checked to be ``peer_id`` when given)."""
        return Stub(
            stub_cls,
            address=address,
            peer_id=peer_id,
            pool=self.pool,
            config=self.config,
            traffic=self.traffic,
        )

    async def identify(self, address: str, timeout_s: float | None = None) -> PeerID:
        """Connect and handshake with ``address``; returns the PeerID that answered."""
        conn = await self.pool.get(address, None, timeout_s or self.config.connect_timeout_s)
        assert conn.peer_id is not None  # set by the handshake
        return conn.peer_id

    def penalize(self, peer: PeerID, weight: float = 1.0) -> bool:
        """Count misbehaviour seen above the transport (e.g. a garbage gradient) against
        ``peer``; returns True when this started a ban. Call it on the loop thread."""
        return self.health.failure(peer.to_string(), time.monotonic(), weight)

    def is_banned(self, peer: PeerID) -> bool:
        """Whether ``peer`` is banned wherever it is (misbehaviour, see :meth:`penalize`,
        and errors it answered with). Failed dials ban only the address they went to."""
        return self.health.is_banned(peer.to_string(), time.monotonic())

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Start an owned background task (call on the loop thread)."""
        return self.supervisor.spawn(coro, name=name)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop from any other thread; the task is owned by the runtime."""
        if self.state is not State.RUNNING:
            coro.close()
            raise RuntimeError(f"runtime is {self.state.value}")
        return asyncio.run_coroutine_threadsafe(self._owned(coro), self.loop)

    async def _owned(self, coro: Coroutine[Any, Any, T]) -> T:
        self.supervisor.adopt()
        return await coro

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        """Run ``coro`` on the loop and wait for it (not from the loop thread).

        Raises:
            PeerTimeout: it did not finish within ``timeout_s`` (it is cancelled).
        """
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("run() called on the network loop; await instead")
        future = self.submit(coro)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise PeerTimeout(f"operation did not finish within {timeout_s} s") from None


__all__ = ["CLOSE_TIMEOUT_S", "NetRuntime", "State"]


def check_bindable(host: str, port: int, setting: str = "NetConfig.port") -> None:
    """Refuse a fixed port that is taken (or not ours to take) with the system's reason,
    naming ``setting``, before a server tries it: gRPC's own failure logs a raw C++ line
    and says only "failed". Like gRPC, it is enough that one of the addresses ``host``
    resolves to binds."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # IPv6
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(f"NetConfig.host: cannot resolve {host!r}: {why}") from exc
    errors: list[OSError] = []
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
                return
        except OSError as exc:
            errors.append(exc)
    if errors:
        why = errors[0].strerror or str(errors[0])
        raise ConfigError(f"{setting}: cannot listen on {host}:{port}: {why}")
