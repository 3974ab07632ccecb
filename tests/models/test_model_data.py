import pytest
import torch

from shoal.errors import ConfigError, DataError
from shoal.models.data import TrainWindows, is_validation, load_corpus, shard_bounds, val_batches


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_stdlib_corpus_is_split_by_path_hash(corpus):
    assert corpus.source == "stdlib"
    assert corpus.train.numel() > 1_000_000
    assert 0.002 < corpus.val.numel() / corpus.train.numel() < 0.05
    again = load_corpus()
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)


def test_path_hash_split_is_stable_and_roughly_proportional():
    paths = [f"pkg/mod{i}.py" for i in range(4000)]
    picked = [p for p in paths if is_validation(p, 0.02)]
    assert 40 <= len(picked) <= 120
    assert picked == [p for p in paths if is_validation(p, 0.02)]


def test_windows_are_shifted_by_one_and_seeded(corpus):
    a = TrainWindows(corpus.train, seq_len=32, batch_size=4, seed=5)
    b = TrainWindows(corpus.train, seq_len=32, batch_size=4, seed=5)
    torch.rand(10)  # global RNG must not matter
    xa, ya = a.next_batch()
    xb, yb = b.next_batch()
    assert xa.shape == ya.shape == (4, 32) and xa.dtype == torch.long
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])


def test_state_round_trip_resumes_the_stream_exactly(corpus):
    a = TrainWindows(corpus.train, seq_len=16, batch_size=2, seed=1)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = TrainWindows(corpus.train, seq_len=16, batch_size=2, seed=99)
    b.load_state_dict(state)
    for (x, y), (ex, ey) in zip([b.next_batch() for _ in range(3)], expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert b.batches_drawn == a.batches_drawn == 4


def test_shards_are_disjoint_byte_ranges():
    data = torch.zeros(1000, dtype=torch.uint8)
    seen: list[set[int]] = []
    for i in range(3):
        lo, hi = shard_bounds(1000, i, 3)
        w = TrainWindows(data, seq_len=8, batch_size=64, seed=0, shard_index=i, num_shards=3)
        starts: set[int] = set()
        for _ in range(20):
            gen_state = w.generator.get_state()
            w.next_batch()
            g = torch.Generator()
            g.set_state(gen_state)
            s = torch.randint(w.lo, w.hi - 8, (64,), generator=g)
            starts.update(int(v) for v in s)
        assert all(lo <= s and s + 9 <= hi for s in starts)
        seen.append({b for s in starts for b in range(s, s + 9)})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_different_shards_draw_different_batches(corpus):
    a = TrainWindows(corpus.train, seq_len=16, batch_size=4, seed=0, shard_index=0, num_shards=2)
    b = TrainWindows(corpus.train, seq_len=16, batch_size=4, seed=0, shard_index=1, num_shards=2)
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_bad_shard_index():
    with pytest.raises(ConfigError, match="shard_index"):
        shard_bounds(100, 2, 2)


def test_val_batches_are_fixed_and_non_overlapping(corpus):
    a = val_batches(corpus.val, seq_len=64, batch_size=8, max_batches=3)
    b = val_batches(corpus.val, seq_len=64, batch_size=8, max_batches=3)
    assert len(a) == 3
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))


def test_user_directory(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text("hello world " * 50 + str(i))
    (tmp_path / "ignored.bin").write_bytes(b"\x00" * 100)
    c = load_corpus(tmp_path)
    assert c.num_files == 5
    assert c.train.numel() > 0 and c.val.numel() > 0
    total = sum(len((tmp_path / f"f{i}.txt").read_bytes()) + 1 for i in range(5))
    assert c.train.numel() + c.val.numel() == total


def test_missing_data_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope")


def test_empty_data_dir_is_a_data_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty text files"):
        load_corpus(tmp_path)


def test_too_little_data_for_a_window(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    c = load_corpus(tmp_path)
    with pytest.raises(DataError, match="fewer than seq_len"):
        TrainWindows(c.train, seq_len=64, batch_size=1, seed=0)
