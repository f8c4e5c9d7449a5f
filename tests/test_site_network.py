"""The site network on an emulated site of three hypervisors (network namespaces joined by VXLAN
over a shared LAN bridge, tests/fixtures/site_lab.py): real `network up`, real kernel bridges,
VXLAN and nftables, real demo guests under plain QEMU (TCG), one wrapper per VM in its host's
namespace. Slow: a multi-host network (the suite's convention)."""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal

import pytest

from cluster import unfit
from cluster.registry import open_registry
from cluster.spec import load_spec
from jobwrappers.sitenet.layout import SiteLayout, mac_for
from jobwrappers.sitenet.state import lease_dir
from tests.fixtures.site_lab import BIN, JOB_UID, JobUserKit
from tests.polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.vm]


def state_of(site, i: int) -> dict:
    """Everything `network up` touches on host i, without what the kernel changes by itself
    (counters, timers, carrier state, IPv6 DAD on the underlay)."""
    def run(*argv: str) -> object:
        return json.loads(site.run_in(i, *argv, check=True).stdout or "[]")

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()
                    if k not in ("counter", "stats64", "stats", "tentative", "operstate") and not k.endswith("_timer")}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj
    return strip({"links": run("ip", "-j", "-d", "link", "show"), "addrs": run("ip", "-j", "addr", "show"),
                  # The VXLAN device's own entries (the bridge's learned ones follow traffic).
                  "fdb": [e for e in run("bridge", "-j", "fdb", "show", "dev", "salvusvx0") if "master" not in e],
                  "rules": run("nft", "-j", "list", "ruleset")})


def differences(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def drops(site, i: int, chain: str) -> int:
    """Packets the `counter drop` rules of `chain` on host i have dropped."""
    total = 0
    for item in site.ruleset(i)["nftables"]:
        rule = item.get("rule")
        if rule and rule["chain"] == chain:
            for e in rule["expr"]:
                if "counter" in e and {"drop": None} in rule["expr"]:
                    total += e["counter"]["packets"]
    return total


def reach_line(site, service_id: str, target: str) -> str:
    """The demo guest's `salvus-reach TARGET ...` console line (waits for it)."""
    def line():
        for text in site.console(service_id).splitlines():
            # The console's root shell may have printed its prompt first on the same line.
            if f"salvus-reach {target} " in text:
                return text[text.index("salvus-reach "):]
        return None
    return wait_for(line, 60, f"{service_id} to try {target}")


def test_network_up_twice_changes_nothing_and_the_overlay_port_admits_only_site_hosts(site):
    before = [state_of(site, i) for i in (1, 2, 3)]
    for i in (1, 2, 3):
        proc = site.network(i)
        assert proc.returncode == 0 and "nothing changed" in proc.stdout, proc.stdout + proc.stderr
    after = [state_of(site, i) for i in (1, 2, 3)]
    assert after == before, differences(before, after)
    # Head-end replication: each host floods to exactly the two others.
    fdb = before[0]["fdb"]
    assert sorted(e["dst"] for e in fdb if e["mac"] == "00:00:00:00:00:00") == ["198.18.9.2", "198.18.9.3"]
    # ... and sends unicast for a remote VM address to that VM's host alone.
    layout = SiteLayout(load_spec(site.spec_path))
    static = {e["mac"]: e["dst"] for e in fdb if e["mac"] != "00:00:00:00:00:00"}
    assert static == layout.remote_macs("h1") and len(static) == 2 * (1 + 3 * 16)
    assert static[mac_for(layout.slots("sage", layout.host("h2"))[0])] == "198.18.9.2"
    # A stranger on the site LAN (not in hypervisor.hosts) sending to the VXLAN port is dropped.
    site.python_in(0, "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                      "for _ in range(3): s.sendto(b'x' * 50, ('198.18.9.2', 4789))")
    rules = [r["rule"] for r in site.ruleset(2)["nftables"] if "rule" in r and r["rule"]["family"] == "inet"]
    udp = [e["counter"]["packets"] for r in rules for e in r["expr"] if "counter" in e
           and "4789" in json.dumps(r["expr"]) and "198.18.9.1" in json.dumps(r["expr"])]
    assert udp == [3]


def test_a_host_without_the_bridge_is_marked_unfit_until_network_up(site):
    """Host 3 loses its set-up (no VMs on it yet): a site job there exits 75 and marks it unfit in
    the registry; `network up` puts the network back and lifts the mark. `network check`, the node
    health check, says so too."""
    spec = load_spec(site.spec_path)
    assert site.network(3, "check").returncode == 0
    assert site.network(3, "down").returncode == 0
    try:
        check = site.network(3, "check")
        assert check.returncode == 75 and check.stdout.startswith("ERROR salvus: h3: no site network bridge salvusbr0"), \
            check.stdout + check.stderr
        run = site.wrapper(3, "sage", "sage-unfit")
        assert run.proc.wait(60) == 75, run.output()
        with open_registry(spec) as registry:
            assert [u.host for u in unfit.read(spec, registry)] == ["h3"]
    finally:
        proc = site.network(3)
    assert proc.returncode == 0, proc.stderr
    assert "h3: unfit mark cleared in the registry" in proc.stdout, proc.stdout
    assert site.network(3, "check").stdout == "h3: site network ready\n"
    # A rule lost since (an operator's `nft flush`, another tool's table) is found too.
    site.run_in(3, "nft", "flush", "chain", "inet", "salvus", "input", check=True)
    check = site.network(3, "check")
    assert check.returncode == 75 and "nftables rules differ" in check.stdout, check.stdout
    assert site.network(3).returncode == 0 and site.network(3, "check").returncode == 0
    with open_registry(spec) as registry:
        assert unfit.read(spec, registry) == []


@pytest.fixture(scope="module")
def sage(site):
    """One sage VM on host 2, registered at its own site address."""
    run = site.wrapper(2, "sage", "sage-2")
    svc = run.registered()
    return run, svc


def test_hub_on_host_1_reaches_sage_on_host_2_and_sage_refuses_other_roles(site, sage):
    _, sage_svc = sage
    assert sage_svc.hypervisor == "h2" and sage_svc.port == 6000
    assert ipaddress.ip_address(sage_svc.host) in ipaddress.ip_network("10.78.2.16/28")  # sage's block on h2
    hub = site.wrapper(1, "hub", "hub-1")
    hub_svc = hub.registered()
    assert hub_svc.hypervisor == "h1" and ipaddress.ip_address(hub_svc.host) in ipaddress.ip_network("10.78.1.32/28")
    # An operator on host 3 reaches the hub's service port over the overlay; the hub, on host 1,
    # forwards to the sage on host 2 at the sage's registered address.
    wait_for(lambda: sage_svc.endpoint in site.ask(3, hub_svc.host, 8080, "GET / HTTP/1.0\r\n\r\n"), 30,
             "the hub to learn the sage")
    reply = site.ask(3, hub_svc.host, 8080, "GET /compute?expr=6*7 HTTP/1.0\r\n\r\n")
    assert reply.startswith("HTTP/1.0 200") and reply.endswith("\r\n\r\n42\n"), reply
    # publish: [8080]: the world (a LAN machine that is no site host) reaches the hub on host 1's
    # own address, and nothing else: not the VM's address, not the sage.
    reply = site.ask(0, "198.18.9.1", 8080, "GET / HTTP/1.0\r\n\r\n")
    assert reply.startswith("HTTP/1.0 200") and '"service_id":"hub-1"' in reply, reply
    site.run_in(0, "ip", "route", "replace", "10.78.0.0/16", "via", "198.18.9.1", check=True)
    assert site.ask(0, hub_svc.host, 8080, "GET / HTTP/1.0\r\n\r\n", timeout=3) == ""
    assert site.ask(0, sage_svc.host, 6000, "1+1\n", timeout=3) == ""
    # A sage VM (host 3) and a cassandra VM (host 1) try the sage's port: nothing answers them.
    probe_spec = site.variant("sage-prober", sage_extra=", upstreams: [sage], config: {reach: true}")
    before = drops(site, 3, "to_sage") + drops(site, 1, "to_sage")
    site.wrapper(3, "sage", "sage-3", spec=probe_spec).registered()
    site.wrapper(1, "cassandra", "cassandra-1").registered()
    assert reach_line(site, "sage-3", sage_svc.endpoint).endswith(" no-answer")
    assert reach_line(site, "cassandra-1", sage_svc.endpoint).endswith(" no-answer")
    # Dropped at the sending host's bridge by the sage's chain (the same rules on every host).
    assert drops(site, 3, "to_sage") + drops(site, 1, "to_sage") > before
    assert ask_sage(site, 1, sage_svc) == "2\n"  # and the host still reaches it (operators, probes)


def ask_sage(site, i, svc) -> str:
    return site.ask(i, svc.host, svc.port, "1+1\n")


def test_a_bulk_transfer_crosses_the_overlay_at_the_set_mtu(site, sage):
    """2 MiB from host 3 to the sage on host 2 through `salvus_jobs ssh` (the registry's endpoint:
    the VM's address, port 22, the host key the guest reported): full-size segments through VXLAN,
    the guest's NIC and its tap at the underlay's 1500 minus 50."""
    _, svc = sage
    data = base64.b64encode(os.urandom(3 << 19)).decode()  # 2 MiB of text
    host_1_got = underlay_rx_bytes(site, 1)
    proc = site.run_in(3, str(BIN / "salvus_jobs"), "ssh", svc.service_id, "--spec", str(site.spec_path),
                       "-l", "root", "-i", str(site.key_file), "--", "wc -c; cat /sys/class/net/eth0/mtu",
                       input=data, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == [str(len(data)), "1450"], proc.stdout + proc.stderr
    assert {d["mtu"] for d in json.loads(site.run_in(2, "ip", "-j", "link", "show", "type", "tun").stdout)} == {1450}
    # Host 1 is not on the path: the static FDB entries keep the flood (head-end replication) off
    # its link. Before them it received a copy of every frame, 2.8 MiB here.
    assert underlay_rx_bytes(site, 1) - host_1_got < len(data) // 10


def underlay_rx_bytes(site, i: int) -> int:
    return json.loads(site.run_in(i, "ip", "-j", "-s", "link", "show", "dev", "eth0", check=True).stdout)[0]["stats64"]["rx"]["bytes"]


def test_a_vm_under_another_vms_ip_or_mac_gets_nothing_through(site, sage):
    """Two cassandra VMs try the sage as the hub (whom the sage admits): one with the hub block's
    address, one with that address's MAC. The tap's own rules drop every frame (ARP included)."""
    _, sage_svc = sage
    hub_ip = "10.78.1.33"
    runs = {}
    for kind, value in (("ip", hub_ip), ("mac", mac_for(hub_ip))):
        spec = site.variant(f"spoof-{kind}", cassandra_config=f"{{reach: true, spoof: '{kind}:{value}'}}")
        runs[kind] = site.wrapper(3, "cassandra", f"spoof-{kind}", spec=spec)
    for kind, run in runs.items():
        run.registered()
        line = reach_line(site, f"spoof-{kind}", sage_svc.endpoint)
        assert line.endswith(f" no-answer spoof={kind}:{hub_ip if kind == 'ip' else mac_for(hub_ip)}"), line
    vm_drops = sum(drops(site, 3, c) for c in
                   {item["chain"]["name"] for item in site.ruleset(3)["nftables"]
                    if "chain" in item and item["chain"]["name"].startswith("vm_")})
    assert vm_drops > 0, "the spoofed frames must be dropped by the VMs' own chains"
    for run in runs.values():
        assert run.terminate() == 0


def test_three_cassandra_vms_on_three_hosts_reach_each_other_on_a_second_port(site):
    """`allow: [{from: cassandra, ports: all}]`: a ring across the overlay, on 7000 (the demo's
    stand-in for gossip) besides the service port."""
    spec = site.variant("ring", cassandra_upstreams="[cassandra]",
                        cassandra_config="{reach: true, reach_port: 7000, gossip_port: 7000}")
    runs = [site.wrapper(i, "cassandra", f"ring-{i}", spec=spec) for i in (1, 2, 3)]
    ring = [run.registered() for run in runs]
    assert sorted(svc.hypervisor for svc in ring) == ["h1", "h2", "h3"]
    for me in ring:
        for other in ring:
            if other is not me:
                line = reach_line(site, me.service_id, f"{other.host}:7000")
                assert line.endswith(" answered"), (me.service_id, line)
    for run in runs:
        assert run.terminate() == 0


def test_sigkill_of_a_wrapper_leaves_no_tap_and_no_rules(site):
    taps, rules = site.taps(3), site.vm_rules(3)  # the other tests' VMs still on host 3
    run = site.wrapper(3, "hub", "hub-k")
    run.registered()
    # Its chain, its tap in vm_ports and vm_ifs, its published port in the two publish maps.
    assert len(site.taps(3)) == len(taps) + 1 and len(site.vm_rules(3)) == len(rules) + 5
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(10)
    # QEMU dies with its wrapper (PDEATHSIG); the helper's watcher removes the rules it bound.
    wait_for(lambda: site.taps(3) == taps and site.vm_rules(3) == rules, 20, "hub-k's tap and rules to go")
    leases = [json.loads(p.read_text()) for p in lease_dir("h3").glob("*.json")]
    assert "hub-k" not in [x["service_id"] for x in leases]  # a hub keeps no address: not persistent


def test_a_job_user_who_is_not_root_gets_its_tap_and_rules_from_the_helpers(site):
    """The wrapper as nobody: the tap from a setuid qemu-bridge-helper (bridge.conf allows the site
    bridge), the address and rules from salvus-nethelper through `sudo -n`; its own store."""
    kit = JobUserKit.make(site.image, site.ssh_key)
    try:
        run = site.wrapper(1, "sage", "sage-nobody", spec=kit.spec_path, kit=kit)
        line = wait_for(lambda: next((x for x in run.err.read_text().splitlines() if "registered sage-nobody at" in x),
                                     None) if run.proc.poll() is None else run.output(), 150, "sage-nobody to register")
        assert "registered sage-nobody at 10.78.1." in line, line
        ip = line.split(" at ")[1].split(":")[0]
        qemu = run.qemu_pids()
        assert len(qemu) == 1 and os.stat(f"/proc/{qemu[0]}").st_uid == JOB_UID
        lease = json.loads((lease_dir("h1") / f"{ip}.json").read_text())
        assert (lease["uid"], lease["state"], lease["service_id"]) == (JOB_UID, "attached", "sage-nobody")
        assert site.ask(2, ip, 6000, "1+1\n") == "2\n"  # an operator on host 2, over the overlay
        assert run.terminate() == 0, run.output()
        assert rules_gone(site, 1, ip)
    finally:
        kit.remove()


def rules_gone(site, i: int, ip: str) -> bool:
    return not any(ip.replace(".", "_") in r or ip in r for r in site.vm_rules(i))
