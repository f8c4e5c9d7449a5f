"""Where every VM address of the site comes from, derived from the spec alone (no allocator).

Each host's `vm_range` is cut into blocks of `site_network.role_block` addresses: block 0 holds
the host's own address on the bridge (its first usable one), role number k (its position among the
spec's roles) has block k + 1. So "the addresses of role R" is one CIDR per host, the same on every
hypervisor, and the filter rules are static: they change when the spec does, never when a VM comes
or goes. Which slot of its block a VM takes is the host's business (`jobwrappers.sitenet.helper`).
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass

from cluster.errors import SpecError
from cluster.spec import ClusterSpec, SiteNetworkSpec

IPv4 = ipaddress.IPv4Address
Net4 = ipaddress.IPv4Network


@dataclass(frozen=True)
class HostNet:
    name: str
    underlay: str  # the host's site LAN address: the VXLAN endpoint
    vm_range: Net4
    gateway: IPv4  # the host's own address on its bridge (probes and operators come from it)


class SiteLayout:
    def __init__(self, spec: ClusterSpec) -> None:
        if spec.site_network is None:
            raise SpecError(f"{spec.source}: site_network: missing (network 'site' needs it)")
        self.net: SiteNetworkSpec = spec.site_network
        self.subnet = Net4(self.net.subnet)
        self.roles = list(spec.roles)
        self.hosts = [HostNet(h.name, h.ip or "", Net4(h.vm_range), Net4(h.vm_range).network_address + 1)
                      for h in spec.hypervisor.hosts if h.vm_range is not None]
        self.source = spec.source

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    def host(self, name: str) -> HostNet:
        for h in self.hosts:
            if h.name == name:
                return h
        raise SpecError(f"{self.source}: hypervisor.hosts: no entry {name!r} (this host's identity; "
                        f"listed: {', '.join(h.name for h in self.hosts) or 'none'})")

    def block(self, role: str, host: HostNet) -> Net4:
        k = self.roles.index(role) + 1
        size = self.net.role_block
        return Net4(f"{host.vm_range.network_address + k * size}/{32 - size.bit_length() + 1}")

    def slots(self, role: str, host: HostNet) -> list[IPv4]:
        """The addresses a VM of `role` on `host` may take, in order (never the subnet's broadcast)."""
        return [a for a in self.block(role, host) if a not in (self.subnet.network_address,
                                                               self.subnet.broadcast_address)]

    def role_cidrs(self, role: str) -> list[str]:
        return [str(self.block(role, h)) for h in self.hosts]

    def gateways(self) -> list[str]:
        return [str(h.gateway) for h in self.hosts]

    def remote_macs(self, here: str) -> dict[str, str]:
        """MAC -> underlay address of the host it lives on, for every address another host may
        give out (its bridge's own, and each role's block). Static like the rules: a host sends a
        frame for a remote VM to that VM's host only, never to every host (head-end replication
        is for broadcasts and for addresses outside the layout)."""
        return {mac_for(ip): h.underlay for h in self.hosts if h.name != here
                for ip in [h.gateway] + [a for r in self.roles for a in self.slots(r, h)]}


def mac_for(ip: IPv4 | str) -> str:
    """The VM's MAC, derived from its address (locally administered, unicast): unique as it is."""
    return "02:53:" + ":".join(f"{b:02x}" for b in IPv4(str(ip)).packed)


# Where a job learns which hypervisor it is on: the scheduler's own word first; gethostname() only
# last (a host's name for itself need not be the one the site lists).
IDENTITY_ENV = ("SALVUS_HYPERVISOR", "SLURMD_NODENAME")


def host_identity(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    for var in IDENTITY_ENV:
        if os.environ.get(var):
            return os.environ[var]
    return condor_machine() or socket.gethostname()


def condor_machine() -> str | None:
    """The execute node's `Machine` from the machine ad HTCondor's starter gives a job
    ($_CONDOR_MACHINE_AD): the name the pool matches on (`TARGET.Machine == ...`)."""
    path = os.environ.get("_CONDOR_MACHINE_AD")
    try:
        with open(path or "", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(" = ")
                if sep and key == "Machine":
                    name = value.strip().strip('"')
                    return name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", name) else None
    except OSError:
        return None
    return None
