import json
import logging

import pytest
import torch

from shoal.errors import CheckpointError
from shoal.models import GPT, model_config
from shoal.state.checkpoint import (
    list_checkpoints,
    load_latest_valid,
    read_checkpoint,
    take_snapshot,
    write_snapshot,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained(seed=0):
    model = GPT(model_config("tiny", n_layer=1, d_model=32, n_head=2), seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(idx, idx).backward()
    opt.step()
    return model, opt


def _write(root, step, seed=0, keep_last=5):
    model, opt = _trained(seed)
    snap = take_snapshot(step, model, opt, extra={"rng": torch.get_rng_state()}, meta={"note": "x"})
    return write_snapshot(snap, root, keep_last=keep_last), model, opt


def test_round_trip_restores_model_optimizer_and_extra(tmp_path):
    path, model, opt = _write(tmp_path, 7)
    ck = read_checkpoint(path)
    assert ck.step == 7 and ck.meta == {"note": "x"}
    for name, t in model.state_dict().items():
        assert torch.equal(ck.model[name], t)
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(ck.optimizer)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(b["state"][pid][key], value)
    assert torch.equal(ck.extra["rng"], torch.get_rng_state())


def test_a_peer_s_local_tensors_are_written_and_read_but_never_served(tmp_path):
    from shoal.errors import ProtocolViolation
    from shoal.state.checkpoint import Snapshot
    from shoal.state.snapshot import (
        ManifestLimits,
        as_checkpoint,
        check_manifest,
        manifest_version,
        prepare,
    )

    model, opt = _trained()
    feedback = {"local.topk.residual": torch.randn(7)}
    snap = take_snapshot(3, model, opt, extra={"outer.x": torch.ones(2)}, local=feedback)
    ck = read_checkpoint(write_snapshot(snap, tmp_path))
    assert torch.equal(ck.local["local.topk.residual"], feedback["local.topk.residual"])
    served = prepare(snap)
    names = [t.name for t in served.manifest.tensors]
    assert "extra/outer.x" in names and not any(n.startswith("local/") for n in names)
    assert "local" not in json.loads(served.manifest.meta_json)["stems"]
    # a donor that serves one anyway is not believed: its manifest is refused, and a
    # download never fills ``local``
    leaky = prepare(Snapshot(step=3, files={"model": snap.files["model"], "xlocal": feedback}))
    leaky.manifest.tensors[-1].name = "local/local.topk.residual"
    leaky.manifest.version = manifest_version(leaky.manifest)
    with pytest.raises(ProtocolViolation, match="peer's own file"):
        check_manifest(leaky.manifest, ManifestLimits())
    assert as_checkpoint(snap, "donor").local == {}
    assert read_checkpoint(write_snapshot(take_snapshot(4, model, opt), tmp_path)).local == {}


def test_no_pickle_files_and_manifest_lists_hashes(tmp_path):
    path, _, _ = _write(tmp_path, 1)
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "extra.safetensors",
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1
    assert set(manifest["files"]) == {n for n in names if n.endswith(".safetensors")}
    assert all(len(e["sha256"]) == 64 for e in manifest["files"].values())


def test_keeps_only_the_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert not list(tmp_path.glob(".tmp-*"))
    # A write below the steps already there (another run's folders) is never rotated away.
    path, _, _ = _write(tmp_path, 1, keep_last=2)
    assert path.exists() and path in list_checkpoints(tmp_path)


def test_corrupted_file_is_detected_and_named(tmp_path):
    path, _, _ = _write(tmp_path, 1)
    target = path / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is corrupt: sha256"):
        read_checkpoint(path)


def test_truncated_file_is_detected_and_named(tmp_path):
    path, _, _ = _write(tmp_path, 1)
    target = path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        read_checkpoint(path)


def test_missing_manifest_is_named(tmp_path):
    path, _, _ = _write(tmp_path, 1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        read_checkpoint(path)


def test_latest_valid_skips_a_torn_newest_checkpoint(tmp_path, caplog):
    _write(tmp_path, 1, seed=1)
    newest, _, _ = _write(tmp_path, 2, seed=2)
    (newest / "model.safetensors").write_bytes(b"torn")
    with caplog.at_level(logging.WARNING, logger="shoal.state.checkpoint"):
        ck = load_latest_valid(tmp_path)
    assert ck is not None and ck.step == 1
    assert "skipping checkpoint step-00000002" in caplog.text
    assert "model.safetensors" in caplog.text


def test_latest_valid_is_none_without_checkpoints(tmp_path):
    assert load_latest_valid(tmp_path / "none") is None


def test_interrupted_write_leaves_only_a_temp_dir_that_is_ignored(tmp_path):
    _write(tmp_path, 1)
    (tmp_path / ".tmp-step-00000002").mkdir()  # a writer died before the rename
    assert load_latest_valid(tmp_path).step == 1
    _write(tmp_path, 3)
    assert not (tmp_path / ".tmp-step-00000002").exists()


def test_rewriting_the_same_step_replaces_it(tmp_path):
    _write(tmp_path, 5, seed=1)
    path, model, _ = _write(tmp_path, 5, seed=2)
    ck = read_checkpoint(path)
    assert torch.equal(ck.model["wte.weight"], model.wte.weight)


def test_snapshot_is_independent_of_later_training(tmp_path):
    model, opt = _trained()
    snap = take_snapshot(1, model, opt)
    before = snap.files["model"]["wte.weight"].clone()
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    assert torch.equal(snap.files["model"]["wte.weight"], before)
