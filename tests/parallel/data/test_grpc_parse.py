"""The Averaging service's message parser under malformed input: ProtocolViolation or a
well-formed message, nothing else."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ProtocolViolation
from shoal.net.identity import Identity
from shoal.net.proto.v1 import averaging_pb2 as pb
from shoal.parallel.data.messages import Contribution, Leave, Reduced, Report
from shoal.parallel.data.wire import encode_message, message_frames, parse

SENDER = Identity.generate().peer_id
OTHER = Identity.generate().peer_id

_tensors = st.lists(
    st.tuples(
        st.sampled_from([torch.float32, torch.float16, torch.int8, torch.int32, torch.int64]),
        st.integers(0, 40),
    ).map(lambda t: torch.zeros(t[1], dtype=t[0])),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    round_id=st.binary(max_size=80),
    kind=st.integers(0, 5),
    part=st.integers(0, 2**32 - 1),
    weight=st.floats(allow_nan=True, allow_infinity=True),
    peers=st.lists(st.binary(max_size=40), max_size=4),
    codec=st.sampled_from(["none", "fp16", "int8", "int4", "sparse", "zstd", ""]),
    numel=st.integers(0, 2**64 - 1),
    block_size=st.integers(0, 2**32 - 1),
    tensors=_tensors,
)
def test_parse_never_fails_otherwise(
    round_id, kind, part, weight, peers, codec, numel, block_size, tensors
):
    meta = pb.RoundMessage(
        round_id=round_id,
        kind=kind,
        part=part,
        weight=weight,
        peers=peers,
        codec=codec,
        numel=numel,
        block_size=block_size,
        payload_tensors=len(tensors),
    )
    try:
        message = parse(meta, SENDER, tensors)
    except ProtocolViolation:
        return
    assert message.sender == SENDER
    assert isinstance(message, Contribution | Report | Reduced | Leave)
    if isinstance(message, Leave):
        assert not tensors and not peers
    elif not isinstance(message, Report):
        data = message.data
        assert data.numel == numel if hasattr(data, "codec") else data.numel() == numel


@pytest.mark.parametrize("codec", ["none", "fp16", "int8", "int4", "sparse"])
def test_frames_round_trip_through_parse(codec):
    from shoal.compress.registry import codec_by_name
    from shoal.net.tensors import as_tensor, decode_frame, encode_frame

    part = torch.randn(5000)
    if codec == "sparse":  # mostly zeros: the (position, value) layout
        part[torch.arange(5000) % 7 != 0] = 0.0
    c = codec_by_name(codec)
    data = part if c is None else c.encode(part)
    message = Reduced(b"r", SENDER, 3, frozenset({SENDER, OTHER}), 7.0, data)
    # What the receiver sees: the frames as serialized for the wire, parsed back.
    frames = [decode_frame(encode_frame(f)) for f in message_frames(message)]
    meta = pb.RoundMessage()
    assert frames[0].meta.Unpack(meta)
    headers = [f.header for f in frames[1:] if not hasattr(f, "data")]
    chunks = [bytes(f.data) for f in frames[1:] if hasattr(f, "data")]
    blob = b"".join(chunks)
    tensors, pos = [], 0
    for h in headers:
        tensors.append(as_tensor(h, bytearray(blob[pos : pos + h.byte_length])))
        pos += h.byte_length
    back = parse(meta, SENDER, tensors)
    assert isinstance(back, Reduced) and back.part == 3 and back.weight == 7.0
    assert back.contributors == frozenset({SENDER, OTHER})
    decoded = back.data if c is None else c.decode(back.data)
    expect = part if c is None else c.decode(data)
    assert torch.equal(decoded.reshape(-1), expect.reshape(-1))


def test_tags_travel_with_contributions_and_reduced_parts():
    from shoal.net.tensors import as_tensor

    part = torch.randn(10)
    for message in (
        Contribution(b"r", SENDER, 1, 2.0, part, b"\x07" * 64),
        Reduced(b"r", SENDER, 1, frozenset({SENDER, OTHER}), 2.0, part, {OTHER: b"g"}),
    ):
        wire = encode_message(message)
        meta = pb.RoundMessage()
        assert wire.meta.meta.Unpack(meta)
        back = parse(meta, SENDER, [as_tensor(h, bytearray(v)) for h, v in wire.tensors])
        assert torch.equal(back.data, part)
        assert back == replace(message, data=back.data)


@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda m: setattr(m, "tag", b"x" * 65), "too long"),
        (lambda m: m.tagged.add(peer_id=OTHER.raw, tag=b"g"), "tags others"),
    ],
)
def test_a_contribution_with_a_bad_tag_is_refused(edit, why):
    meta = pb.RoundMessage(
        round_id=b"r", kind=pb.CONTRIBUTION, codec="none", numel=1, payload_tensors=1
    )
    edit(meta)
    with pytest.raises(ProtocolViolation, match=why):
        parse(meta, SENDER, [torch.zeros(1)])


@pytest.mark.parametrize(
    "tagged,own_tag,why",
    [
        ([(OTHER, b"g")], b"", "not among the contributors"),
        ([(SENDER, b"g"), (SENDER, b"h")], b"", "more tags than contributors"),
        ([(SENDER, b"")], b"", "tag of 0 bytes"),
        ([(SENDER, b"g" * 65)], b"", "tag of 65 bytes"),
        ([], b"g", "no tag of its own"),
    ],
)
def test_a_reduced_part_with_bad_tags_is_refused(tagged, own_tag, why):
    meta = pb.RoundMessage(
        round_id=b"r",
        kind=pb.REDUCED,
        codec="none",
        numel=1,
        payload_tensors=1,
        peers=[SENDER.raw],
        tag=own_tag,
    )
    for peer, tag in tagged:
        meta.tagged.add(peer_id=peer.raw, tag=tag)
    with pytest.raises(ProtocolViolation, match=why):
        parse(meta, SENDER, [torch.zeros(1)])


@pytest.mark.parametrize("kind", [pb.REPORT, pb.LEAVE])
def test_reports_and_leaves_carry_no_tags(kind):
    meta = pb.RoundMessage(round_id=b"r", kind=kind, tag=b"g")
    with pytest.raises(ProtocolViolation, match="carry tags"):
        parse(meta, SENDER, [])


def test_sparse_parts_are_checked_before_they_are_decoded():
    meta = pb.RoundMessage(
        round_id=b"r", kind=pb.CONTRIBUTION, codec="sparse", numel=10, payload_tensors=2
    )
    values = torch.tensor([1.0, 2.0])
    for indices, why in (([4, 4], "strictly increasing"), ([3, 10], "outside")):
        with pytest.raises(ProtocolViolation, match=why):
            parse(meta, SENDER, [torch.tensor(indices, dtype=torch.int32), values])
    with pytest.raises(ProtocolViolation, match="10 float32"):
        parse(meta, SENDER, [torch.zeros(9)])  # the dense layout holds every value
    good = parse(meta, SENDER, [torch.tensor([0, 9], dtype=torch.int32), values])
    assert good.data.payload[0].tolist() == [0, 9]


def test_a_leave_round_trips_and_carries_nothing_else():
    (frame,) = list(message_frames(Leave(b"r", OTHER, 2)))  # one meta frame, no tensor
    meta = pb.RoundMessage()
    assert frame.meta.Unpack(meta)
    back = parse(meta, SENDER, [])
    assert back == Leave(b"r", SENDER, 2)  # the sender is the caller, not the payload's
    with pytest.raises(ProtocolViolation, match="nothing but its part"):
        parse(meta, SENDER, [torch.zeros(4)])
    meta.peers.append(OTHER.raw)
    with pytest.raises(ProtocolViolation, match="nothing but its part"):
        parse(meta, SENDER, [])


def _frames_strategy():
    from shoal.net.proto.v1 import tensor_pb2
    from shoal.net.tensors import Chunk

    header = st.builds(
        tensor_pb2.TensorHeader,
        dtype=st.integers(0, 12),
        shape=st.lists(st.integers(0, 2**40), max_size=10),
        codec=st.sampled_from(["raw", "int8", ""]),
        byte_length=st.integers(0, 2**41),
        checksum_kind=st.integers(0, 2),
        checksum=st.integers(0, 2**64 - 1),
    )
    frame = st.one_of(
        header.map(lambda h: tensor_pb2.TensorFrame(header=h)),
        st.binary(max_size=64).map(lambda b: tensor_pb2.TensorFrame(chunk=b)),
        st.binary(max_size=64).map(lambda b: Chunk(memoryview(b))),
    )
    return st.lists(frame, max_size=6)


@settings(max_examples=300, deadline=None)
@given(frames=_frames_strategy())
def test_stream_reader_never_fails_otherwise(frames):
    import asyncio

    from shoal.net.config import TensorLimits
    from shoal.parallel.data.buffers import BufferPool
    from shoal.parallel.data.receive import read_tensor_into_pool

    async def source():
        for f in frames:
            yield f

    async def main():
        return await read_tensor_into_pool(
            source().__aiter__(), TensorLimits(max_bytes=1 << 20), BufferPool().take
        )

    try:
        tensor = asyncio.run(main())
    except ProtocolViolation:
        return
    assert isinstance(tensor, torch.Tensor)


def test_stream_reader_accepts_a_real_stream_and_rejects_a_corrupted_one():
    import asyncio

    from shoal.net.config import TensorLimits
    from shoal.net.tensors import Chunk, tensor_frames
    from shoal.parallel.data.buffers import BufferPool
    from shoal.parallel.data.receive import read_tensor_into_pool

    part = torch.randn(300_000)
    frames = list(tensor_frames(part))

    async def read(fs):
        async def source():
            for f in fs:
                yield f

        return await read_tensor_into_pool(source().__aiter__(), TensorLimits(), BufferPool().take)

    assert torch.equal(asyncio.run(read(frames)), part)
    bad = bytearray(frames[1].data)
    bad[0] ^= 1
    corrupted = [frames[0], Chunk(memoryview(bytes(bad))), *frames[2:]]
    with pytest.raises(ProtocolViolation, match="checksum"):
        asyncio.run(read(corrupted))


def test_a_result_is_serialized_once_for_all_members():
    from shoal.net.config import MiB
    from shoal.net.tensors import decode_frame, encode_frame

    part = torch.randn(3 * MiB // 4 + 10)  # 3 MiB and a bit: four chunks
    wire = encode_message(Reduced(b"r", SENDER, 0, frozenset({SENDER}), 1.0, part))
    a, b = wire.frames(), wire.frames()
    first, second = [], []
    for x, y in zip(a, b, strict=True):  # two streams advancing together
        first.append(x)
        second.append(y)
    assert len(first) == 6  # meta, header, four chunks
    assert all(x is y for x, y in zip(first[2:], second[2:], strict=True))
    chunks = [bytes(decode_frame(encode_frame(f)).data) for f in first[2:]]
    assert [len(c) for c in chunks] == [MiB, MiB, MiB, part.numel() * 4 - 3 * MiB]
    blob = b"".join(chunks)
    assert blob == part.numpy().tobytes()
    contribution = encode_message(Contribution(b"r", SENDER, 0, 1.0, part))
    assert not any(isinstance(f, bytes) for f in contribution.frames())


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_a_huge_block_size_is_refused_before_any_decoding(codec):
    """Two values with one scale but a block of 2**21 would make a decoder work (and
    allocate) for the whole block."""
    from shoal.errors import ProtocolViolation
    from shoal.parallel.data.wire import MAX_BLOCK_SIZE

    q = torch.zeros(
        2 if codec == "int8" else 1, dtype=torch.int8 if codec == "int8" else torch.uint8
    )
    meta = pb.RoundMessage(
        round_id=b"r", kind=pb.CONTRIBUTION, codec=codec, numel=2, block_size=2 * MAX_BLOCK_SIZE
    )
    with pytest.raises(ProtocolViolation, match="block size"):
        parse(meta, SENDER, [q, torch.ones(1)])
    meta.block_size = 256
    assert parse(meta, SENDER, [q, torch.ones(1)]).data.meta["block_size"] == 256


def test_admission_bounds_round_ids_and_parts_before_the_inbox_keeps_anything():
    from shoal.parallel.data.buffers import BufferPool
    from shoal.parallel.data.transport import Inbox
    from shoal.parallel.data.wire import MAX_GROUP_SIZE, Admission

    sender = Identity.generate().peer_id
    inbox = Inbox(max_pending_bytes=1 << 20)
    pool = BufferPool()
    # Any peer could make the inbox remember a 3 MiB round id, or one more part per stream.
    for meta, why in (
        (pb.RoundMessage(round_id=b"x" * (3 << 20), kind=pb.REPORT), "round id of"),
        (pb.RoundMessage(round_id=b"r", kind=pb.REPORT, part=MAX_GROUP_SIZE), "part 256"),
    ):
        with pytest.raises(ProtocolViolation, match=why):
            Admission(inbox, pool, sender).allocator(meta)
    assert not inbox._began
    # A round open with its members only (sizes not known yet): its bytes count against
    # the pending bound, as a round not open at all, instead of 4 x any numel claimed.
    inbox.open(b"g", [sender])
    take = Admission(inbox, pool, sender).allocator(
        pb.RoundMessage(round_id=b"g", kind=pb.CONTRIBUTION, part=0, numel=1 << 40)
    )
    take(1 << 17)
    with pytest.raises(ProtocolViolation, match="rounds not started here"):
        take(1 << 20)


def _stalling(frames, after):
    """The first ``after`` of ``frames``, then nothing (a sender that stopped sending)."""
    import asyncio

    async def source():
        for f in frames[:after]:
            yield f
        await asyncio.Event().wait()

    return source().__aiter__()


def _receiving(inbox, frames, *, idle_s):
    from shoal.net.config import TensorLimits
    from shoal.parallel.data.buffers import BufferPool
    from shoal.parallel.data.wire import Admission, receive_message

    async def receive():
        admission = Admission(inbox, BufferPool(), SENDER)
        try:
            return await receive_message(frames, SENDER, TensorLimits(), admission, idle_s=idle_s)
        finally:
            admission.release()

    return receive()


def test_a_sender_stalling_mid_message_gives_up_its_buffer_and_reservation():
    # Nothing ended such a stream on the receiving side: one peer could reserve the pending
    # bound, or leave a buffer per part and round, for as long as it liked.
    import asyncio

    from shoal.errors import PeerTimeout
    from shoal.parallel.data.transport import Inbox

    part = Contribution(b"not-yet", SENDER, 0, 1.0, torch.randn(600_000))  # 3 chunks
    frames = list(message_frames(part))
    inbox = Inbox()

    async def main():
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(PeerTimeout, match=r"no frame of a round message for 0\.2 s"):
            await _receiving(inbox, _stalling(frames, 3), idle_s=0.2)
        return loop.time() - start

    took = asyncio.run(main())
    assert took < 5.0
    assert inbox._reserved == 0 and not inbox._reserved_by and not inbox._receiving


def test_a_message_whose_round_closes_while_it_arrives_is_given_up_at_once():
    import asyncio

    from shoal.parallel.data.transport import Inbox

    part = Contribution(b"r", SENDER, 0, 1.0, torch.randn(600_000))
    frames = list(message_frames(part))
    inbox = Inbox()
    inbox.open(b"r", [SENDER], [600_000])

    async def main():
        task = asyncio.ensure_future(_receiving(inbox, _stalling(frames, 2), idle_s=3600.0))
        for _ in range(1000):  # a few loop turns: the meta frame is read, the part marked
            if inbox._receiving:
                break
            await asyncio.sleep(0)
        inbox.close(b"r")  # the round ended here (its deadline, or it failed)
        with pytest.raises(ProtocolViolation, match="the round is over here"):
            await asyncio.wait_for(task, 5.0)

    asyncio.run(main())
    assert not inbox._receiving and not inbox._watchers


def test_a_corrupt_meta_frame_is_a_protocol_violation():
    import asyncio

    from shoal.parallel.data.transport import Inbox

    meta = next(iter(message_frames(Report(b"r", SENDER, 0, frozenset({SENDER}), {}))))
    meta.meta.value = b"\xff\xff\xff"  # not a RoundMessage

    async def main():
        async def source():
            yield meta

        return await _receiving(Inbox(), source().__aiter__(), idle_s=1.0)

    with pytest.raises(ProtocolViolation, match="malformed round message meta"):
        asyncio.run(main())


def test_a_deliver_stream_must_end_after_its_message():
    # Deliver read the announced tensors and acknowledged the stream, whatever followed.
    import asyncio

    from shoal.parallel.data.grpc_transport import _end_of

    def stream(frames):
        async def source():
            for f in frames:
                yield f

        return source().__aiter__()

    extra = list(message_frames(Report(b"r", SENDER, 0, frozenset({SENDER}), {})))
    assert asyncio.run(_end_of(stream([]))) is None
    with pytest.raises(ProtocolViolation, match="frames after the round message"):
        asyncio.run(_end_of(stream(extra)))
