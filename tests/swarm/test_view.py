from shoal.net.identity import Identity
from shoal.swarm.peerinfo import PeerInfo
from shoal.swarm.view import MembershipView

TTL = 60.0
SKEW = 10.0
A = Identity.from_seed(b"a").peer_id
B = Identity.from_seed(b"b").peer_id
INFO = PeerInfo(roles=("trainer",))


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def test_silent_peer_leaves_within_two_ttls_even_with_maximal_claimed_expiry():
    clock = FakeClock()
    view = MembershipView(ttl_s=TTL, max_clock_skew_s=SKEW)
    t0 = clock.t  # A's last heartbeat, claiming the longest expiry the view accepts
    view.update([(A, INFO, t0 + TTL + SKEW), (B, INFO, t0 + TTL)], clock.t)
    gone_at = None
    while clock.t < t0 + 3 * TTL:
        # B keeps heartbeating; the same stale A record keeps being read back from the DHT.
        view.update([(B, INFO, clock.t + TTL)], clock.t)
        if clock.t < t0 + TTL + SKEW:
            view.update([(A, INFO, t0 + TTL + SKEW)], clock.t)
        live = {m.peer_id for m in view.live(clock.t)}
        assert B in live
        if A not in live and gone_at is None:
            gone_at = clock.t
        clock.advance(5.0)
    assert gone_at is not None and gone_at - t0 <= 2 * TTL


def test_far_future_and_expired_heartbeats_ignored_and_latest_wins():
    now = 5000.0
    view = MembershipView(ttl_s=TTL, max_clock_skew_s=SKEW)
    assert view.update([(A, INFO, now + TTL + SKEW + 1), (B, INFO, now - 1)], now) == 0
    assert view.live(now) == []
    view.update([(A, INFO, now + 30)], now)
    newer = PeerInfo(roles=("stage:1",))
    view.update([(A, newer, now + 50)], now + 1)
    view.update([(A, INFO, now + 40)], now + 2)  # older expiry does not replace
    (member,) = view.live(now + 3)
    assert member.info == newer and member.expires_at == now + 50
    assert view.live(now + 50) == []
