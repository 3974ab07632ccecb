from shoal.dht.config import RecordLimits
from shoal.dht.ids import location_of
from shoal.dht.record import Rejection, sign_record
from shoal.dht.storage import RecordStore
from shoal.net.identity import Identity

NOW = 1_800_000_000.0
A = Identity.from_seed(b"a")
B = Identity.from_seed(b"b")


def test_newer_expiration_wins_per_slot_and_writers_have_separate_slots():
    store = RecordStore(RecordLimits())
    old = sign_record(A, b"k", b"old", NOW + 10)
    new = sign_record(A, b"k", b"new", NOW + 20)
    assert store.put(new, NOW) is None
    assert store.put(old, NOW) is Rejection.STALE
    assert [r.value for r in store.get(location_of(b"k"), NOW)] == [b"new"]
    assert store.put(sign_record(B, b"k", b"b's", NOW + 5), NOW) is None
    assert sorted(r.value for r in store.get(location_of(b"k"), NOW)) == [b"b's", b"new"]
    assert len(store) == 2


def test_identical_restore_is_accepted_and_refreshes_republish_time():
    store = RecordStore(RecordLimits())
    rec = sign_record(A, b"k", b"v", NOW + 1000)
    assert store.put(rec, NOW) is None
    assert store.due_for_republish(NOW + 100, 100) == [rec]
    assert store.due_for_republish(NOW + 150, 100) == []  # marked at NOW + 100
    assert store.put(rec, NOW + 190) is None  # someone else republished it
    assert store.due_for_republish(NOW + 250, 100) == []
    assert store.due_for_republish(NOW + 290, 100) == [rec]


def test_expire_drops_only_expired():
    store = RecordStore(RecordLimits())
    store.put(sign_record(A, b"a", b"1", NOW + 10), NOW)
    store.put(sign_record(A, b"b", b"2", NOW + 30), NOW)
    assert store.expire(NOW + 20) == 1
    assert store.get(location_of(b"a"), NOW + 20) == []
    assert len(store) == 1 and store.bytes_used > 0


def test_full_store_evicts_soonest_expiring_first():
    store = RecordStore(RecordLimits(max_records=3))
    for i, ttl in enumerate((50, 10, 30)):
        assert store.put(sign_record(A, b"k%d" % i, b"v", NOW + ttl), NOW) is None
    assert store.put(sign_record(A, b"new", b"v", NOW + 40), NOW) is None
    kept = sorted(r.key for r in store.records())
    assert kept == [b"k0", b"k2", b"new"]  # k1 (ttl 10) went first
    # A newcomer that expires before everything stored is refused, nothing is evicted.
    assert store.put(sign_record(A, b"short", b"v", NOW + 5), NOW) is Rejection.STORAGE_FULL
    assert len(store) == 3


def test_byte_budget_is_enforced():
    limits = RecordLimits(max_bytes=1000, max_value_bytes=400)
    store = RecordStore(limits)
    for i in range(5):
        store.put(sign_record(A, b"k%d" % i, b"x" * 300, NOW + 100 + i), NOW)
    assert store.bytes_used <= 1000
    assert {r.key for r in store.records()} == {b"k3", b"k4"}


def test_invalid_records_never_enter():
    store = RecordStore(RecordLimits())
    rec = sign_record(A, b"k", b"v", NOW + 10)
    assert store.put(rec, NOW + 11) is Rejection.EXPIRED
    assert store.put(sign_record(A, b"k", b"v", NOW + 10, subkey=B.peer_id.raw), NOW) is (
        Rejection.NOT_SUBKEY_OWNER
    )
    assert len(store) == 0


def test_discard_removes_only_that_record():
    store = RecordStore(RecordLimits())
    rec = sign_record(A, b"k", b"v", NOW + 10)
    store.put(rec, NOW)
    assert not store.discard(sign_record(A, b"k", b"other", NOW + 10))
    assert store.discard(rec) and len(store) == 0 and store.bytes_used == 0
    assert store.expire(NOW + 20) == 0  # the stale heap item is skipped
