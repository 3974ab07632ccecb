import pytest

from shoal.cli.main import main
from shoal.cli.peer import flag_names


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "swarm" in capsys.readouterr().out


def test_unknown_benchmark_is_one_line_error(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no-such-bench'" in err
    assert "Traceback" not in err


def test_usage_errors_exit_2_without_traceback(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "No such command" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--codec", "int3"], "--codec must be one of none, fp16, int8, int4, sparse, got 'int3'"),
        (["--topk", "0.01", "--codec", "int8"], "--topk sends (position, value) pairs"),
        (["--topk", "0.01", "--mode", "sync"], "--topk (sparse averaging) is for mode diloco"),
        (["--topk", "2"], "--topk must be a fraction in [0, 1), got 2.0"),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--seq-len", "100000"], "--seq-len=100000 exceeds model max_seq_len=1024"),
        (["--width", "0"], "--width must be a positive integer, got 0"),
        (["-H", "0"], "--local-steps must be a positive integer, got 0"),
        (["--swarm", ""], "--swarm must be 1..64 printable characters, got ''"),
        (["--data-dir", "/nonexistent"], "--data-dir '/nonexistent' is not a directory"),
        (["--shard", "3/2"], "--shard 3/2: need 0 <= I < N for shard I/N"),
        (["--shard", "abc"], "--shard must be I/N (e.g. 0/4), got 'abc'"),
        (["--role", "foo"], "--role must be trainer or stage, got 'foo'"),
        (["--max-group-size", "1"], "--max-group-size must be in [2, 256], got 1"),
    ],
)
def test_peer_refuses_bad_flags_by_their_names_before_listening(tmp_path, capsys, args, message):
    assert main(["peer", "--run-dir", str(tmp_path / "run"), *args]) == 2
    out, err = capsys.readouterr()
    assert f"shoal: error: {message}" in err
    assert "listening" not in out  # refused before any port was opened


def test_flag_names_translate_only_settings():
    assert flag_names("optim.lr must be > 0") == "--lr must be > 0"
    assert flag_names("NetConfig.port: cannot listen") == "--port: cannot listen"
    assert flag_names("steps must be a positive integer") == "--steps must be a positive integer"
    # plain words are left alone inside a sentence, and longer names are not split
    assert flag_names("exceeds max_seq_len after 5 steps") == "exceeds max_seq_len after 5 steps"
    # nor are paths and quoted values the user gave
    assert flag_names("run dir /data/seq_len/run") == "run dir /data/seq_len/run"
    assert flag_names("model 'batch_size' unknown") == "model 'batch_size' unknown"


def test_a_taken_metrics_port_is_refused_before_listening(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["peer", "--run-dir", str(tmp_path / "run"), "--metrics-port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert f"--metrics-port: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "listening" not in out
