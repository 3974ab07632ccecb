"""Reachability verdicts from dial-back reports (pure, fake clock)."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError
from shoal.net.nat.reachability import (
    DialBackReport,
    Reachability,
    ReachabilityConfig,
    assess,
)

LOCAL = ("198.19.0.2", 40001)
WAN = ("198.18.0.4", 40001)


def report(
    helper: str, ok: bool | None, *, at: float = 100.0, observed=WAN, local=LOCAL
) -> DialBackReport:
    return DialBackReport(helper=helper, at_s=at, observed=observed, local=local, dial_back_ok=ok)


def test_public_with_no_nat() -> None:
    me = ("198.18.0.1", 31337)
    verdict = assess([report(h, True, observed=me, local=me) for h in "ab"], now_s=100.0)
    assert verdict.status is Reachability.PUBLIC
    assert verdict.public_addresses == (me,)
    assert verdict.mapping == "none"


def test_private_behind_a_cone_nat() -> None:
    verdict = assess([report(h, False) for h in "abc"], now_s=100.0)
    assert verdict.status is Reachability.PRIVATE
    assert (verdict.reached, verdict.unreached) == (0, 3)
    assert verdict.public_addresses == (WAN,)
    assert verdict.mapping == "cone"


def test_symmetric_mapping_is_detected() -> None:
    reports = [
        report("a", False, observed=("198.18.0.6", 5000)),
        report("b", False, observed=("198.18.0.6", 6123)),
    ]
    verdict = assess(reports, now_s=100.0)
    assert verdict.mapping == "symmetric"
    assert verdict.public_addresses == ()  # no address has two votes


def test_one_helper_has_one_vote() -> None:
    verdict = assess([report("a", True, at=90.0 + i) for i in range(10)], now_s=100.0)
    assert verdict.status is Reachability.UNKNOWN
    assert verdict.reached == 1


def test_newest_report_per_helper_wins() -> None:
    reports = [report("a", True, at=50.0), report("a", False, at=60.0), report("b", False)]
    assert assess(reports, now_s=100.0).status is Reachability.PRIVATE


def test_stale_future_and_undecided_reports_do_not_vote() -> None:
    cfg = ReachabilityConfig(max_age_s=30.0)
    reports = [
        report("a", True, at=10.0),
        report("b", True, at=200.0),
        report("c", None),
        report("d", True),
    ]
    verdict = assess(reports, now_s=100.0, config=cfg)
    assert (verdict.reached, verdict.unreached) == (1, 0)
    assert verdict.status is Reachability.UNKNOWN


def test_a_lying_helper_is_outvoted() -> None:
    reports = [report("liar", True), *(report(h, False) for h in "abc")]
    assert assess(reports, now_s=100.0).status is Reachability.PRIVATE
    split = [report("a", True), report("b", True), report("c", False), report("d", False)]
    assert assess(split, now_s=100.0).status is Reachability.PUBLIC  # reached by some: reachable


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"min_votes": 0}, "min_votes"), ({"max_age_s": 0}, "max_age_s")]
)
def test_config_is_checked(kwargs, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ReachabilityConfig(**kwargs)
