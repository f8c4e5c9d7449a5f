"""`salvus_jobs network up | down`: one hypervisor's part of the site network (root, idempotent).

up: the bridge (the host's own address on it, the VMs' MTU, no IPv6), the VXLAN device on it with
one all-zero FDB entry per other site host (unicast head-end replication for broadcasts: no
multicast, no learning from the wire) and a static entry for every address another host may give
out (a unicast frame goes to that host only), the base nftables rules, `allow BRIDGE` in qemu-bridge-helper's
bridge.conf, and the host state the root helper reads. What already matches is left alone, so a
second `up` changes nothing. Devices are read through iproute2's JSON output, rules applied as one
`nft -f` transaction.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import SpecError, TempFailure
from cluster.spec import ClusterSpec
from jobwrappers.sitenet import rules
from jobwrappers.sitenet.layout import SiteLayout, mac_for
from jobwrappers.sitenet.state import host_state_path, lease_dir, netns_id, read_host_state, run_dir, write_host_state

log = logging.getLogger(__name__)

BRIDGE_CONF = Path("/etc/qemu/bridge.conf")
CONF_MARK = "# the next line: salvus_jobs network up (removed by network down)"


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise SpecError(f"{argv[0]}: not installed (iproute2 and nftables are needed: apt-get install "
                        "iproute2 nftables)") from None
    if check and proc.returncode != 0:
        raise TempFailure(f"{' '.join(argv[:4])}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc


def link(name: str) -> dict | None:
    """The device's `ip -j -d link show` entry, None when there is none."""
    proc = sh("ip", "-j", "-d", "link", "show", "dev", name, check=False)
    if proc.returncode != 0:
        return None
    found = json.loads(proc.stdout or "[]")
    return found[0] if found else None


def nft_json(*what: str) -> list[dict]:
    proc = sh("nft", "-j", "list", *what, check=False)
    if proc.returncode != 0:
        return []
    return json.loads(proc.stdout).get("nftables", [])


def _strip(obj):
    """Without handles and counter values: what the rules are, not what they have seen."""
    if isinstance(obj, dict):
        if "counter" in obj and isinstance(obj["counter"], dict):
            return {"counter": None}
        return {k: _strip(v) for k, v in obj.items() if k != "handle"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def base_digest() -> str:
    """What the kernel holds of the base rules (both tables minus the helper's VM chains and map
    elements, without handles): `up` compares it to what it applied last time."""
    keep = []
    for item in (nft_json("table", "bridge", rules.TABLE) + nft_json("table", "inet", rules.TABLE)
                 + nft_json("table", "ip", rules.PUB_TABLE)):
        kind, body = next(iter(item.items()))
        if kind == "metainfo" or body.get("chain", body.get("name", "")).startswith("vm_"):
            continue
        if kind in ("map", "set"):
            body = {k: v for k, v in body.items() if k != "elem"}
        keep.append({kind: body})
    return hashlib.sha256(json.dumps(_strip(keep), sort_keys=True).encode()).hexdigest()


def bridge_meta_supported() -> bool:
    """Whether this kernel matches a frame's bridge (`meta ibrname`, module nft_meta_bridge)."""
    probe = "table bridge salvus_probe {\n chain c {\n  meta ibrname \"x\" accept\n }\n}\n"
    return sh("nft", "-c", "-f", "-", stdin=probe, check=False).returncode == 0


@dataclass
class Changes:
    done: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        log.info("%s", what)
        self.done.append(what)


def _ensure_bridge(spec: ClusterSpec, layout: SiteLayout, here: str, ch: Changes) -> None:
    net = layout.net
    host = layout.host(here)
    br = link(net.bridge)
    if br is not None and br.get("linkinfo", {}).get("info_kind") != "bridge":
        raise SpecError(f"site_network.bridge: {net.bridge} exists and is not a bridge")
    if br is None:
        sh("ip", "link", "add", net.bridge, "type", "bridge")
        ch.add(f"bridge {net.bridge} created")
        br = link(net.bridge)
    # No IPv6 on the bridge: the host must not pick up a router advertisement from a guest.
    v6 = Path(f"/proc/sys/net/ipv6/conf/{net.bridge}/disable_ipv6")
    if v6.exists() and v6.read_text().strip() != "1":
        v6.write_text("1\n")
        ch.add(f"bridge {net.bridge}: IPv6 off")
    if br.get("mtu") != net.mtu:
        sh("ip", "link", "set", "dev", net.bridge, "mtu", str(net.mtu))
        ch.add(f"bridge {net.bridge}: mtu {net.mtu}")
    # The bridge's own MAC, derived like a VM's: otherwise it follows its lowest port's MAC and
    # changes as taps come and go (VMs' ARP caches go stale), and other hosts could not know it.
    mac = mac_for(host.gateway)
    if br.get("address") != mac:
        sh("ip", "link", "set", "dev", net.bridge, "address", mac)
        ch.add(f"bridge {net.bridge}: address {mac}")
    want = f"{host.gateway}/{layout.prefixlen}"
    addrs = json.loads(sh("ip", "-j", "addr", "show", "dev", net.bridge).stdout or "[]")
    have = {f"{a['local']}/{a['prefixlen']}" for d in addrs for a in d.get("addr_info", []) if a.get("family") == "inet"}
    if want not in have:
        sh("ip", "addr", "add", want, "dev", net.bridge)
        ch.add(f"bridge {net.bridge}: address {want}")
    if "UP" not in br.get("flags", []):
        sh("ip", "link", "set", "dev", net.bridge, "up")
        ch.add(f"bridge {net.bridge} up")


def _ensure_vxlan(layout: SiteLayout, here: str, ch: Changes) -> None:
    net = layout.net
    host = layout.host(here)
    vx = link(net.vxlan_device)
    data = (vx or {}).get("linkinfo", {}).get("info_data", {})
    right = (vx is not None and vx.get("linkinfo", {}).get("info_kind") == "vxlan" and data.get("id") == net.vxlan_id
             and data.get("port") == net.vxlan_port and data.get("local") == host.underlay and not data.get("learning"))
    if vx is not None and not right:
        sh("ip", "link", "del", "dev", net.vxlan_device)
        ch.add(f"{net.vxlan_device}: removed (settings differ from the spec)")
        vx = None
    if vx is None:
        sh("ip", "link", "add", net.vxlan_device, "type", "vxlan", "id", str(net.vxlan_id), "local", host.underlay,
           "dstport", str(net.vxlan_port), "nolearning")
        ch.add(f"{net.vxlan_device}: VXLAN {net.vxlan_id} from {host.underlay} port {net.vxlan_port}")
        vx = link(net.vxlan_device)
    if vx.get("mtu") != net.mtu:
        sh("ip", "link", "set", "dev", net.vxlan_device, "mtu", str(net.mtu))
        ch.add(f"{net.vxlan_device}: mtu {net.mtu}")
    if vx.get("master") != net.bridge:
        sh("ip", "link", "set", "dev", net.vxlan_device, "master", net.bridge)
        ch.add(f"{net.vxlan_device}: on {net.bridge}")
    if "UP" not in vx.get("flags", []):
        sh("ip", "link", "set", "dev", net.vxlan_device, "up")
        ch.add(f"{net.vxlan_device} up")
    # Head-end replication: broadcast and unknown frames go to every other host by unicast.
    fdb = json.loads(sh("bridge", "-j", "fdb", "show", "dev", net.vxlan_device).stdout or "[]")
    have = {e["dst"] for e in fdb if e.get("mac") == "00:00:00:00:00:00" and "dst" in e}
    want = {h.underlay for h in layout.hosts if h.name != here}
    for peer in sorted(want - have):
        sh("bridge", "fdb", "append", "00:00:00:00:00:00", "dev", net.vxlan_device, "dst", peer)
        ch.add(f"{net.vxlan_device}: flood to {peer}")
    for peer in sorted(have - want):
        sh("bridge", "fdb", "del", "00:00:00:00:00:00", "dev", net.vxlan_device, "dst", peer)
        ch.add(f"{net.vxlan_device}: no longer floods to {peer}")
    # Unicast to a remote VM goes to its host alone. Without these entries (and with no learning)
    # every such frame went to every other host: with three hosts, twice the underlay bytes.
    placed = {e["mac"]: e["dst"] for e in fdb if e.get("mac") != "00:00:00:00:00:00" and "dst" in e}
    want_macs = layout.remote_macs(here)
    batch = [f"fdb replace {m} dev {net.vxlan_device} dst {d} self permanent"
             for m, d in sorted(want_macs.items()) if placed.get(m) != d]
    batch += [f"fdb del {m} dev {net.vxlan_device} dst {d} self" for m, d in sorted(placed.items()) if m not in want_macs]
    if batch:
        sh("bridge", "-batch", "-", stdin="\n".join(batch) + "\n")
        ch.add(f"{net.vxlan_device}: {len(batch)} static FDB entries set (each remote VM address to its host only)")


def _ensure_bridge_conf(bridge: str, ch: Changes) -> None:
    """qemu-bridge-helper (setuid root, or with CAP_NET_ADMIN) attaches a job user's tap only to a
    bridge this file allows. It takes no trailing comments: our line follows a marker line."""
    try:
        lines = BRIDGE_CONF.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    if f"allow {bridge}" not in lines:
        BRIDGE_CONF.parent.mkdir(parents=True, exist_ok=True)
        BRIDGE_CONF.write_text("\n".join([*lines, CONF_MARK, f"allow {bridge}"]) + "\n")
        ch.add(f"{BRIDGE_CONF}: allow {bridge}")


def _drop_bridge_conf(bridge: str, ch: Changes) -> None:
    """Our `allow` line (the one after our marker) goes; an operator's own lines stay."""
    try:
        lines = BRIDGE_CONF.read_text().splitlines()
    except FileNotFoundError:
        return
    kept: list[str] = []
    for line in lines:
        if line == f"allow {bridge}" and kept and kept[-1] == CONF_MARK:
            kept.pop()
            ch.add(f"{BRIDGE_CONF}: allow {bridge} removed")
            continue
        kept.append(line)
    if kept == lines:
        return
    if kept:
        BRIDGE_CONF.write_text("\n".join(kept) + "\n")
        return
    BRIDGE_CONF.unlink()
    try:  # up made the directory when it had to (Debian ships none); nothing else is in it
        BRIDGE_CONF.parent.rmdir()
    except OSError:
        pass


def publishing(spec: ClusterSpec) -> bool:
    return any(r.publish for r in spec.roles.values() if r.network == "site")


def _ensure_forwarding(spec: ClusterSpec, ch: Changes) -> None:
    """`publish:` needs the host to forward (to DNAT into the bridge); the ip salvus_pub table's
    forward chain keeps it from routing anything else into or out of the bridge."""
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    if publishing(spec) and fwd.read_text().strip() != "1":
        fwd.write_text("1\n")
        ch.add("net.ipv4.ip_forward = 1 (for publish:)")


def _ensure_rules(spec: ClusterSpec, layout: SiteLayout, here: str, ch: Changes, old: dict | None) -> str:
    text = rules.base_ruleset(spec, layout, here, bridge_meta=bridge_meta_supported())
    if publishing(spec):
        text += rules.publish_ruleset(layout, here)
    text_sum = hashlib.sha256(text.encode()).hexdigest()
    if old and old.get("rules_sum") == text_sum and old.get("rules_digest") == base_digest():
        return text_sum
    sh("nft", "-f", "-", stdin=text)
    ch.add(f"nftables: base rules of {here} applied")
    return text_sum


def up(spec: ClusterSpec, here: str) -> list[str]:
    """Makes this host's part of the site network match the spec; returns what it changed."""
    if os.geteuid() != 0:
        raise SpecError("network up: run as root (it creates the bridge, the VXLAN device and nftables rules)")
    layout = SiteLayout(spec)
    layout.host(here)
    old = read_host_state(here)
    ch = Changes()
    _ensure_bridge(spec, layout, here, ch)
    _ensure_vxlan(layout, here, ch)
    text_sum = _ensure_rules(spec, layout, here, ch, old)
    _ensure_forwarding(spec, ch)
    _ensure_bridge_conf(layout.net.bridge, ch)
    state = host_state(spec, layout, here)
    state.update(rules_sum=text_sum, rules_digest=base_digest())
    if old != state:
        write_host_state(here, state)
        lease_dir(here).mkdir(parents=True, exist_ok=True, mode=0o700)
        if old is not None:
            ch.add(f"{host_state_path(here)}: updated")
    if not bridge_meta_supported():
        log.warning("this kernel cannot match a frame's bridge (nft meta ibrname): the salvus rules "
                    "apply to every bridge of this host")
    return ch.done


def host_state(spec: ClusterSpec, layout: SiteLayout, here: str) -> dict:
    """All the root helper needs, so it never reads a job's spec."""
    h = layout.host(here)
    return {"host": here, "netns": netns_id(), "bridge": layout.net.bridge, "vxlan": layout.net.vxlan_device,
            "underlay": h.underlay,
            "mtu": layout.net.mtu, "prefixlen": layout.prefixlen, "gateway": str(h.gateway),
            "roles": {name: {"block": str(layout.block(name, h)),
                             "slots": [str(a) for a in layout.slots(name, h)],
                             "persistent": bool(role.persistent), "publish": list(role.publish)}
                      for name, role in spec.roles.items() if role.network == "site"}}


def down(spec: ClusterSpec, here: str) -> list[str]:
    """Removes this host's site network (running VMs lose it: stop them first)."""
    if os.geteuid() != 0:
        raise SpecError("network down: run as root")
    layout = SiteLayout(spec)
    layout.host(here)
    ch = Changes()
    for family, table in (("bridge", rules.TABLE), ("inet", rules.TABLE), ("ip", rules.PUB_TABLE)):
        if nft_json("table", family, table):
            sh("nft", "delete", "table", family, table)
            ch.add(f"nftables: table {family} {table} removed")
    for dev in (layout.net.vxlan_device, layout.net.bridge):
        if link(dev) is not None:
            sh("ip", "link", "del", "dev", dev)
            ch.add(f"{dev} removed")
    host_state_path(here).unlink(missing_ok=True)
    # Other hosts' state on this machine (the emulated site) may still need the line.
    still = any(json.loads(p.read_text()).get("bridge") == layout.net.bridge for p in run_dir().glob("*.json"))
    if not still:
        _drop_bridge_conf(layout.net.bridge, ch)
    return ch.done


def check_ready(bridge: str) -> bool:
    return Path(f"/sys/class/net/{bridge}/bridge").is_dir()


def check(spec: ClusterSpec, here: str) -> str | None:
    """What keeps this host from running site jobs, or None: the node health check (`network
    check`) for schedulers that cannot be told to avoid a host (PBS/Torque's $node_check_script,
    or Slurm's HealthCheckProgram through NHC). Read-only; the rules are
    compared only when run as root (nft needs it), as health checks are."""
    layout = SiteLayout(spec)
    layout.host(here)
    net = layout.net
    if not check_ready(net.bridge):
        return f"no site network bridge {net.bridge}"
    vx = link(net.vxlan_device)
    if vx is None or vx.get("master") != net.bridge or "UP" not in vx.get("flags", []):
        return f"VXLAN device {net.vxlan_device} missing, down or not on {net.bridge}"
    state = read_host_state(here)
    if state is None:
        return f"no host state {host_state_path(here)} (the root helper would refuse every VM)"
    if os.geteuid() == 0 and state.get("rules_digest") != base_digest():
        return "the nftables rules differ from what `network up` applied"
    return None

