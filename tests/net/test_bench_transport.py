"""The transport benchmark runs end to end (tiny sizes) and reports every field."""

from __future__ import annotations

import pytest

from shoal.cli.bench import run_bench


@pytest.mark.slow
def test_transport_bench_smoke():
    result = run_bench(
        "transport",
        [
            "--mib",
            "4",
            "--reps",
            "1",
            "--pings",
            "100",
            "--shaped-mib",
            "1",
            "--shaped-mbit",
            "100",
            "--delay-ms",
            "2",
            "--json",
        ],
    )
    assert result["bench"] == "transport"
    for key in (
        "ratio_vs_raw",
        "full_MBps",
        "raw_MBps",
        "rpc_p50_us",
        "raw_rpc_p50_us",
        "shaped_ratio_of_link",
    ):
        assert result[key] > 0, key
    assert result["shaped_ratio_of_link"] < 1.2  # the shaper really capped the link
