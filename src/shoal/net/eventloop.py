"""The network loop's implementation: uvloop where it is installed, else asyncio's own.

A peer's network loop (``NetRuntime``) runs gRPC's asyncio stack, and on a round of the
all-reduce a fair share of its CPU goes to the loop itself: waking up for each of gRPC's
completions, running callbacks, switching tasks. uvloop (libuv under asyncio's API) does
that work in C. On the 4-peer, 25M-parameter ``shoal bench allreduce`` it cut Shoal's
CPU per round by 7.5% (``parallel/data/README.md`` has the figures). gRPC's asyncio
stack supports any loop that implements asyncio's API, and uvloop does.

``"auto"`` takes uvloop when it can be imported (it is not built for Windows) and
asyncio's loop otherwise; ``"uvloop"`` insists on it; ``"asyncio"`` never uses it.
"""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType

from shoal.errors import ConfigError

__all__ = ["EVENT_LOOPS", "new_event_loop", "uvloop_installed"]

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _uvloop() -> ModuleType | None:
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def uvloop_installed() -> bool:
    """Whether uvloop can be imported here."""
    return _uvloop() is not None


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """A fresh event loop of ``kind`` (one of :data:`EVENT_LOOPS`)."""
    if kind not in EVENT_LOOPS:
        raise ConfigError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {kind!r}")
    uvloop = None if kind == "asyncio" else _uvloop()
    if uvloop is None and kind == "uvloop":
        raise ConfigError("event loop 'uvloop' asked for, but uvloop is not installed")
    if uvloop is None:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
