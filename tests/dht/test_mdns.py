"""mDNS is opt-in and lazy; no multicast is sent here (that belongs in tests/netns)."""

import asyncio
import importlib.util
import subprocess
import sys

import pytest

from shoal.errors import ConfigError
from shoal.net.identity import Identity


def test_importing_the_dht_does_not_import_zeroconf():
    code = "import sys, shoal.dht, shoal.dht.mdns, shoal.cli.dht; print('zeroconf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_advertiser_refuses_loopback_before_touching_the_network():
    from shoal.dht.mdns import MdnsAdvertiser

    with pytest.raises(ConfigError, match="LAN address"):
        MdnsAdvertiser(Identity.from_seed(b"x").peer_id, "127.0.0.1", 4000)


@pytest.mark.skipif(importlib.util.find_spec("zeroconf") is not None, reason="zeroconf installed")
def test_missing_extra_is_a_clear_config_error():
    from shoal.dht.mdns import discover

    with pytest.raises(ConfigError, match=r"shoal\[mdns\]"):
        asyncio.run(discover(0.1))
