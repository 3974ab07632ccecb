import logging
import statistics
import threading
import time

import pytest
import torch

from shoal.errors import ConfigError
from shoal.state.background import BackgroundCheckpointer, CheckpointerConfig
from shoal.state.checkpoint import (
    list_checkpoints,
    load_latest_valid,
    read_checkpoint,
    take_snapshot,
    write_snapshot,
)


def _model(width=64, depth=2):
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, width)).sum().backward()
    opt.step()
    return model, opt


def test_maybe_save_follows_the_interval_and_keeps_the_last_k(tmp_path):
    model, opt = _model()
    ckpt = BackgroundCheckpointer(tmp_path, CheckpointerConfig(interval_steps=3, keep_last=2))
    taken = []
    for s in range(1, 13):
        if ckpt.maybe_save(s, lambda s=s: take_snapshot(s, model, opt)):
            taken.append(s)
            assert ckpt.flush(30)  # let each write finish (else newer ones supersede it)
    assert taken == [3, 6, 9, 12]
    assert not ckpt.maybe_save(12, lambda: take_snapshot(12, model, opt))  # same step twice
    assert ckpt.close(timeout_s=30)
    steps = [read_checkpoint(p).step for p in list_checkpoints(tmp_path)]
    assert steps == [9, 12]
    assert ckpt.latest_served() is not None and ckpt.latest_served().step == 12
    assert ckpt.last_saved is not None and ckpt.last_saved.step == 12


def test_snapshot_is_consistent_even_when_training_goes_on(tmp_path):
    model, opt = _model()
    release = threading.Event()
    ckpt = BackgroundCheckpointer(
        tmp_path, CheckpointerConfig(interval_steps=1), on_saved=lambda s: release.wait(10)
    )
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.save(1, lambda: take_snapshot(1, model, opt))
    with torch.no_grad():  # the live model changes while the write is blocked
        for p in model.parameters():
            p.add_(1.0)
    release.set()
    assert ckpt.close(timeout_s=30)
    saved = read_checkpoint(list_checkpoints(tmp_path)[-1])
    for name, tensor in expected.items():
        assert torch.equal(saved.model[name], tensor)


def _first_save_in_flight(tmp_path, model, opt):
    """A checkpointer whose worker holds step 1 until ``release`` is set: what is saved
    meanwhile queues behind it."""
    entered, release = threading.Event(), threading.Event()

    def block_first(saved):
        if saved.step == 1:
            entered.set()
            assert release.wait(10)

    ckpt = BackgroundCheckpointer(tmp_path, CheckpointerConfig(keep_last=5), on_saved=block_first)
    ckpt.save(1, lambda: take_snapshot(1, model, opt))
    assert entered.wait(10)
    return ckpt, release


@pytest.mark.parametrize("third_writes", [True, False])
def test_a_newer_snapshot_supersedes_a_queued_one(tmp_path, third_writes):
    """Step 3 replaces step 2 in the queue; step 2's disk write is not lost when step 3 is
    only to be served (every-N-rounds checkpoints): it goes out with step 3's state."""
    model, opt = _model()
    ckpt, release = _first_save_in_flight(tmp_path, model, opt)
    ckpt.save(2, lambda: take_snapshot(2, model, opt), write=True)
    ckpt.save(3, lambda: take_snapshot(3, model, opt), write=third_writes)
    assert ckpt.superseded == 1
    release.set()
    assert ckpt.close(timeout_s=30)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]


def test_a_snapshot_only_to_be_written_does_not_replace_one_queued_to_be_served(tmp_path):
    """Local progress the swarm has not agreed on (serve=False) must never be served; it
    used to replace a queued served snapshot, which then was neither served nor written."""
    model, opt = _model()
    ckpt, release = _first_save_in_flight(tmp_path, model, opt)
    ckpt.save(2, lambda: take_snapshot(2, model, opt), write=False)  # agreed: serve it
    ckpt.save(3, lambda: take_snapshot(3, model, opt), serve=False)  # local progress
    ckpt.save(4, lambda: take_snapshot(4, model, opt), serve=False)  # replaces 3 alone
    assert ckpt.superseded == 1
    release.set()
    assert ckpt.close(timeout_s=30)
    assert ckpt.latest_served() is not None and ckpt.latest_served().step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000004"]


def test_torn_newest_checkpoint_is_skipped_with_a_line_naming_the_file(tmp_path, caplog):
    model, opt = _model()
    ckpt = BackgroundCheckpointer(tmp_path, CheckpointerConfig(interval_steps=1, keep_last=3))
    for step in (1, 2):
        ckpt.save(step, lambda step=step: take_snapshot(step, model, opt))
        assert ckpt.flush(30)
    ckpt.close()
    newest = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        found = load_latest_valid(tmp_path)
    assert found is not None and found.step == 1
    assert f"checkpoint file {newest} is truncated or torn" in caplog.text


def test_a_failed_write_is_reported_and_the_worker_keeps_going(tmp_path):
    model, opt = _model()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    errors = []
    ckpt = BackgroundCheckpointer(
        blocker, CheckpointerConfig(interval_steps=1), on_error=lambda s, e: errors.append((s, e))
    )
    ckpt.save(1, lambda: take_snapshot(1, model, opt))
    assert ckpt.flush(30)
    assert [s for s, _ in errors] == [1] and errors[0][1] is ckpt.last_error  # told, once
    assert ckpt.last_error is not None
    assert ckpt.latest_served() is not None and ckpt.latest_served().step == 1  # still servable
    ckpt.save(2, lambda: take_snapshot(2, model, opt))
    assert ckpt.flush(30) and ckpt.latest_served().step == 2
    ckpt.close()


def test_compute_thread_pause_is_shorter_than_a_synchronous_save(tmp_path):
    model, opt = _model(width=512, depth=2)  # ~0.5M params, ~6 MB with AdamW state
    ckpt = BackgroundCheckpointer(tmp_path / "bg", CheckpointerConfig(keep_last=2))
    pauses, sync = [], []
    for step in range(1, 4):
        pauses.append(ckpt.save(step, lambda step=step: take_snapshot(step, model, opt)))
        assert ckpt.flush(30)
        start = time.perf_counter()
        write_snapshot(take_snapshot(step, model, opt), tmp_path / "sync", keep_last=2)
        sync.append(time.perf_counter() - start)
    ckpt.close()
    assert statistics.median(pauses) < statistics.median(sync)


@pytest.mark.parametrize(
    "field, value", [("interval_steps", -1), ("keep_last", 0), ("chunk_bytes", 2 << 20)]
)
def test_config_checks_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        CheckpointerConfig(**{field: value})
