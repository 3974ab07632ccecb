import json

from shoal.cli.main import main


def test_demo_json_reports_a_curve(capsys):
    rc = main(["demo", "--steps", "2", "--eval-every", "1", "--threads", "1", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["steps"] == 2
    assert [p["step"] for p in result["curve"]] == [1, 2]
    assert all(p["val_bpb"] > 0 for p in result["curve"])
