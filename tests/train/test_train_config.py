import pytest

from shoal.errors import ConfigError
from shoal.train.config import TrainConfig, load_config, with_overrides


def test_toml_sections_and_model_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nname = "small"\nn_layer = 3\n\n[optim]\nlr = 0.001\n\n'
        "[run]\nsteps = 50\n\n[data]\nseq_len = 64\n"
    )
    cfg = load_config(path)
    assert cfg.model.name == "small" and cfg.model.build().n_layer == 3
    assert cfg.optim.lr == 0.001 and cfg.run.steps == 50 and cfg.data.seq_len == 64
    flags = with_overrides(cfg, {"optim.lr": 0.5, "run.steps": None})
    assert flags.optim.lr == 0.5 and flags.run.steps == 50


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("optim.lr", -1.0, r"optim\.lr must be > 0, got -1\.0"),
        ("run.steps", 0, r"run\.steps"),
        ("data.batch_size", "8", r"data\.batch_size"),
        ("optim.grad_accum", 0, r"optim\.grad_accum"),
        ("model.name", "huge", r"unknown model 'huge'; choose one of: tiny, small"),
        ("model.n_head", 3, r"n_head"),
        ("run.device", "tpu", r"run\.device"),
        ("data.seq_len", 4096, r"max_seq_len"),
        ("optim.nope", 1, r"unknown config key 'optim\.nope'"),
        ("nope.x", 1, r"unknown config key 'nope\.x'"),
    ],
)
def test_invalid_values_give_one_line_config_errors(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        with_overrides(TrainConfig(), {key: value})
    assert "\n" not in str(info.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
