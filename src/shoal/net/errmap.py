"""The one place where gRPC errors become Shoal errors, and Shoal errors become statuses.

Client side: ``map_rpc_error`` turns a gRPC failure into the ``shoal.errors`` tree. Server
side: ``status_of`` chooses the status a handler's ShoalError travels as, so the caller's
mapping yields the same class again (ProtocolViolation stays ProtocolViolation).
"""

from __future__ import annotations

import grpc

from shoal.errors import (
    AuthenticationError,
    NetworkError,
    PeerTimeout,
    PeerUnavailable,
    ProtocolViolation,
    RemoteError,
    ShoalError,
)

_BY_CODE: dict[grpc.StatusCode, type[NetworkError]] = {
    grpc.StatusCode.UNAVAILABLE: PeerUnavailable,
    grpc.StatusCode.CANCELLED: PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: PeerTimeout,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: AuthenticationError,
    grpc.StatusCode.INVALID_ARGUMENT: ProtocolViolation,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ProtocolViolation,
    grpc.StatusCode.OUT_OF_RANGE: ProtocolViolation,
    grpc.StatusCode.DATA_LOSS: ProtocolViolation,
    grpc.StatusCode.UNIMPLEMENTED: ProtocolViolation,
}


_CONNECT_FAILED = "failed to connect to all addresses; last error: "
_TARGET_SCHEMES = ("ipv4:", "ipv6:", "unix:")


def concise(details: str) -> str:
    """gRPC core's connect failure text cut to the system's reason: ``failed to connect to
    all addresses; last error: UNKNOWN: ipv4:10.0.0.1:5: Failed to connect to remote host:
    Connection refused`` becomes ``cannot connect to 10.0.0.1:5: connection refused``
    (the address tells an old port from a new one). Other details
    (a handler's own message) are kept whole."""
    if not details.startswith(_CONNECT_FAILED):
        return details
    parts = details[len(_CONNECT_FAILED) :].split(": ")
    target = next((p.split(":", 1)[1] for p in parts if p.startswith(_TARGET_SCHEMES)), "")
    reason = parts[-1].strip()
    head = f"cannot connect to {target}" if target else "cannot connect"
    return f"{head}: {reason[:1].lower()}{reason[1:]}" if reason else head


def map_rpc_error(exc: grpc.RpcError, *, peer: str | None, method: str) -> NetworkError:
    """The Shoal error for a failed call (raise it ``from exc``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = concise(exc.details() if hasattr(exc, "details") else str(exc))
    cls = _BY_CODE.get(code, RemoteError)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    return cls(f"{method}: {name}: {details}", peer=peer)


def status_of(exc: ShoalError) -> grpc.StatusCode:
    """The status a handler's error is sent with."""
    if isinstance(exc, ProtocolViolation):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, PeerTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.FAILED_PRECONDITION


__all__ = ["concise", "map_rpc_error", "status_of"]
