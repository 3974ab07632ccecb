"""NetConfig.announce: the address a peer publishes when something sits in front of it."""

import pytest

from shoal.errors import ConfigError
from shoal.net import Identity, NetConfig, NetRuntime


def test_runtime_publishes_the_announced_address_and_listens_on_its_own():
    runtime = NetRuntime(
        Identity.generate(), NetConfig(port=0, announce="198.18.0.7:4000", unix_socket=False)
    ).start()
    try:
        assert runtime.address == "198.18.0.7:4000"
        assert runtime.port not in (0, 4000)
    finally:
        runtime.close()
    plain = NetRuntime(Identity.generate(), NetConfig(port=0, unix_socket=False)).start()
    try:
        assert plain.address == f"127.0.0.1:{plain.port}"
    finally:
        plain.close()


@pytest.mark.parametrize("bad", ["nohost", ":80", "h:", "h:0", "h:70000", "h:x1"])
def test_bad_announce_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="announce"):
        NetConfig(announce=bad)
