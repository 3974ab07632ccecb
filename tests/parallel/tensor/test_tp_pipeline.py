"""A pipeline whose last stage is served by a 2-rank tensor-parallel group (this process is
rank 0), next to a dense server for stage 0, trained by the pipeline's own trainer."""

from __future__ import annotations

import contextlib

import pytest
import torch

from shoal.dht.peer import DHT
from shoal.models import model_config
from shoal.net.config import NetConfig
from shoal.net.identity import Identity
from shoal.net.runtime import NetRuntime
from shoal.parallel.pipeline import PipelineTrainer, StageServer, StageServerConfig, TrainerConfig
from shoal.parallel.pipeline.model import build_stages
from shoal.parallel.tensor import LaunchConfig
from shoal.parallel.tensor.pipeline_server import TPStageServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CFG = model_config("tiny", n_layer=2, d_model=64, n_head=4, max_seq_len=64)


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        data = torch.randint(0, 256, (2, 17), generator=gen, dtype=torch.uint8)
        out.append((data[:, :-1].contiguous(), data[:, 1:].contiguous()))
    return out


def test_tp_stage_server_trains_like_a_dense_pipeline() -> None:
    micro, steps, lr = 2, 2, 3e-3
    server_cfg = StageServerConfig(num_stages=2, accumulate=micro, lr=lr, seed=5)
    peers: list[tuple[NetRuntime, DHT]] = []
    servers: list[StageServer] = []

    def peer() -> tuple[NetRuntime, DHT]:
        runtime = NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
        dht = DHT(runtime)
        if peers:
            dht.bootstrap([peers[0][0].address])
        peers.append((runtime, dht))
        return runtime, dht

    try:
        servers.append(StageServer(*peer(), 0, CFG, server_cfg).start())
        launch = LaunchConfig(init_timeout_s=120.0, collective_timeout_s=120.0, threads_per_rank=1)
        tp_server = TPStageServer(*peer(), 1, CFG, server_cfg, tp=2, launch=launch).start()
        servers.append(tp_server)
        runtime, dht = peer()
        trainer = PipelineTrainer(
            runtime, dht, CFG, TrainerConfig(num_stages=2, max_inflight=micro)
        )
        data = _batches(micro, seed=1) * steps
        got: list[float] = []
        for s in range(steps):
            results = trainer.train_blocking(data[s * micro : (s + 1) * micro], timeout_s=90)
            assert [r.error for r in results] == [""] * micro
            got += [r.loss for r in results]
        assert [srv.core.steps for srv in servers] == [steps, steps]
        assert tp_server.core.ledger.counters.applied == micro * steps

        stages = build_stages(CFG, 2, seed=5)  # the same pipeline in one process
        opt = torch.optim.AdamW(
            [p for st in stages for p in st.parameters()], lr=lr, weight_decay=0.0
        )
        want: list[float] = []
        for s in range(steps):
            for x, y in data[s * micro : (s + 1) * micro]:
                loss = stages[1](stages[0](x.long()), y.long())
                (loss / micro).backward()
                want.append(float(loss.detach()))
            opt.step()
            opt.zero_grad()
        assert got == pytest.approx(want, abs=1e-5)

        # Parameters leave (and averaging deltas enter) in dense layout.
        state = tp_server.core.state_job()
        assert set(state) == set(stages[1].state_dict())
        for name, ref in stages[1].state_dict().items():
            assert state[name].shape == ref.shape
            assert float((state[name] - ref).abs().max()) < 1e-5, name
        before = tp_server.core.params_job()
        after = [b + 0.5 for b in before]
        tp_server.core.add_delta_job(before, after)
        moved = tp_server.core.params_job()
        assert all(torch.allclose(m, a) for m, a in zip(moved, after, strict=True))
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()
        for runtime, dht in reversed(peers):
            with contextlib.suppress(Exception):
                dht.close()
            runtime.close()
    (follower,) = tp_server.core.follower_results  # STOP reached it; it returned
    assert follower["rank"] == 1 and follower["items"] > 4 * micro * steps
    assert tp_server.core.group.close() == []  # idempotent
