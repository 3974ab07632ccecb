"""Renders the dashboard in headless Chromium against a fake swarm and checks what the page's
JavaScript drew: peers, roles, alerts and chart lines with data points."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from shoal.monitor.config import DashboardConfig
from shoal.monitor.dashboard import Dashboard

from .fakes import NOW, FakeClock, FakeSource, peer_id, swarm_events, swarm_history

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]
BROWSER_TIMEOUT_S = 90.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make system-deps)"),
]


async def _chromium(args: list[str], profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


async def _render(tmp_path: Path) -> tuple[str, Path, str]:
    source = FakeSource(swarm_history(), swarm_events())
    config = DashboardConfig(port=0, poll_interval_s=0.5)
    async with Dashboard(source, config, wall_clock=FakeClock(NOW + 1.0)) as dash:
        await dash.wait_first_poll(5.0)
        static_html = await asyncio.to_thread(
            lambda: urllib.request.urlopen(dash.url, timeout=5).read().decode()
        )
        shot = tmp_path / "dashboard.png"
        dom = await _chromium(["--dump-dom", dash.url], tmp_path / "profile-dom")
        await _chromium(
            [f"--screenshot={shot}", "--window-size=1280,1200", dash.url], tmp_path / "profile-shot"
        )
    return dom, shot, static_html


def test_dashboard_renders_swarm(tmp_path: Path) -> None:
    dom, shot, static_html = asyncio.run(_render(tmp_path))

    # The peers table was filled in by the script: every peer, with its role and link.
    for i in (0, 1, 2, 3, 10, 11):
        assert f'data-peer="{peer_id(i)}"' in dom
        assert f'data-peer="{peer_id(i)}"' not in static_html
    assert "stage_server" in dom and "trainer" in dom
    assert "relayed" in dom and "punched" in dom

    # Alerts computed from the fake swarm are shown with their text.
    assert 'data-kind="straggler"' in dom
    assert f"straggler {peer_id(3)[:12]}" in dom
    assert "bottleneck stage 1" in dom
    assert "low bandwidth" in dom

    # Charts: one loss line per trainer with one point per published step.
    loss_chart = dom.split('id="chart-loss"')[1].split("</svg>")[0]
    loss_lines = re.findall(r'<polyline[^>]*data-series="(sh[^"]+)"[^>]*data-n="(\d+)"', loss_chart)
    counts = {peer: int(n) for peer, n in loss_lines}
    assert counts == {peer_id(i): 30 for i in range(4)}
    val_chart = dom.split('id="chart-val"')[1].split("</svg>")[0]
    assert re.search(r'<polyline[^>]*data-n="6"', val_chart)
    samples_chart = dom.split('id="chart-samples"')[1].split("</svg>")[0]
    assert len(re.findall(r"<polyline", samples_chart)) == 6
    assert "<polyline" not in static_html

    # Events from the source, newest first.
    events = dom.split('id="events"')[1]
    assert events.index("checkpoint") < events.index("failure") < events.index("join")

    assert shot.stat().st_size > 10_000
    artifacts = os.environ.get("SHOAL_ARTIFACTS")
    if artifacts:
        # A folder, or a flag meaning the repository's artifacts/ folder.
        flag = artifacts.lower() in ("1", "true", "yes")
        folder = Path(__file__).resolve().parents[2] / "artifacts" if flag else Path(artifacts)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, folder / "dashboard.png")
