"""`shoal dht serve/put/get/peers` against real nodes on 127.0.0.1."""

import json
import os
import subprocess
import sys
import threading

import pytest

from shoal.cli.main import main


def _start_server(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "dht", "serve", "--duration", "120", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not line or not line[0].strip():
        proc.kill()
        raise AssertionError(f"server did not start: {proc.stderr.read()}")
    address, peer_id = line[0].split()
    assert peer_id.startswith("sh")
    return proc, address


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.mark.slow
def test_serve_put_get_peers(capsys):
    first, a = _start_server()
    second = None
    try:
        second, b = _start_server("--join", "127.0.0.1:1", "--join", a)
        assert main(["dht", "put", "hello", "world", "--join", a, "--timeout", "20"]) == 0
        assert "stored on" in capsys.readouterr().out
        assert main(["dht", "put", "d", "one", "--subkey", "x", "--join", b]) == 0
        capsys.readouterr()
        assert main(["dht", "get", "hello", "--join", "127.0.0.1:1", "--join", b]) == 0
        assert capsys.readouterr().out.strip() == "world"
        assert main(["dht", "get", "d", "--join", a]) == 0
        assert capsys.readouterr().out.strip().endswith("/x one")
        assert main(["dht", "get", "absent", "--join", a]) == 1
        assert "no value" in capsys.readouterr().err
        assert main(["dht", "peers", "--join", a, "--json"]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert sorted(r["addresses"][0] for r in rows) == sorted([a, b])
        assert all(r["roles"] == ["dht"] for r in rows)
    finally:
        _stop(first)
        if second is not None:
            _stop(second)


def test_clear_errors_without_or_with_dead_join(capsys):
    assert main(["dht", "get", "k"]) == 2
    assert "--join is required" in capsys.readouterr().err
    assert main(["dht", "get", "k", "--join", "127.0.0.1:1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "none of the 1 bootstrap address(es) answered" in err and "Traceback" not in err
