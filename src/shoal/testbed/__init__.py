"""Network-namespace test topologies: public hosts, NAT routers, shaped links, partitions.

See README.md in this folder. Needs root, iproute2, iptables and /dev/net/tun.
"""

from shoal.testbed.bed import Testbed, TestbedConfig
from shoal.testbed.host import Host
from shoal.testbed.netns import TestbedError
from shoal.testbed.topology import Nat, Public, Topology, load_topology

__all__ = [
    "Host",
    "Nat",
    "Public",
    "Testbed",
    "TestbedConfig",
    "TestbedError",
    "Topology",
    "load_topology",
]
