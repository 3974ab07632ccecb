"""``shoal bench diloco --in-process``: replicas of the real DiLoCo loop with an exact exchange."""

from __future__ import annotations

import pytest

from shoal.cli.bench import run_bench

_SMALL = ["--steps", "6", "--batch-size", "2", "--seq-len", "16", "--eval-every", "1"]


@pytest.mark.slow
def test_one_replica_with_plain_outer_sgd_is_plain_training():
    # θ ← θ - 1.0·(θ - θ_local) is θ_local: one replica must land where the baseline does.
    result = run_bench(
        "diloco",
        ["--in-process", "--peers", "1", "--codec", "none", "--settings", "3:1:0", *_SMALL],
    )
    (point,) = result["frontier"]
    assert point["rounds"] == 2
    assert [c["step"] for c in point["curve"]] == [3, 6]
    assert point["val_bpb"] == pytest.approx(result["baseline_val_bpb"], abs=2e-3)


@pytest.mark.slow
def test_frontier_reports_every_setting_with_its_payload():
    result = run_bench(
        "diloco",
        [
            "--in-process",
            "--peers",
            "2",
            "--codec",
            "int8",
            "--settings",
            "3:1:0,6:0.7:0.9",
            *_SMALL,
        ],
    )
    first, second = result["frontier"]
    assert (first["rounds"], second["rounds"]) == (2, 1)
    assert result["missed"] is None and "resyncs" not in first
    # int8: one byte per value plus one fp32 scale per 4096-value block, sent by each of the
    # 2 replicas for half the vector, on the way in and on the way out.
    params = result["params"]
    per_round = 2 * (1 / 2) * 2 * (params + 4 * -(-params // 4096))
    assert first["payload_bytes"] == pytest.approx(2 * per_round, rel=1e-6)
    assert second["payload_bytes"] == pytest.approx(per_round, rel=1e-6)
    for p in (first, second):
        gap = (p["val_bpb"] - result["baseline_val_bpb"]) / result["baseline_val_bpb"]
        assert p["loss_gap"] == pytest.approx(gap, abs=1e-3)
        assert p["comm_reduction"] == pytest.approx(
            result["ddp_fp32_bytes"] / p["payload_bytes"], rel=1e-3
        )


@pytest.mark.slow
def test_a_missed_round_averages_without_the_replica_that_then_catches_up():
    result = run_bench(
        "diloco",
        [
            "--in-process",
            *("--peers", "2", "--codec", "none", "--settings", "3:1:0", "--miss", "0:1"),
            *_SMALL,
        ],
    )
    (point,) = result["frontier"]
    assert result["missed"] == "0:1" and point["rounds"] == 2
    assert point["resyncs"] == 1  # it took replica 0's state after the round it missed
    # Round 0 had one input: nothing to exchange. Round 1 is a full fp32 exchange of the
    # two (each sends half its vector in, and the other half of the mean out).
    assert point["payload_bytes"] == 2 * 4 * result["params"]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("2", "expected ROUND:COUNT"),
        ("a:1", "expected ROUND:COUNT"),
        ("-1:2", "ROUND must be >= 0 and COUNT >= 1"),
        ("0:0", "ROUND must be >= 0 and COUNT >= 1"),
    ],
)
def test_a_bad_miss_is_refused_with_the_reason(bad, why, capsys):
    with pytest.raises(SystemExit):
        run_bench("diloco", ["--in-process", f"--miss={bad}"])
    assert why in capsys.readouterr().err
