"""The nftables rules of the site network, as `nft -f` input (names validated, every interface name
quoted, addresses and ports rendered from parsed values only).

Table `bridge salvus` filters frames on the site bridge: a frame from a VM's tap first passes that
VM's own chain (its MAC, its IP, its ARP sender fields; no IPv6, so no router advertisements), then
the destination role's chain (`to_ROLE`: who may connect, from the spec's `allow`). Filtering is
stateless (this kernel has no bridge conntrack): replies are TCP segments that are not a bare SYN,
coming from a port the destination was allowed to connect to. Table `inet salvus` admits the
overlay's UDP port from the site's hosts only.
"""
from __future__ import annotations

import ipaddress
import re

from cluster.spec import ClusterSpec
from jobwrappers.sitenet.layout import SiteLayout

TABLE = "salvus"
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
NOT_SYN = "tcp flags & (syn | ack) != syn"  # anything but a new connection's first segment


def q(ifname: str) -> str:
    if not IFNAME_RE.fullmatch(ifname):
        raise ValueError(f"not an interface name: {ifname!r}")
    return f'"{ifname}"'


def _set(items: list) -> str:
    return "{ " + ", ".join(str(i) for i in items) + " }"


def role_chains(spec: ClusterSpec, layout: SiteLayout) -> dict[str, list[str]]:
    """`to_ROLE` chain bodies for every site role."""
    gateways = _set(layout.gateways())
    chains: dict[str, list[str]] = {}
    site = [n for n, r in spec.roles.items() if r.network == "site"]
    for name in site:
        role = spec.roles[name]
        # The site's hosts: probes, `services`, operators (ssh on 22, through the hypervisor).
        body = [f"ip saddr {gateways} tcp dport {_set(sorted({role.port, 22, *role.publish}))} accept"]
        for a in role.allow:
            src = _set(layout.role_cidrs(a.from_))
            body.append(f"ip saddr {src} accept" if a.ports == "all"
                        else f"ip saddr {src} tcp dport {_set(sorted(set(a.ports)))} accept")
        # Replies to connections this role's VMs were allowed to open to other roles.
        for other in site:
            for a in spec.roles[other].allow:
                if a.from_ != name or other == name and a.ports == "all":
                    continue
                src = _set(layout.role_cidrs(other))
                sport = "" if a.ports == "all" else f" tcp sport {_set(sorted(set(a.ports)))}"
                body.append(f"ip saddr {src}{sport} {NOT_SYN} accept")
        body.append("counter drop")
        chains[f"to_{name}"] = body
    return chains


def base_ruleset(spec: ClusterSpec, layout: SiteLayout, here: str, bridge_meta: bool = True) -> str:
    """The static rules of host `here`: applied whole by `network up` (VM chains and the
    `vm_ports` map's elements, which the helper owns, survive it). Without `bridge_meta` (a kernel
    without nft_meta_bridge) the rules can't tell the site bridge from others and cover them all."""
    net = layout.net
    host = layout.host(here)
    br, vx = q(net.bridge), q(net.vxlan_device)
    chains = role_chains(spec, layout)
    other = [f"meta ibrname != {br} accept"] if bridge_meta else []
    # A port that is neither the overlay nor an attached VM's tap (a tap before its rules) gets nothing.
    ports = ["iifname vmap @vm_ports", f"iifname != {vx} iifname != @vm_ifs counter drop"]
    forward = [*other, *ports,
               "ether type arp accept", f"ip daddr {_set(layout.gateways())} {NOT_SYN} accept"]
    forward += [f"ip daddr {_set(layout.role_cidrs(name[3:]))} jump {name}" for name in chains]
    forward.append("counter drop")
    inp = [*other, *ports,
           "ether type arp accept", f"ip daddr {host.gateway} {NOT_SYN} accept"]
    # Replies to the world's connections to a published port: with br_netfilter their destination
    # is already un-NATed here (the outside client's address).
    for name, role in spec.roles.items():
        if role.network == "site" and role.publish:
            inp.append(f"ip saddr {layout.block(name, host)} tcp sport {_set(sorted(set(role.publish)))} "
                       f"{NOT_SYN} accept")
    inp.append("counter drop")
    peers = sorted({h.underlay for h in layout.hosts}, key=ipaddress.ip_address)
    lines = [f"table bridge {TABLE} {{", "  map vm_ports { type ifname : verdict; }",
             "  set vm_ifs { type ifname; }",
             "  chain forward { type filter hook forward priority 0; policy accept; }",
             "  chain input { type filter hook input priority 0; policy accept; }"]
    lines += [f"  chain {name} {{ }}" for name in chains]
    lines += ["}", f"table inet {TABLE} {{",
              "  chain input { type filter hook input priority -10; policy accept; }", "}"]
    lines += [f"flush chain bridge {TABLE} {c}" for c in ("forward", "input", *chains)]
    lines += [f"flush chain inet {TABLE} input"]
    lines += [f"add rule bridge {TABLE} forward {r}" for r in forward]
    lines += [f"add rule bridge {TABLE} input {r}" for r in inp]
    for name, body in chains.items():
        lines += [f"add rule bridge {TABLE} {name} {r}" for r in body]
    lines += [f"add rule inet {TABLE} input udp dport {net.vxlan_port} ip saddr != {_set(peers)} counter drop",
              f"add rule inet {TABLE} input meta nfproto ipv6 udp dport {net.vxlan_port} counter drop"]
    return "\n".join(lines) + "\n"


PUB_TABLE = "salvus_pub"


def publish_ruleset(layout: SiteLayout, here: str) -> str:
    """`publish:`: the hypervisor's own address, port P, forwarded (DNAT) to the one VM of this host
    that published P (the helper fills the maps), its source rewritten to the host's bridge
    address (which the role's chain admits to that port). Routing into or out of the bridge is
    refused otherwise: turning on forwarding must not make the host a router to the VMs."""
    host = layout.host(here)
    br = q(layout.net.bridge)
    return "\n".join([
        f"table ip {PUB_TABLE} {{",
        "  map published { type inet_service : ipv4_addr . inet_service; }",
        "  set published_vms { type ipv4_addr . inet_service; }",
        "  chain prerouting { type nat hook prerouting priority dstnat; policy accept; }",
        "  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }",
        "  chain forward { type filter hook forward priority 0; policy accept; }",
        "}",
        *(f"flush chain ip {PUB_TABLE} {c}" for c in ("prerouting", "postrouting", "forward")),
        f"add rule ip {PUB_TABLE} prerouting ip daddr {host.underlay} dnat ip addr . port to tcp dport map @published",
        f"add rule ip {PUB_TABLE} postrouting oifname {br} ip daddr . tcp dport @published_vms snat ip to {host.gateway}",
        # Bridged frames (br_netfilter shows them here too) are the bridge table's business.
        f"add rule ip {PUB_TABLE} forward iifname {br} oifname {br} accept",
        f"add rule ip {PUB_TABLE} forward iifname {br} ct state established,related accept",
        f"add rule ip {PUB_TABLE} forward iifname {br} counter drop",
        f"add rule ip {PUB_TABLE} forward oifname {br} ct status dnat accept",
        f"add rule ip {PUB_TABLE} forward oifname {br} counter drop"]) + "\n"


def publish_elements(op: str, ip: str, ports: list[int]) -> str:
    addr = ipaddress.IPv4Address(ip)
    lines = []
    for port in ports:
        p = int(port)
        lines.append(f"{op} element ip {PUB_TABLE} published {{ {p}{f' : {addr} . {p}' if op == 'add' else ''} }}")
        lines.append(f"{op} element ip {PUB_TABLE} published_vms {{ {addr} . {p} }}")
    return "\n".join(lines) + "\n"


def vm_chain(ip: str) -> str:
    return "vm_" + str(ipaddress.IPv4Address(ip)).replace(".", "_")


def attach_rules(tap: str, ip: str, mac: str) -> str:
    """One VM's anti-spoofing chain and its entry in `vm_ports` (by the tap's name)."""
    if not re.fullmatch(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}", mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    addr = ipaddress.IPv4Address(ip)
    c = vm_chain(ip)
    body = [f"ether saddr != {mac} counter drop",
            f"arp saddr ether != {mac} counter drop", f"arp saddr ip != {addr} counter drop",
            "ether type arp return",
            f"ip saddr != {addr} counter drop", "ether type ip return",
            "counter drop"]  # IPv6 (router advertisements included), VLAN tags, anything else
    lines = [f"add chain bridge {TABLE} {c}", f"flush chain bridge {TABLE} {c}"]
    lines += [f"add rule bridge {TABLE} {c} {r}" for r in body]
    lines.append(f"add element bridge {TABLE} vm_ports {{ {q(tap)} : jump {c} }}")
    lines.append(f"add element bridge {TABLE} vm_ifs {{ {q(tap)} }}")
    return "\n".join(lines) + "\n"
