"""The receive-buffer pool: reuse by size, never a buffer in use, bounded, not stuck."""

from __future__ import annotations

from shoal.parallel.data.buffers import BufferPool

MiB = 1 << 20


def test_an_idle_buffer_is_reused_and_a_held_one_never_is():
    pool = BufferPool(max_bytes=4 * MiB, min_pooled_bytes=1)
    held = pool.take(MiB)
    other = pool.take(MiB)
    assert other is not held  # held is still referenced here
    del other
    again = pool.take(MiB)
    assert again is not held and pool.reused == 1


def test_new_sizes_evict_idle_old_ones_instead_of_never_pooling_again():
    # Part sizes move with members and shares: 60 rounds of new sizes used to fill the
    # pool with sizes nobody asked for again, after which nothing was pooled or reused.
    pool = BufferPool(max_bytes=3 * MiB, min_pooled_bytes=1)
    held = pool.take(MiB)  # in use throughout: must survive every eviction
    for i in range(60):
        size = MiB + 64 * i
        pool.take(size)  # released at once
        assert pool.take(size) is not None and pool.pooled_bytes <= pool.max_bytes
    assert pool.reused == 60  # every round's second take found the first one's buffer
    assert len(pool._buffers) <= 3  # sizes without a pooled buffer are not kept
    assert any(held is b for b in pool._buffers[MiB])
    assert pool.take(MiB) is not held


def test_a_buffer_larger_than_the_pool_is_handed_out_unpooled_and_evicts_nothing():
    pool = BufferPool(max_bytes=MiB, min_pooled_bytes=1)
    pool.take(MiB // 2)
    assert len(pool.take(2 * MiB)) == 2 * MiB
    assert pool.pooled_bytes == MiB // 2 and list(pool._buffers) == [MiB // 2]
