"""The one exception tree of Shoal.

    ShoalError
    ├── ConfigError              invalid configuration or command-line value
    ├── DataError                missing or unusable training data
    ├── CheckpointError          torn, corrupt or incompatible checkpoint
    ├── TestbedError             building or removing a network-namespace testbed failed
    └── NetworkError             anything that crossed (or failed to cross) the wire
        ├── PeerUnavailable      could not reach the peer (refused, reset, unroutable, banned)
        ├── PeerTimeout          the peer did not answer within the deadline
        ├── AuthenticationError  the peer failed (or we failed) proof of identity / swarm key
        ├── ProtocolViolation    the peer sent something malformed, oversized or inconsistent
        └── RemoteError          the peer understood the call and reported a failure

Foreign errors (gRPC, OS, torch) are mapped into this tree once, at the edge that sees
them, with ``raise ... from exc``; nothing above ``net/`` sees a gRPC type.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error Shoal raises on purpose."""


class ConfigError(ShoalError, ValueError):
    """A configuration or command-line value is invalid; the message names field and value."""


class DataError(ShoalError):
    """Training data is missing or unusable."""


class CheckpointError(ShoalError):
    """A checkpoint is torn, corrupt, or does not fit the model; the message names the file."""


class TestbedError(ShoalError):
    """Building, using or removing a network-namespace testbed failed."""

    __test__ = False  # not a pytest test class


class NetworkError(ShoalError):
    """Base of errors that come from talking to other peers."""

    def __init__(self, message: str, *, peer: str | None = None) -> None:
        super().__init__(message if peer is None else f"{message} (peer {peer})")
        self.peer = peer


class PeerUnavailable(NetworkError):
    """The peer could not be reached: connection refused or reset, unroutable, or banned."""


class PeerTimeout(NetworkError):
    """The peer did not answer within the deadline."""


class AuthenticationError(NetworkError):
    """Proof of identity or swarm membership failed."""


class ProtocolViolation(NetworkError):
    """The peer sent a malformed, oversized or inconsistent message."""


class RemoteError(NetworkError):
    """The peer understood the call and reported a failure."""


__all__ = [
    "AuthenticationError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "NetworkError",
    "PeerTimeout",
    "PeerUnavailable",
    "ProtocolViolation",
    "RemoteError",
    "ShoalError",
    "TestbedError",
]
