"""State sync between runtimes of this process on loopback: service, client, DHT, recovery."""

import asyncio
import time
from dataclasses import replace

import pytest
import torch

from shoal.dht.peer import DHT
from shoal.errors import PeerUnavailable
from shoal.net import Identity, NetConfig, NetRuntime
from shoal.net.proto.v1 import state_pb2_grpc
from shoal.net.tensors import tensor_bytes
from shoal.state.announce import Announcement, DonorChoice, StateAnnouncer, state_key
from shoal.state.checkpoint import Snapshot, write_snapshot
from shoal.state.recovery import Source, recover
from shoal.state.snapshot import ServedSnapshot, prepare
from shoal.state.sync_client import SyncConfig, download, sync_from_swarm
from shoal.state.sync_service import StateServer, StateService

CFG = SyncConfig(piece_bytes=64 * 1024, streams_per_donor=2, total_timeout_s=60)


def _snapshot(step=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Snapshot(
        step=step,
        files={
            "model": {"w": torch.randn(300, 500, generator=g), "b": torch.zeros(3)},
            "optimizer": {"state.0.exp_avg": torch.randn(150000, generator=g)},
            "extra": {"rng": torch.get_rng_state(), "empty": torch.zeros(0)},
            "nothing": {},  # e.g. an optimizer before its first step
        },
        file_meta={"optimizer": {"shoal.optimizer": '{"scalars": {}, "param_groups": []}'}},
        meta={"data": {"batches_drawn": 3}},
    )


def _corrupted(served: ServedSnapshot) -> ServedSnapshot:
    tensors = tuple(t.clone() for t in served.tensors)
    for t in tensors:  # same manifest, wrong bytes in every chunk
        t.view(torch.uint8).view(-1)[:: 16 * 1024] += 1
    return ServedSnapshot(
        manifest=served.manifest, tensors=tensors, views=tuple(tensor_bytes(t) for t in tensors)
    )


def _assert_same(got: Snapshot, want: Snapshot):
    assert got.step == want.step and got.meta == want.meta and got.file_meta == want.file_meta
    assert set(got.files) == set(want.files)
    for stem, tensors in want.files.items():
        assert set(got.files[stem]) == set(tensors)
        for key, tensor in tensors.items():
            assert got.files[stem][key].dtype == tensor.dtype
            assert torch.equal(got.files[stem][key], tensor), f"{stem}/{key}"


@pytest.fixture()
def runtimes():
    made = []

    def make(n):
        for _ in range(n):
            made.append(NetRuntime(Identity.generate(), NetConfig(port=0)).start())
        return made[-n:]

    yield make
    for rt in made:
        rt.close()


def _choice(donors, served):
    anns = [Announcement(r.peer_id, served.step, served.version, r.address, 0) for r in donors]
    return DonorChoice(served.step, served.version, anns[:3], anns[3:])


def test_three_donors_share_the_download_and_the_result_is_exact(runtimes):
    snap = _snapshot()
    served = prepare(snap, chunk_bytes=16 * 1024)
    donors = runtimes(3)
    for rt in donors:
        StateServer(rt, lambda: served)
    (joiner,) = runtimes(1)
    result = joiner.run(download(joiner, _choice(donors, served), CFG), timeout_s=60)
    _assert_same(result.snapshot, snap)
    assert sum(result.bytes_by_donor.values()) == served.total_bytes
    assert len(result.bytes_by_donor) == 3 and result.failed_donors == []


def test_a_partial_download_fetches_and_returns_only_the_selected_tensors(runtimes):
    snap = _snapshot()
    served = prepare(snap, chunk_bytes=16 * 1024)
    donors = runtimes(2)
    for rt in donors:
        StateServer(rt, lambda: served)
    (joiner,) = runtimes(1)
    wanted = {"model/b", "optimizer/state.0.exp_avg"}
    result = joiner.run(
        download(joiner, _choice(donors, served), CFG, only=lambda name: name in wanted),
        timeout_s=60,
    )
    got = result.snapshot
    assert {f"{stem}/{k}" for stem, ts in got.files.items() for k in ts} == wanted
    assert torch.equal(got.files["model"]["b"], snap.files["model"]["b"])
    exp_avg = snap.files["optimizer"]["state.0.exp_avg"]
    assert torch.equal(got.files["optimizer"]["state.0.exp_avg"], exp_avg)
    assert got.step == snap.step and got.meta == snap.meta
    # only the selected bytes crossed the wire (the 600 KB model matrix stayed home)
    assert sum(result.bytes_by_donor.values()) == 3 * 4 + exp_avg.numel() * 4


def test_a_donor_sending_bad_bytes_is_dropped_and_others_finish(runtimes):
    snap = _snapshot()
    served = prepare(snap, chunk_bytes=16 * 1024)
    bad = _corrupted(served)
    donors = runtimes(3)
    StateServer(donors[0], lambda: bad)
    for rt in donors[1:]:
        StateServer(rt, lambda: served)
    (joiner,) = runtimes(1)
    result = joiner.run(download(joiner, _choice(donors, served), CFG), timeout_s=60)
    _assert_same(result.snapshot, snap)
    assert result.failed_donors == [donors[0].peer_id.short()]


def test_spare_donor_takes_over_and_no_donor_at_all_fails(runtimes):
    snap = _snapshot()
    served = prepare(snap, chunk_bytes=16 * 1024)
    donors = runtimes(2)
    StateServer(donors[0], lambda: _corrupted(served))
    StateServer(donors[1], lambda: served)
    (joiner,) = runtimes(1)
    anns = [Announcement(r.peer_id, 7, served.version, r.address, 0) for r in donors]
    one = SyncConfig(piece_bytes=64 * 1024, max_donors=1, total_timeout_s=60)
    result = joiner.run(
        download(joiner, DonorChoice(7, served.version, anns[:1], anns[1:]), one), 60
    )
    _assert_same(result.snapshot, snap)
    with pytest.raises(PeerUnavailable):
        joiner.run(download(joiner, DonorChoice(7, served.version, anns[:1], []), one), 60)


def test_a_donor_that_moved_on_serves_its_newer_snapshot(runtimes):
    old, new = _snapshot(step=7), _snapshot(step=9, seed=1)
    served_old, served_new = prepare(old), prepare(new)
    (donor, joiner) = runtimes(2)
    StateServer(donor, lambda: served_new)  # announced step 7, holds only step 9 now
    ann = Announcement(donor.peer_id, 7, served_old.version, donor.address, 0)
    result = joiner.run(download(joiner, DonorChoice(7, served_old.version, [ann], []), CFG), 60)
    _assert_same(result.snapshot, new)
    assert result.snapshot.version == served_new.version  # what a refusal would name
    # unless the caller refused that newer one already
    refused = DonorChoice(7, served_old.version, [ann], [], skip=frozenset({served_new.version}))
    with pytest.raises(PeerUnavailable):
        joiner.run(download(joiner, refused, CFG), 60)


def test_announce_sync_and_recover_through_the_dht(runtimes, tmp_path):
    snap = _snapshot(step=12)
    served = prepare(snap)
    joiner, donor_rt = runtimes(2)
    joiner_dht = DHT(joiner)
    donor_dht = DHT(donor_rt)
    key = state_key("t")
    try:
        donor_dht.bootstrap([joiner.address])
        StateServer(donor_rt, lambda: served)
        announcer = StateAnnouncer(donor_dht, key, lambda: served, address=donor_rt.address)
        assert donor_rt.run(announcer.announce_once(), timeout_s=20)

        result = joiner.run(sync_from_swarm(joiner, joiner_dht, key, CFG), timeout_s=60)
        _assert_same(result.snapshot, snap)

        # recovery: an older disk copy loses to the swarm, a newer one wins
        older = _snapshot(step=5, seed=3)
        older.files["local"] = {"local.topk.residual": torch.arange(4.0)}
        write_snapshot(older, tmp_path / "a")
        found = recover(tmp_path / "a", joiner, joiner_dht, key, CFG)
        assert found.source is Source.SWARM and found.step == 12
        assert torch.equal(found.checkpoint.model["w"], snap.files["model"]["w"])
        # this peer's own state comes from its disk whatever the source: no donor has it
        assert found.checkpoint.local == {}
        assert torch.equal(found.own_local["local.topk.residual"], torch.arange(4.0))
        assert found.own_meta == older.meta
        write_snapshot(_snapshot(step=20, seed=3), tmp_path / "b")
        found = recover(tmp_path / "b", joiner, joiner_dht, key, CFG)
        assert found.source is Source.DISK and found.step == 20 and found.swarm_step == 12

        # the donor stops serving: recovery falls back to the disk copy
        donor_rt.remove_service("shoal.v1.State")
        found = recover(tmp_path / "a", joiner, joiner_dht, key, CFG)
        assert found.source is Source.DISK and found.step == 5
        assert recover(tmp_path / "none", joiner, None, key, CFG).source is Source.NONE
    finally:
        donor_dht.close()
        joiner_dht.close()


def test_a_joiner_whose_donor_is_gone_downloads_another_snapshot(runtimes):
    # Each peer's snapshot is a version of its own: with its only donor gone, the chosen
    # snapshot cannot be had, and recovery used to give up while another peer served.
    joiner, live_rt, gone_rt = runtimes(3)
    live, gone = _snapshot(step=12, seed=1), _snapshot(step=12, seed=2)
    StateServer(live_rt, lambda: prepare(live))
    live_ann = Announcement(live_rt.peer_id, 12, prepare(live).version, live_rt.address, 1)
    gone_ann = Announcement(gone_rt.peer_id, 12, prepare(gone).version, gone_rt.address, 1)
    gone_rt.close()
    fallback = DonorChoice(12, live_ann.version, [live_ann], [])
    choice = DonorChoice(12, gone_ann.version, [gone_ann], [], fallbacks=(fallback,))
    result = joiner.run(download(joiner, choice, CFG), timeout_s=60)
    _assert_same(result.snapshot, live)
    with pytest.raises(PeerUnavailable, match="no announced snapshot could be downloaded"):
        joiner.run(download(joiner, replace(choice, fallbacks=()), CFG), timeout_s=60)


class _StallingService(StateService):
    """Sends two chunks of each Fetch, then stalls far past the joiner's piece deadline."""

    async def Fetch(self, request, context):
        sent = 0
        async for frame in super().Fetch(request, context):
            if sent == 2:
                await asyncio.sleep(60)
            sent += 1
            yield frame


def test_a_stalled_donor_is_dropped_after_the_piece_deadline(runtimes):
    snap = _snapshot()
    served = prepare(snap, chunk_bytes=16 * 1024)
    slow, good, joiner = runtimes(3)
    slow.add_servicer(state_pb2_grpc.add_StateServicer_to_server, _StallingService(lambda: served))
    StateServer(good, lambda: served)
    config = SyncConfig(piece_bytes=64 * 1024, piece_timeout_s=1.0, total_timeout_s=30)
    start = time.monotonic()
    result = joiner.run(download(joiner, _choice([slow, good], served), config), timeout_s=30)
    _assert_same(result.snapshot, snap)
    assert result.failed_donors == [slow.peer_id.short()]
    assert time.monotonic() - start < 20
