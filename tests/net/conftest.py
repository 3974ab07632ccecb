"""Fixtures for net tests: runtimes on 127.0.0.1 that are always closed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime


@pytest.fixture
def make_runtime() -> Iterator[Callable[..., NetRuntime]]:
    made: list[NetRuntime] = []

    def make(seed: bytes = b"", **config: object) -> NetRuntime:
        identity = Identity.from_seed(seed) if seed else Identity.generate()
        runtime = NetRuntime(identity, NetConfig(**config)).start()  # type: ignore[arg-type]
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.close()
