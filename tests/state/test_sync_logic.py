"""Pure parts of state sync: donor choice, announcements, piece plans, manifests, version pins."""

import asyncio
import random

import msgpack
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ConfigError, ProtocolViolation, RemoteError
from shoal.net.identity import Identity
from shoal.net.proto.v1 import state_pb2
from shoal.state.announce import (
    Announcement,
    RefusedVersions,
    choose_donors,
    encode_announcement,
    parse_announcements,
)
from shoal.state.checkpoint import Snapshot
from shoal.state.recovery import Source, choose_source
from shoal.state.snapshot import ManifestLimits, check_manifest, manifest_version, prepare
from shoal.state.sync_client import plan_pieces
from shoal.state.sync_service import ServeConfig, StateService, VersionCache

IDS = [Identity.from_seed(bytes([i]) * 32).peer_id for i in range(6)]


def _ann(i, step, version="v1"):
    return Announcement(IDS[i], step, version, f"127.0.0.1:{4000 + i}", 100)


def _snap(step=3, sizes=(10, 70000, 0)):
    g = torch.Generator().manual_seed(step)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    return Snapshot(
        step=step,
        files={"model": tensors, "extra": {"rng": torch.arange(5, dtype=torch.uint8)}},
        meta={"k": step},
    )


def test_choose_donors_prefers_freshest_step_then_most_held_version():
    anns = [_ann(0, 9, "a"), _ann(1, 10, "b"), _ann(2, 10, "c"), _ann(3, 10, "c"), _ann(4, 8)]
    choice = choose_donors(anns, max_donors=3, rng=random.Random(0))
    assert choice.step == 10 and choice.version == "c"
    assert {a.peer_id for a in choice.donors} == {IDS[2], IDS[3]} and choice.spares == []
    # Then the other snapshots, freshest first: every peer's snapshot is its own version,
    # so a dead donor must not leave a joiner with nothing while others serve.
    assert [(f.step, f.version) for f in choice.fallbacks] == [(10, "b"), (9, "a"), (8, "v1")]
    assert all(f.fallbacks == () for f in choice.fallbacks)
    assert len(choose_donors(anns, max_fallbacks=1).fallbacks) == 1


def test_choose_donors_passes_over_refused_versions_whoever_serves_them():
    anns = [_ann(0, 9, "bad"), _ann(1, 9, "bad"), _ann(2, 5, "good"), _ann(3, 7, "other")]
    refused = RefusedVersions()
    assert choose_donors(anns).version == "bad"  # the freshest, held by the most
    refused.add("bad")
    choice = choose_donors(anns, skip=refused)
    assert choice is not None and choice.version == "other"
    assert choice.skip == {"bad"} and choice.fallbacks[0].skip == {"bad"}  # for download
    assert [f.version for f in choice.fallbacks] == ["good"]
    refused.add("other")
    refused.add("good")
    assert choose_donors(anns, skip=refused) is None


def test_refused_versions_keep_the_newest_few():
    refused = RefusedVersions(capacity=2)
    refused.add("")  # a snapshot taken here has no version: nothing to skip
    for v in ("a", "b", "a", "c"):
        refused.add(v)
    assert list(refused) == ["a", "c"] and "b" not in refused and len(refused) == 2
    with pytest.raises(ConfigError):
        RefusedVersions(capacity=0)


def test_choose_donors_excludes_self_and_keeps_spares():
    anns = [_ann(i, 5) for i in range(5)] + [_ann(5, 6)]
    choice = choose_donors(anns, exclude=IDS[5], max_donors=3, rng=random.Random(1))
    assert choice.step == 5 and len(choice.donors) == 3 and len(choice.spares) == 2
    assert IDS[5] not in {a.peer_id for a in choice.donors + choice.spares}
    assert choose_donors([_ann(0, 1)], exclude=IDS[0]) is None


def test_parse_announcements_drops_malformed_entries():
    good = encode_announcement(7, "abc", "127.0.0.1:1", 10)
    value = {
        IDS[0].raw: good,
        IDS[1].raw: b"\x00garbage",
        IDS[2].raw: msgpack.packb({"s": -1, "v": "x", "a": "h:1", "b": 1}),
        IDS[3].raw: msgpack.packb({"s": 1, "v": "", "a": "h:1", "b": 1}),
        b"short": good,
    }
    found = parse_announcements(value)
    assert [(a.peer_id, a.step, a.version) for a in found] == [(IDS[0], 7, "abc")]
    assert parse_announcements(None) == [] and parse_announcements(b"plain") == []


def test_choose_donors_ahead_of_progress_counts_ignores_steps():
    # Steps are each peer's own count: the peer that applied a round the others missed
    # had the lowest step of all, and a resync asking by step never found it.
    ann = [
        Announcement(IDS[0], 900, "a", "h:1", 1, (5, 7, 5)),  # as far as the caller
        Announcement(IDS[1], 640, "b", "h:2", 1, (5, 8, 5)),  # one round of fragment 1 more
        Announcement(IDS[2], 950, "c", "h:3", 1, (6, 9, 4)),  # two more, one fewer
        Announcement(IDS[3], 999, "d", "h:4", 1, None),  # counts nothing
        Announcement(IDS[4], 999, "e", "h:5", 1, (9, 9)),  # another shape
    ]
    choice = choose_donors(ann, ahead_of=[5, 7, 5], rng=random.Random(0))
    assert (choice.step, choice.version) == (950, "c")
    assert [(f.step, f.version) for f in choice.fallbacks] == [(640, "b")]
    assert choose_donors(ann, ahead_of=[6, 9, 5]) is None  # nobody is ahead
    assert choose_donors(ann).version == "d"  # without counts: freshest step


def test_progress_counts_travel_in_announcements_and_bad_ones_are_refused():
    value = {
        IDS[0].raw: encode_announcement(7, "abc", "h:1", 10, progress=[3, 0, 2]),
        IDS[1].raw: msgpack.packb({"s": 1, "v": "x", "a": "h:1", "b": 1, "p": [1, -1]}),
        IDS[2].raw: msgpack.packb({"s": 1, "v": "x", "a": "h:1", "b": 1, "p": [1.5]}),
        IDS[3].raw: msgpack.packb({"s": 1, "v": "x", "a": "h:1", "b": 1, "p": list(range(65))}),
        IDS[4].raw: msgpack.packb({"s": 1, "v": "x", "a": "h:1", "b": 1, "p": "3"}),
        IDS[5].raw: encode_announcement(8, "def", "h:2", 10),
    }
    found = parse_announcements(value)
    assert [(a.peer_id, a.progress) for a in found] == [(IDS[0], (3, 0, 2)), (IDS[5], None)]
    with pytest.raises(ConfigError, match="progress"):
        encode_announcement(1, "x", "h:1", 1, progress=[True])
    # a snapshot's meta carries them to the announcement
    snap = _snap()
    snap.meta["progress"] = [4, 4]
    assert prepare(snap).progress == (4, 4) and prepare(_snap()).progress is None


def test_equal_counts_under_a_smaller_tag_are_found_only_when_asked_for():
    # Two sides of a healed partition applied three rounds each from other states: the
    # side with the greater tag asks with tag_below and finds the other; never the reverse.
    ann = [
        Announcement(IDS[0], 50, "a", "h:1", 1, (3,), "0a"),  # tied, smaller tag
        Announcement(IDS[1], 90, "b", "h:2", 1, (3,), "ff"),  # tied, greater tag
        Announcement(IDS[2], 10, "c", "h:3", 1, (3,), None),  # tied, no tag
        Announcement(IDS[3], 20, "d", "h:4", 1, (2,), "00"),  # behind, whatever its tag
    ]
    assert choose_donors(ann, ahead_of=[3]) is None  # nobody ahead, no tie asked for
    choice = choose_donors(ann, ahead_of=[3], tag_below="5c", rng=random.Random(0))
    assert choice.version == "a" and choice.fallbacks == ()
    assert choose_donors(ann, ahead_of=[3], tag_below="0a") is None  # ours is the smallest
    ahead = [*ann, Announcement(IDS[4], 5, "e", "h:5", 1, (4,), "zz")]
    choice = choose_donors(ahead, ahead_of=[3], tag_below="5c")
    assert [choice.version, *(f.version for f in choice.fallbacks)] == ["e", "a"]  # ahead first
    # Of several tied sides, the smallest tag first (where all of them end up), whatever
    # the steps: a greater one taken first would cost another round to move on from.
    three = [*ann, Announcement(IDS[5], 99, "f", "h:6", 1, (3,), "3b")]
    choice = choose_donors(three, ahead_of=[3], tag_below="5c")
    assert [choice.version, *(f.version for f in choice.fallbacks)] == ["a", "f"]


def test_progress_tags_travel_with_counts_and_bad_ones_are_refused():
    base = {"s": 1, "v": "x", "a": "h:1", "b": 1}
    value = {
        IDS[0].raw: encode_announcement(7, "abc", "h:1", 10, progress=[3], progress_tag="9f"),
        IDS[1].raw: msgpack.packb({**base, "t": "9f"}),  # a tag without counts
        IDS[2].raw: msgpack.packb({**base, "p": [1], "t": "x" * 65}),
        IDS[3].raw: msgpack.packb({**base, "p": [1], "t": 7}),
        IDS[4].raw: msgpack.packb({**base, "p": [1], "t": "caf\u00e9"}),
    }
    found = parse_announcements(value)
    assert [(a.peer_id, a.progress, a.progress_tag) for a in found] == [(IDS[0], (3,), "9f")]
    with pytest.raises(ConfigError, match="tag"):
        encode_announcement(1, "x", "h:1", 1, progress_tag="9f")
    with pytest.raises(ConfigError, match="tag"):
        encode_announcement(1, "x", "h:1", 1, progress=[1], progress_tag="")
    snap = _snap()
    snap.meta.update(progress=[4], progress_tag="beef")
    assert prepare(snap).progress_tag == "beef"
    snap.meta["progress_tag"] = "\n"
    assert prepare(snap).progress_tag is None


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=6), st.integers(1, 9000))
@settings(max_examples=60, deadline=None)
def test_plan_pieces_covers_every_chunk_once(sizes, piece_bytes):
    manifest = state_pb2.StateManifest(chunk_bytes=1000)
    for i, n in enumerate(sizes):
        manifest.tensors.append(state_pb2.StateTensor(name=f"m/{i}", byte_length=n))
    pieces = plan_pieces(manifest, piece_bytes)
    chunks = [c for p in pieces for c in p.chunks]
    want = [(i, pos, min(1000, n - pos)) for i, n in enumerate(sizes) for pos in range(0, n, 1000)]
    assert chunks == want
    for p in pieces:
        covered = sum(s.end - s.start for s in p.segments())
        assert covered == p.nbytes


def test_manifest_round_trip_and_tampering_is_refused():
    served = prepare(_snap(), chunk_bytes=4096)
    limits = ManifestLimits()
    check_manifest(served.manifest, limits)
    assert served.version == manifest_version(served.manifest)
    assert prepare(_snap()).version != prepare(_snap(step=4)).version

    def tampered(edit):
        m = state_pb2.StateManifest()
        m.CopyFrom(served.manifest)
        edit(m)
        return m

    bad = [
        tampered(lambda m: m.tensors[0].chunk_checksums.append(1)),
        tampered(lambda m: setattr(m, "step", m.step + 1)),  # version no longer matches
        tampered(lambda m: setattr(m, "chunk_bytes", 2 << 20)),
        tampered(lambda m: m.tensors.append(m.tensors[0])),
        tampered(lambda m: setattr(m.tensors[1], "byte_length", 8)),
    ]
    for m in bad:
        with pytest.raises(ProtocolViolation):
            check_manifest(m, limits)
    with pytest.raises(ProtocolViolation, match="exceeds"):
        check_manifest(served.manifest, ManifestLimits(max_total_bytes=100))


def test_an_empty_tensor_with_a_huge_dimension_is_refused():
    # numel stays 0 with a zero dimension, so only a bound per dimension catches
    # [0, 2**63]; torch.empty raised TypeError on it and the joiner died.
    served = prepare(_snap(), chunk_bytes=4096)
    m = state_pb2.StateManifest()
    m.CopyFrom(served.manifest)
    m.tensors.append(
        state_pb2.StateTensor(
            name="extra/x", dtype=m.tensors[0].dtype, shape=[0, 2**63], byte_length=0
        )
    )
    m.version = manifest_version(m)
    with pytest.raises(ProtocolViolation, match="dimension"):
        check_manifest(m, ManifestLimits())


def test_version_cache_pins_used_versions_for_a_while():
    now = [0.0]
    cache = VersionCache(ServeConfig(pin_s=10.0, max_versions=2), clock=lambda: now[0])
    old, new, newer = prepare(_snap(1)), prepare(_snap(2)), prepare(_snap(3))
    assert cache.get("", old) is old
    now[0] = 5.0
    assert cache.get(old.version, new) is old  # still pinned after the donor moved on
    now[0] = 16.0
    assert cache.get(old.version, new) is None  # unused for longer than pin_s
    cache.get(new.version, new)
    cache.update(newer)
    assert cache.versions == [new.version, newer.version]


def _fetch_all(service, request):
    async def collect():
        return [frame async for frame in service.Fetch(request, None)]

    return asyncio.run(collect())


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 300000), st.integers(0, 300000)),
        max_size=5,
    ),
    st.text(max_size=70),
)
@settings(max_examples=80, deadline=None)
def test_fetch_with_arbitrary_segments_fails_cleanly(segments, version):
    served = prepare(_snap(), chunk_bytes=4096)
    service = StateService(lambda: served)
    request = state_pb2.FetchRequest(version=version)
    for t, a, b in segments:
        request.segments.append(state_pb2.Segment(tensor=t, start=a, end=b))
    try:
        frames = _fetch_all(service, request)
    except (ProtocolViolation, RemoteError):
        return
    assert sum(f.data.nbytes for f in frames) == sum(b - a for _, a, b in segments)


def test_choose_source_prefers_the_strictly_fresher_copy():
    assert choose_source(None, None) is Source.NONE
    assert choose_source(5, None) is Source.DISK
    assert choose_source(None, 0) is Source.SWARM
    assert choose_source(5, 5) is Source.DISK
    assert choose_source(5, 6) is Source.SWARM


@given(st.binary(max_size=2000))
@settings(max_examples=150, deadline=None)
def test_manifest_from_arbitrary_bytes_is_refused_cleanly(data):
    try:
        manifest = state_pb2.StateManifest.FromString(data)
    except DecodeError:
        return
    with pytest.raises(ProtocolViolation):
        check_manifest(manifest, ManifestLimits())  # random bytes never hash to their version


def test_recovery_tries_no_fallback_older_than_its_own_checkpoint(tmp_path, monkeypatch):
    # The swarm wins only when it is ahead of the disk; its older fallbacks would replace
    # a newer local checkpoint (a dead donor at step 120 made a peer at 100 restart at 50).
    from shoal.errors import PeerUnavailable
    from shoal.state import recovery
    from shoal.state.checkpoint import write_snapshot

    write_snapshot(_snap(step=100), tmp_path)
    anns = [_ann(0, 120, "a"), _ann(1, 110, "b"), _ann(2, 50, "c")]
    tried = []

    async def find(dht, key, config, exclude=None):
        return choose_donors(anns)

    async def download(runtime, choice, config):
        tried.extend([choice.step, *(f.step for f in choice.fallbacks)])
        raise PeerUnavailable("all gone")

    class Runtime:
        peer_id = None

        def run(self, coro, timeout_s):
            return asyncio.run(coro)

    monkeypatch.setattr(recovery, "find_donors", find)
    monkeypatch.setattr(recovery, "download", download)
    found = recovery.recover(tmp_path, Runtime(), object(), b"k")
    assert tried == [120, 110]  # never step 50
    assert found.source is recovery.Source.DISK and found.step == 100
