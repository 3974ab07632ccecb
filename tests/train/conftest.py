import pytest
import torch

from shoal.train.config import TrainConfig, with_overrides


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests train tiny models on one thread (the trainer sets threads from its config);
    the process-wide setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def small_cfg(tmp_path):
    """A seconds-long run: a 1-block model on a few KB of text in tmp_path."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)]
        (data / f"m{i}.py").write_text("".join(lines))

    def make(**overrides):
        base = {
            "model.name": "tiny",
            "model.n_layer": 1,
            "model.d_model": 32,
            "model.n_head": 2,
            "data.dir": str(data),
            "data.seq_len": 32,
            "data.batch_size": 4,
            "data.eval_batches": 1,
            "run.steps": 20,
            "run.eval_every": 5,
            "run.run_dir": str(tmp_path / "run"),
            "run.threads": 1,
            "checkpoint.every_steps": 0,
            "schedule.warmup_steps": 3,
        }
        base.update(overrides)
        return with_overrides(TrainConfig(), base)

    return make
