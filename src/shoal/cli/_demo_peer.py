"""``shoal peer`` that advertises another address: how the demo puts a shaper in front of it.

    python -m shoal.cli._demo_peer ANNOUNCE_HOST:PORT <shoal peer options...>

Every address a swarm peer publishes (DHT contact, membership record, matchmaking entry,
state announcement) is its runtime's ``address``. The demo reaches each peer through a
link shaper, so the peer must publish the shaper's address while it listens on its own
port. ``shoal peer`` has no option for that yet (``--announce`` is requested from its
owners); until it does, this entry runs the very same command with the runtime's
``address`` replaced by the announced one. Nothing else about the peer changes.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    if not argv or ":" not in argv[0]:
        print(
            "usage: python -m shoal.cli._demo_peer HOST:PORT [shoal peer options]", file=sys.stderr
        )
        return 2
    announce, rest = argv[0], argv[1:]

    import shoal.train.swarm_services as services
    from shoal.cli.main import main as shoal_main
    from shoal.net import NetRuntime

    class AnnouncedRuntime(NetRuntime):
        @property
        def address(self) -> str:
            return announce

    services.NetRuntime = AnnouncedRuntime  # type: ignore[misc]
    return shoal_main(["peer", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
