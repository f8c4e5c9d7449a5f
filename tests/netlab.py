"""Emulated LANs of network namespaces (the swarm benchmark's, the site network's tests): the one
way a namespace is plugged into a LAN bridge."""
from __future__ import annotations

import subprocess


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def join_lan(lan_ns: str, bridge: str, ns: str, outer: str, inner: str, address: str) -> None:
    """A new namespace `ns` on `bridge` (in `lan_ns`) by a veth pair: `outer` a port of the bridge,
    `inner` the namespace's eth0 with `address` (CIDR); both ends and the namespace's lo up."""
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    sh("ip", "link", "set", outer, "netns", lan_ns)
    sh("ip", "link", "set", inner, "netns", ns)
    sh("ip", "-n", ns, "link", "set", inner, "name", "eth0")
    sh("ip", "-n", ns, "addr", "add", address, "dev", "eth0")
    for dev in ("eth0", "lo"):
        sh("ip", "-n", ns, "link", "set", dev, "up")
    sh("ip", "-n", lan_ns, "link", "set", outer, "master", bridge)
    sh("ip", "-n", lan_ns, "link", "set", outer, "up")
