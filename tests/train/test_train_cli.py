import json

from shoal.cli.main import main


def test_shoal_train_json_prints_one_line(tmp_path, capsys, small_cfg):
    data = small_cfg().data.dir
    run_dir = tmp_path / "cli-run"
    rc = main(
        [
            "train",
            "--model",
            "tiny",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--data-dir",
            data,
            "--run-dir",
            str(run_dir),
            "--eval-every",
            "2",
            "--ckpt-every",
            "2",
            "--threads",
            "1",
            "--json",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(out) == 1
    result = json.loads(out[0])
    assert set(result) == {"steps", "train_loss", "val_bpb", "tokens_per_s", "params"}
    assert result["steps"] == 4 and result["params"] > 100_000
    assert (run_dir / "checkpoints" / "step-00000004" / "manifest.json").is_file()

    rc = main(
        [
            "train",
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--data-dir",
            data,
            "--run-dir",
            str(run_dir),
            "--threads",
            "1",
            "--resume",
            "--json",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 6


def test_shoal_train_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["train", "--model", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shoal: error: unknown model 'huge'") and "tiny" in err
    assert main(["train", "--data-dir", str(tmp_path / "none"), "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
