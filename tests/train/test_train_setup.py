from shoal.train.setup import _cgroup_cpu_limit, available_cores


def test_cgroup_quota_parsing(tmp_path):
    f = tmp_path / "cpu.max"
    f.write_text("max 100000\n")
    assert _cgroup_cpu_limit(f) is None
    f.write_text("250000 100000\n")
    assert _cgroup_cpu_limit(f) == 2
    f.write_text("50000 100000\n")
    assert _cgroup_cpu_limit(f) == 1
    f.write_text("garbage")
    assert _cgroup_cpu_limit(f) is None
    assert _cgroup_cpu_limit(tmp_path / "missing") is None


def test_available_cores_is_positive():
    assert available_cores() >= 1
