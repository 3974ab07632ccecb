"""The ``ip``/``tc``/``iptables`` steps that turn an address plan into namespaces.

Called by ``Testbed.up()``; see ``shoal.testbed.bed`` for the layout it produces.
Interface names are ``<prefix><index><role>`` (``s`` site end and ``b`` bridge end of a
WAN veth, ``h``/``r`` host and router ends of a LAN veth, ``t`` TUN, ``l`` LAN bridge),
at most 12 characters.
"""

from __future__ import annotations

import selectors
import subprocess
import time
from typing import TYPE_CHECKING

from shoal.testbed import netns as nx
from shoal.testbed.host import Host
from shoal.testbed.topology import INTERNET_NET, HostAddress, Nat, Public

if TYPE_CHECKING:
    from shoal.testbed.bed import Testbed

__all__ = ["build_topology"]

_REAL_TABLE = "100"


def build_topology(bed: Testbed) -> None:
    """Create every namespace, link, address, qdisc, rule and delayer of ``bed``."""
    prefix, plan = bed.prefix, bed.plan
    inet, bridge = f"{prefix}inet", f"{prefix}br"
    _add_netns(inet)
    nx.ip("link", "add", bridge, "type", "bridge", netns=inet)
    nx.ip("link", "set", bridge, "up", netns=inet)
    delayed = any(site.delay_ms > 0 for site in bed.topology.hosts)
    lan_index = 0
    for i, site in enumerate(bed.topology.hosts):
        ns = f"{prefix}{site.name}"
        _add_netns(ns)
        wan, peer = f"{prefix}{i}s", f"{prefix}{i}b"
        nx.ip(
            "link",
            "add",
            "name",
            wan,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            inet,
        )
        nx.ip("link", "set", peer, "master", bridge, "up", netns=inet)
        nx.ip("link", "set", wan, "up", netns=ns)
        # Egress of the site's end is its upload; egress of the bridge's end its download.
        up = site.up_mbit if site.up_mbit is not None else site.rate_mbit
        for where, dev, rate in ((ns, wan, up), (inet, peer, site.rate_mbit)):
            if rate is not None:
                _tbf(bed, where, dev, rate)
        addr = plan.hosts[site.name]
        if isinstance(site, Public):
            bed.hosts[site.name] = _endpoint(bed, ns, wan, addr, INTERNET_NET, delayed)
            continue
        assert isinstance(site, Nat)
        router = Host(
            name=site.name,
            netns=ns,
            address=addr.address,
            public_address=addr.address,
            role="router",
        )
        bed.hosts[site.name] = router
        nx.ip("addr", "add", f"{addr.address}/{addr.prefix_len}", "dev", wan, netns=ns)
        lan_bridge = f"{prefix}{i}l"
        gateway = plan.hosts[site.hosts[0]].gateway
        assert gateway is not None
        nx.ip("link", "add", lan_bridge, "type", "bridge", netns=ns)
        nx.ip("addr", "add", f"{gateway}/24", "dev", lan_bridge, netns=ns)
        nx.ip("link", "set", lan_bridge, "up", netns=ns)
        for name in site.hosts:
            host_ns, host_end, router_end = (
                f"{prefix}{name}",
                f"{prefix}{lan_index}h",
                f"{prefix}{lan_index}r",
            )
            lan_index += 1
            _add_netns(host_ns)
            nx.ip(
                "link",
                "add",
                "name",
                host_end,
                "netns",
                host_ns,
                "type",
                "veth",
                "peer",
                "name",
                router_end,
                "netns",
                ns,
            )
            nx.ip("link", "set", router_end, "master", lan_bridge, "up", netns=ns)
            nx.ip("link", "set", host_end, "up", netns=host_ns)
            bed.hosts[name] = _endpoint(
                bed, host_ns, host_end, plan.hosts[name], plan.lan_of[site.name], delayed
            )
        nx.set_sysctls(ns, {"net/ipv4/ip_forward": "1"})
        random = " --random-fully" if site.kind == "symmetric" else ""
        nx.iptables_restore(ns, _router_rules(wan, random), flush=True)


def _router_rules(wan: str, random: str) -> str:
    """MASQUERADE out of the WAN side; inbound only for connections started inside."""
    filt = "".join(
        f"-A {chain} -i {wan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n-A {chain} -i {wan} -j DROP\n"
        for chain in ("INPUT", "FORWARD")
    )
    return f"*nat\n-A POSTROUTING -o {wan} -j MASQUERADE{random}\nCOMMIT\n*filter\n{filt}COMMIT\n"


def _add_netns(name: str) -> None:
    nx.ip("netns", "add", name)
    nx.ip("link", "set", "lo", "up", netns=name)


def _tbf(bed: Testbed, netns: str, dev: str, rate_mbit: float) -> None:
    rate_bytes = rate_mbit * 1e6 / 8
    burst = max(16 * 1024, int(rate_bytes * bed.config.tbf_burst_s))
    latency_ms = max(1, int(bed.config.tbf_queue_s * 1000))
    nx.run(["tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{int(rate_mbit * 1e6)}bit", "burst", str(burst), "latency", f"{latency_ms}ms"])  # fmt: skip


def _endpoint(bed: Testbed, ns: str, dev: str, addr: HostAddress, net: str, delayed: bool) -> Host:
    """Address, routes, partition chain and (when delays exist) the TUN delayer of a host."""
    host = Host(
        name=addr.name,
        netns=ns,
        address=addr.address,
        public_address=addr.public_address,
        role=addr.role,
    )
    cidr = f"{addr.address}/{addr.prefix_len}"
    chain = f"{bed.prefix}part"
    nx.iptables_restore(
        ns,
        f"*filter\n:{chain} - [0:0]\n-A INPUT -j {chain}\n-A OUTPUT -j {chain}\nCOMMIT\n",
        flush=True,
    )
    if not delayed:
        nx.ip("addr", "add", cidr, "dev", dev, netns=ns)
        if addr.gateway is not None:
            nx.ip("route", "add", "default", "via", addr.gateway, netns=ns)
        return host
    # Real routes live in table 100; the main table sends everything else into the TUN,
    # and packets the delayer writes back (iif tun) are routed with table 100.
    tun = dev[:-1] + "t"
    if addr.gateway is None:
        nx.ip("addr", "add", cidr, "dev", dev, "noprefixroute", netns=ns)
        nx.ip("route", "add", net, "dev", dev, "table", _REAL_TABLE, netns=ns)
    else:
        nx.ip("addr", "add", cidr, "dev", dev, netns=ns)  # the LAN itself stays direct
        nx.ip("route", "add", net, "dev", dev, "table", _REAL_TABLE, netns=ns)
        nx.ip(
            "route",
            "add",
            "default",
            "via",
            addr.gateway,
            "dev",
            dev,
            "table",
            _REAL_TABLE,
            netns=ns,
        )
    nx.ip("tuntap", "add", "dev", tun, "mode", "tun", netns=ns)
    nx.ip("link", "set", tun, "up", "txqueuelen", "10000", netns=ns)
    nx.ip("route", "add", "default", "dev", tun, "src", addr.address, netns=ns)
    nx.ip("rule", "add", "pref", "100", "iif", tun, "lookup", _REAL_TABLE, netns=ns)
    nx.set_sysctls(ns, {
        "net/ipv4/ip_forward": "1",
        "net/ipv4/conf/all/rp_filter": "0",
        f"net/ipv4/conf/{tun}/rp_filter": "0",
        f"net/ipv4/conf/{tun}/accept_local": "1",
    })  # fmt: skip
    default_ms, per_dst = bed.plan.delay_map_ms(addr.name)
    argv = [
        bed.config.python,
        "-m",
        "shoal.testbed.delayer",
        "--tun",
        tun,
        "--delay-ms",
        str(default_ms),
    ]
    for ip_addr, ms in sorted(per_dst.items()):
        argv += ["--to", f"{ip_addr}={ms}"]
    # a persistent testbed outlives this process: its delayers must not hold our stdio open
    quiet = subprocess.DEVNULL if bed.config.persistent else None
    proc = host.popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=quiet,
        start_new_session=bed.config.persistent,
    )  # fmt: skip
    _wait_ready(proc, bed.config.ready_timeout_s, what=f"delayer in {addr.name}")
    return host


def _wait_ready(proc: subprocess.Popen[bytes], timeout_s: float, *, what: str) -> None:
    """Wait (bounded) for the ``ready`` line a helper process prints once it works."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = proc.stdout.readline()
                if line.strip() == b"ready":
                    return
                if not line:
                    raise nx.TestbedError(f"{what} exited with {proc.wait(timeout_s)} before ready")
    raise nx.TestbedError(f"{what} not ready within {timeout_s}s")
