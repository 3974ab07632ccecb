import asyncio
import json
import re

from shoal.monitor.config import DashboardConfig
from shoal.monitor.dashboard import Dashboard
from shoal.monitor.http import STATIC_DIR

from .fakes import NOW, FakeClock, FakeSource, peer_id, swarm_events, swarm_history


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_state_endpoint_static_files_and_errors():
    async def main() -> None:
        config = DashboardConfig(port=0, poll_interval_s=60.0, request_timeout_s=0.5)
        source = FakeSource(swarm_history(), swarm_events())
        async with Dashboard(source, config, wall_clock=FakeClock(NOW + 1)) as dash:
            await dash.wait_first_poll(5)
            port = int(dash.url.rsplit(":", 1)[1].strip("/"))
            assert dash.url.startswith("http://127.0.0.1:")

            status, headers, body = await request(port, get("/api/state"))
            assert status == 200 and headers["Content-Type"] == "application/json"
            state = json.loads(body)
            assert state["swarm"]["peers"] == 6 and state["swarm"]["step"] == 300
            assert {a["kind"] for a in state["alerts"]} == {
                "bottleneck",
                "straggler",
                "low_bandwidth",
            }
            assert len(state["series"]["loss"][peer_id(0)]) == 30
            assert [e["kind"] for e in state["events"]] == [
                "checkpoint",
                "retry",
                "failure",
                "join",
            ]

            status, headers, body = await request(port, get("/"))
            assert status == 200 and b"dashboard.js" in body
            assert headers["Content-Type"].startswith("text/html")
            status, headers, _ = await request(port, get("/static/dashboard.js"))
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            status, headers, body = await request(port, b"HEAD / HTTP/1.1\r\n\r\n")
            assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

            for path in ("/static/../peer.py", "/static/%2e%2e/peer.py", "/nope", "/static/"):
                assert (await request(port, get(path)))[0] == 404
            assert (await request(port, b"POST /api/state HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await request(port, b"garbage\r\n\r\n"))[0] == 400
            assert (await request(port, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000))[0] == 400
            # A client that never finishes its request is cut off at the deadline.
            assert (await request(port, b"GET / HTTP/1.1\r\n"))[0] == 400
        await dash.aclose()

    asyncio.run(main())


def test_dashboard_marks_peers_stale_as_time_passes():
    async def main() -> None:
        clock = FakeClock(NOW + 1)
        dash = Dashboard(FakeSource(swarm_history()), DashboardConfig(port=0), wall_clock=clock)
        await dash.poll_once()
        assert len(dash.view.peers) == 6
        clock.advance(3600)
        await dash.poll_once()
        assert dash.view.peers == () and len(dash.view.stale) == 6
        state = dash.state()
        assert all(p["stale"] for p in state["peers"])
        assert state["alerts"] == []
        await dash.aclose()

    asyncio.run(main())


def test_history_is_bounded_and_keeps_the_newest_points():
    from shoal.monitor.history import History
    from shoal.monitor.summary import PeerSummary

    history = History(max_points=16, max_peers=2)
    history.add(
        PeerSummary(peer=f"sh{p}", t=float(t), step=t, loss=1.0 / (t + 1))
        for t in range(100)
        for p in range(3)
    )
    assert sorted(history.loss) == ["sh0", "sh1"]  # a third peer gets no series
    points = history.loss["sh0"].points
    assert len(points) <= 16 and points[-1][1] == 99 and points[0][1] == 0
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    history.add([PeerSummary(peer="sh0", t=200.0, step=99, loss=0.5)])  # same step: no point
    assert history.loss["sh0"].points[-1][0] == 99.0


def test_dashboard_forgets_the_longest_silent_peers_beyond_its_bound():
    async def main() -> None:
        from shoal.monitor.summary import PeerSummary

        summaries = [PeerSummary(peer=peer_id(i), t=NOW - 100 + i) for i in range(10)]
        config = DashboardConfig(port=0, max_peers=4)
        dash = Dashboard(FakeSource(summaries), config, wall_clock=FakeClock(NOW))
        await dash.poll_once()
        remembered = [s.peer for s in dash.view.peers + dash.view.stale]
        assert sorted(remembered) == [peer_id(i) for i in range(6, 10)]
        await dash.aclose()

    asyncio.run(main())


def test_store_sources_get_events_derived_from_view_changes():
    async def main() -> None:
        from shoal.monitor.publish import MemorySummaryStore
        from shoal.monitor.sources import StoreSource
        from shoal.monitor.summary import PeerSummary

        store = MemorySummaryStore()
        clock = FakeClock(NOW)
        dash = Dashboard(StoreSource(store), DashboardConfig(port=0), wall_clock=clock)
        for i in range(3):
            await store.publish(PeerSummary(peer=peer_id(i), t=NOW, step_t=NOW, step=1))
        await dash.poll_once()
        clock.advance(200)  # everyone silent: all stale, nothing left to alert on
        await store.publish(PeerSummary(peer=peer_id(0), t=clock(), step_t=NOW, step=1))
        await dash.poll_once()
        events = [(e["kind"], e["peer"]) for e in dash.state()["events"]][::-1]
        assert events[:3] == [("seen", peer_id(i)) for i in range(3)]
        assert events[3:5] == [("stale", peer_id(1)), ("stale", peer_id(2))]
        assert events[5] == ("alert", "swarm")  # peer 0 is fresh but has not stepped for 200 s
        assert "stalled" in dash.state()["events"][0]["text"]
        await dash.aclose()

    asyncio.run(main())


def test_static_page_loads_nothing_from_outside() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
