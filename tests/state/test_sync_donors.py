"""State sync from donor processes found through the DHT; one donor is SIGKILLed mid-transfer."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from shoal.dht.peer import DHT
from shoal.net import Identity, NetConfig, NetRuntime
from shoal.state.announce import state_key
from shoal.state.static_donor import synthetic_snapshot
from shoal.state.sync_client import SyncConfig, sync_from_swarm

PARAMS = 3_000_000  # 36 MB with the AdamW moments
START_TIMEOUT_S = 120.0


class Donor:
    """A ``shoal.state.static_donor`` process; its JSON stdout lines arrive on a queue."""

    def __init__(self, tmp_path, index, join):
        self.err_path = tmp_path / f"donor{index}.err"
        args = ["--params", str(PARAMS), "--seed", "5", "--swarm", "t", "--join", join]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.state.static_donor", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.err_path, "w"),  # noqa: SIM115 - closed with the process
            text=True,
        )
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def ready(self, deadline):
        event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
        assert event is not None, self.err_path.read_text()[-2000:]
        assert event["event"] == "ready"
        return event

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.mark.slow
def test_joiner_finishes_from_the_others_when_a_donor_is_killed(tmp_path):
    joiner = NetRuntime(Identity.generate(), NetConfig(port=0)).start()
    dht = DHT(joiner)
    donors = [Donor(tmp_path, i, joiner.address) for i in range(3)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        info = [d.ready(deadline) for d in donors]
        assert len({i["version"] for i in info}) == 1
        by_label = {i["peer_id"][:12]: d for i, d in zip(info, donors, strict=True)}
        killed: list[str] = []
        total = info[0]["total_bytes"]

        def kill_once(label, received):
            # SIGKILL the first donor that has sent 5% of the snapshot, while it is sending
            if not killed and received >= total // 20:
                killed.append(label)
                os.kill(by_label[label].proc.pid, signal.SIGKILL)

        config = SyncConfig(piece_bytes=2 << 20, total_timeout_s=120, piece_timeout_s=30)
        result = joiner.run(
            sync_from_swarm(joiner, dht, state_key("t"), config, on_chunk=kill_once),
            timeout_s=150,
        )
        assert killed and by_label[killed[0]].proc.wait(10) == -signal.SIGKILL
        assert killed[0] in result.failed_donors
        assert sum(result.bytes_by_donor.values()) == total
        assert result.bytes_by_donor[killed[0]] < total // 3  # the others did the rest
        want = synthetic_snapshot(PARAMS, 5)
        got = result.snapshot
        assert got.step == want.step and got.meta == want.meta
        for stem, tensors in want.files.items():
            assert set(got.files[stem]) == set(tensors)
            for key, tensor in tensors.items():
                assert torch.equal(got.files[stem][key], tensor), f"{stem}/{key}"
    finally:
        for d in donors:
            d.close()
        dht.close()
        joiner.close()
