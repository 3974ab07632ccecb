from shoal.cli.main import main


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
