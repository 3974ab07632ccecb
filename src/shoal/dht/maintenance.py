"""Background upkeep of a node: expiry, republishing and bucket refresh.

Every ``maintenance_period_s`` (first wake at a random offset, so simulated nodes spread
out) the node:

1. drops expired records;
2. re-publishes records it *wrote* whose last publication is ``republish_interval_s`` old
   (writer republishing: data survives the loss of every original holder);
3. re-publishes records it *holds* that nobody re-stored to it within the interval
   (holder republishing, Kademlia's rule: one holder's republish refreshes the others,
   who then skip theirs, so a record costs about one republish per interval); a holder
   that is no longer among the k closest live nodes hands the record over and drops it,
   so churn does not grow the set of holders (and their republishing) without bound;
4. refreshes buckets with no lookup for ``refresh_interval_s`` (a lookup of a random ID in
   the bucket; at most ``_MAX_REFRESH_PER_ROUND`` per round to bound the work);
5. every ``rejoin_interval_s``, re-joins through its bootstrap addresses: contacts that
   failed during a partition were dropped from the table and nothing else would re-learn
   them, so without this the two sides of a healed partition stay strangers.

Between rounds, every ``seed_check_s``, a node whose bootstrap peers are missing from its
table pings the bootstrap addresses again: a seed peer that restarted (it joined through
nobody, so its table is empty) is otherwise cut off until the next re-join, and every peer
that knows it only through the seed with it. A seed that stays missing (gone for good,
left out of a full bucket, or not up yet) is pinged half as often after each check that did
not bring it back, down to once per ``rejoin_interval_s`` (or 5 minutes); once none is
missing, checks start over at ``seed_check_s``.

Failures of one step are logged by the task owner and never stop the loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.dht.node import DHTNode

__all__ = ["maintain", "maintenance_round"]

_log = logging.getLogger(__name__)
_MAX_REFRESH_PER_ROUND = 2


async def maintain(node: DHTNode) -> None:
    """Run maintenance rounds, and seed checks between them, until cancelled."""
    cfg = node.config
    loop = asyncio.get_running_loop()
    period, check = cfg.maintenance_period_s, cfg.seed_check_s
    tick = min(period, check) if check > 0 else period
    next_round = loop.time() + node.rng.uniform(0, period)
    # A seed that stays missing is checked ever less often, down to the re-join's pace.
    seed_wait_s, slowest_s = check, max(check, cfg.rejoin_interval_s or 300.0)
    while True:
        await asyncio.sleep(max(0.0, min(next_round, loop.time() + tick) - loop.time()))
        try:
            now = loop.time()
            if now >= next_round:
                next_round = now + period * node.rng.uniform(0.9, 1.1)
                await maintenance_round(node)
            elif check > 0 and not node.seeds_missing():
                seed_wait_s = check
            elif check > 0 and now - node.joined_at >= seed_wait_s:
                await node.rejoin(lookup=False)
                seed_wait_s = min(2.0 * seed_wait_s, slowest_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("dht maintenance round failed")


async def maintenance_round(node: DHTNode) -> None:
    cfg = node.config
    loop = asyncio.get_running_loop()
    now_wall = node.wall_clock()
    now = loop.time()
    node.storage.expire(now_wall)
    interval = cfg.republish_interval_s
    for slot, (record, published_at) in list(node.published.items()):
        if record.expires_at <= now_wall:
            del node.published[slot]
        elif published_at <= now - interval:
            node.published[slot] = (record, now)
            await node.publish(record)
    for record in node.storage.due_for_republish(now_wall, interval):
        await node.republish_held(record)
    for index in node.table.stale_buckets(now, cfg.refresh_interval_s, node.started_at)[
        :_MAX_REFRESH_PER_ROUND
    ]:
        await node.lookup(node.table.random_id_in_bucket(index, node.rng))
    if cfg.rejoin_interval_s > 0 and node.seeds and now - node.joined_at >= cfg.rejoin_interval_s:
        await node.rejoin()
