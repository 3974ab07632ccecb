"""Pure pieces: link choice, token bucket, relay limits config, relay adverts."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import ConfigError, ProtocolViolation
from shoal.net.config import split_host_port
from shoal.net.identity import Identity, PeerID
from shoal.net.nat.advert import (
    advertise,
    decode_relays,
    encode_relays,
    relay_key,
    relays_of,
    resolve,
)
from shoal.net.nat.limits import MAX_FRAME_BYTES, RelayConfig, TokenBucket
from shoal.net.nat.relay import observed_address
from shoal.net.nat.reserve import RelayAddress, ReserverConfig
from shoal.net.nat.routing import Link, LinkKind, choose, ranked
from shoal.net.nat.service import parse_address

DIRECT = Link(kind=LinkKind.DIRECT, address="198.18.0.2:4000")
PUNCHED = Link(kind=LinkKind.PUNCHED, address="punched")
RELAY_A = Link(kind=LinkKind.RELAYED, address="198.18.0.3:4000", rtt_s=0.050)
RELAY_B = Link(kind=LinkKind.RELAYED, address="198.18.0.4:4000", rtt_s=0.010)


def test_direct_beats_punched_beats_relayed() -> None:
    assert choose([RELAY_A, PUNCHED, DIRECT], now_s=0.0) == DIRECT
    assert choose([RELAY_A, PUNCHED], now_s=0.0) == PUNCHED
    assert ranked([RELAY_A, RELAY_B], now_s=0.0) == [RELAY_B, RELAY_A]  # faster relay first
    assert choose([], now_s=0.0) is None


def test_failed_links_wait_for_their_retry_time() -> None:
    held = Link(kind=LinkKind.DIRECT, address="198.18.0.2:4000", retry_after_s=10.0)
    assert choose([held, RELAY_A], now_s=5.0) == RELAY_A
    assert choose([held, RELAY_A], now_s=10.0) == held
    assert choose([held], now_s=9.9) is None


@given(st.permutations([DIRECT, PUNCHED, RELAY_A, RELAY_B]))
def test_order_does_not_depend_on_input_order(links: list[Link]) -> None:
    assert ranked(links, now_s=0.0) == [DIRECT, PUNCHED, RELAY_B, RELAY_A]


def test_token_bucket_holds_a_sender_to_its_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=500.0, now_s=0.0)
    assert bucket.delay_s(500, now_s=0.0) == 0.0  # the burst goes at once
    assert bucket.delay_s(1000, now_s=0.0) == pytest.approx(1.0)  # then 1000 B/s
    assert bucket.delay_s(100, now_s=1.0) == pytest.approx(0.1)
    # a quiet period refills at most to the burst
    assert bucket.delay_s(500, now_s=100.0) == 0.0
    assert bucket.delay_s(1, now_s=100.0) == pytest.approx(0.001)


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=50))
def test_token_bucket_average_rate(sizes: list[int]) -> None:
    bucket = TokenBucket(rate=1e4, burst=1e3, now_s=0.0)
    now = 0.0
    for n in sizes:
        now += bucket.delay_s(n, now)  # the sender waits as told
    assert sum(sizes) <= 1e3 + 1e4 * now + 1e-6


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_reservations", 0),
        ("max_circuits", -1),
        ("rate_bytes_s", 0.0),
        ("idle_timeout_s", float("nan")),
        ("burst_bytes", MAX_FRAME_BYTES - 1),
        ("queue_frames", 1.5),
    ],
)
def test_relay_config_rejects(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        RelayConfig(**{field: value})  # type: ignore[arg-type]


def test_reserver_config_rejects() -> None:
    with pytest.raises(ConfigError, match="wanted"):
        ReserverConfig(wanted=0)
    with pytest.raises(ConfigError, match="silence_s"):
        ReserverConfig(silence_s=0.0)


def test_adverts_round_trip_and_only_the_owner_counts() -> None:
    me, relay, other = (Identity.generate().peer_id for _ in range(3))
    relays = [RelayAddress("198.18.0.2:7600", relay), RelayAddress("198.18.0.3:7600", None)]
    data = encode_relays(relays)
    assert decode_relays(data) == relays
    assert relays_of(me, {me.raw: data}) == relays
    assert relays_of(me, {other.raw: data}) == []  # someone else's slot is ignored
    assert relays_of(me, b"plain value") == []
    assert relay_key(me) != relay_key(other)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        msgpack.packb({"a": 1}),
        msgpack.packb([[b"short", "198.18.0.2:1"]]),
        msgpack.packb([[b"", ""]]),
        msgpack.packb([[b"", "x"]] * 9),
        b"\x90" * 3000,
    ],
)
def test_malformed_adverts_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode_relays(data)


def test_addresses_from_grpc_peers_and_requests() -> None:
    assert observed_address("ipv4:198.18.0.1:4000") == "198.18.0.1:4000"
    assert observed_address("unix:/tmp/x.sock") == ""
    assert parse_address("198.18.0.1:4000") == ("198.18.0.1", 4000)
    for bad in ("198.18.0.1", ":4000", "198.18.0.1:0", "198.18.0.1:70000", "a:b"):
        with pytest.raises(ProtocolViolation):
            parse_address(bad)
    # one parser behind parse_address, NetConfig.announce, --join and the shaper's flags
    assert split_host_port("[::1]:4000") == ("::1", 4000)
    assert split_host_port("[::1]:0") is None
    assert split_host_port("[::1]:0", port_zero=True) == ("::1", 0)
    assert split_host_port("h:65536", port_zero=True) is None


class DictStore:
    """Stands in for a DHT node: dictionary keys, subkey = writer PeerID + subkey."""

    def __init__(self, writer: PeerID) -> None:
        self.writer = writer
        self.data: dict[bytes, dict[bytes, bytes]] = {}

    async def store(
        self, key: bytes, value: bytes, expires_at: float, subkey: bytes | None = None
    ) -> int:
        assert subkey is not None and expires_at > 0
        self.data.setdefault(key, {})[self.writer.raw + subkey] = value
        return 1

    async def get(self, key: bytes) -> bytes | dict[bytes, bytes] | None:
        return self.data.get(key)


def test_advertise_then_resolve() -> None:
    me, relay = Identity.generate().peer_id, Identity.generate().peer_id
    store = DictStore(me)
    relays = [RelayAddress("198.18.0.2:7600", relay)]

    async def main() -> list[RelayAddress]:
        assert await resolve(store, me) == []
        assert await advertise(store, me, relays) == 1
        return await resolve(store, me)

    assert asyncio.run(main()) == relays
