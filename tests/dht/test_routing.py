import random

from shoal.dht.ids import Contact, bucket_index
from shoal.dht.routing import RoutingTable
from shoal.net.identity import Identity


def _contacts(n: int, tag: str = "c") -> list[Contact]:
    return [Contact(Identity.from_seed(f"{tag}{i}".encode()).peer_id, f"h:{i}") for i in range(n)]


def _table(k: int = 3, repl: int = 2, fails: int = 2) -> RoutingTable:
    own = Contact(Identity.from_seed(b"own").peer_id, "own:1")
    return RoutingTable(own.node_id, k=k, replacement_size=repl, max_failures=fails)


def _same_bucket(table: RoutingTable, n: int) -> list[Contact]:
    """``n`` contacts that all fall into the table's farthest bucket (255)."""
    out = [c for c in _contacts(4 * n + 20) if bucket_index(table.own_id, c.node_id) == 255]
    assert len(out) >= n
    return out[:n]


def test_full_bucket_asks_to_ping_least_recently_seen_and_keeps_it_if_alive():
    t = _table(k=3)
    a, b, c, d, e = _same_bucket(t, 5)
    for i, x in enumerate((a, b, c)):
        assert t.observe(x, now=i) is None
    assert t.observe(d, now=10) == a  # bucket full: check the oldest
    assert t.observe(e, now=11) is None  # one check per bucket at a time
    t.ping_result(a, alive=True, now=12)
    assert set(t.contacts()) == {a, b, c}
    assert t.observe(d, now=13) == b  # a moved to the tail; b is now the oldest


def test_dead_least_recently_seen_is_replaced_by_freshest_replacement():
    t = _table(k=3, repl=2)
    a, b, c, d, e, f = _same_bucket(t, 6)
    for i, x in enumerate((a, b, c)):
        t.observe(x, now=i)
    assert t.observe(d, now=10) == a
    t.observe(e, now=11)
    t.observe(f, now=12)  # cache holds 2: f, e (d fell out)
    t.ping_result(a, alive=False, now=13)
    assert set(t.contacts()) == {b, c, f}
    t.failed(b)
    assert b in t
    t.failed(b)  # second consecutive failure drops it
    assert set(t.contacts()) == {c, f, e}


def test_success_resets_failure_count():
    t = _table(fails=2)
    (a,) = _same_bucket(t, 1)
    t.observe(a, now=0)
    t.failed(a)
    t.observe(a, now=1)
    t.failed(a)
    assert a in t


def test_nearest_matches_brute_force():
    t = _table(k=20)
    everyone = _contacts(400)
    for i, c in enumerate(everyone):
        t.observe(c, now=i)
    known = t.contacts()
    rng = random.Random(5)
    for _ in range(50):
        target = rng.getrandbits(256)
        want = sorted(known, key=lambda c: c.node_id ^ target)[:7]
        assert t.nearest(target, 7) == want
    assert t.own_id not in {c.node_id for c in known}


def test_self_is_never_added_and_address_updates():
    t = _table()
    own_contact = Contact(Identity.from_seed(b"own").peer_id, "elsewhere:2")
    assert t.observe(own_contact, now=0) is None and len(t) == 0
    (a,) = _same_bucket(t, 1)
    t.observe(a, now=0)
    moved = Contact(a.peer_id, "new:9")
    t.observe(moved, now=1)
    assert t.contacts() == [moved]


def test_stale_buckets_and_refresh_ids():
    t = _table()
    (a,) = _same_bucket(t, 1)
    t.observe(a, now=0)
    assert t.stale_buckets(now=100, interval_s=200, since=0) == []
    assert t.stale_buckets(now=300, interval_s=200, since=0) == [255]
    t.touch(a.node_id, now=250)
    assert t.stale_buckets(now=300, interval_s=200, since=0) == []
    rng = random.Random(1)
    for index in (0, 7, 255):
        assert bucket_index(t.own_id, t.random_id_in_bucket(index, rng)) == index
