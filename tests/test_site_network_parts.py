"""The site network's parts without VMs: the spec's refusals, address derivation, the rules as the
kernel's nftables checks them, the config drive's network-config, and the wrapper on a host
without the bridge (75, naming the command, and the host marked unfit in the registry) or under a
name the spec doesn't list (78)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import unfit
from cluster.errors import SpecError
from cluster.registry import open_registry
from cluster.spec import load_spec, parse_spec
from jobwrappers.configdrive import GuestConfig, network_config
from jobwrappers.sitenet import rules
from jobwrappers.sitenet.layout import SiteLayout, mac_for
from tests.fixtures.demo_image import WRAPPER
from tests.fixtures.site_lab import site_spec_text

HOSTS = "hypervisor: {hosts: [{name: a, address: 192.0.2.1, vm_range: 10.9.1.0/24}, " \
        "{name: b, address: 192.0.2.2, vm_range: 10.9.2.0/24}]}\n"
NET = "site_network: {subnet: 10.9.0.0/16}\n"
ROLES = ("roles:\n  sage: {image: demo@1, port: 6000, network: site, allow: [{from: hub, ports: [6000]}]}\n"
         "  hub: {image: demo@1, port: 8080, network: site}\n")


def spec(text: str, tmp_path: Path):
    return parse_spec(text, tmp_path / "cluster.yaml")


@pytest.mark.parametrize("text,expected", [
    (HOSTS + ROLES, "roles.sage: network 'site' needs a site_network section"),
    (NET + ROLES, "network 'site' needs hypervisor.hosts"),
    ("hypervisor: {hosts: [{name: a, vm_range: 10.9.1.0/24}]}\n" + NET + ROLES,
     "hypervisor.hosts[0] (a): network 'site' needs 'address'"),
    (HOSTS.replace("10.9.2.0/24", "10.8.2.0/24") + NET + ROLES, "vm_range 10.8.2.0/24 is not inside site_network.subnet"),
    (HOSTS.replace("10.9.2.0/24", "10.9.1.128/25") + NET + ROLES, "overlaps hypervisor.hosts[0]'s 10.9.1.0/24"),
    (HOSTS.replace("10.9.2.0/24", "10.9.2.0/28") + NET + ROLES, "holds 1 blocks of site_network.role_block 16"),
    (HOSTS.replace("10.9.2.0/24", "10.9.2.1/24") + NET + ROLES, "hypervisor.hosts[1].vm_range: "),
    (HOSTS + NET + ROLES.replace("from: hub", "from: hubs"), "roles.sage.allow[0].from: no role 'hubs'"),
    (HOSTS + NET + ROLES.replace("ports: [6000]", "ports: some"), "roles.sage.allow[0].ports"),
    (HOSTS + NET + "roles:\n  hub: {image: demo@1, port: 8080, publish: [8080]}\n",
     "allow and publish apply to 'network: site' roles only"),
    (HOSTS + "site_network: {subnet: 10.9.0.0/16, bridge: 'br0; drop'}\n" + ROLES, "site_network.bridge"),
])
def test_site_network_spec_refusals(text, expected, tmp_path):
    with pytest.raises(SpecError) as e:
        spec(text, tmp_path)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_addresses_are_derived_per_host_and_role_without_overlap(tmp_path):
    s = spec(HOSTS + NET + ROLES, tmp_path)
    layout = SiteLayout(s)
    a, b = layout.host("a"), layout.host("b")
    assert (str(a.gateway), str(b.gateway)) == ("10.9.1.1", "10.9.2.1")
    assert layout.role_cidrs("sage") == ["10.9.1.16/28", "10.9.2.16/28"]
    assert layout.role_cidrs("hub") == ["10.9.1.32/28", "10.9.2.32/28"]
    every = [ip for h in (a, b) for r in ("sage", "hub") for ip in layout.slots(r, h)]
    assert len(every) == len(set(every)) == 4 * 16
    assert not {a.gateway, b.gateway} & set(every)
    assert len({mac_for(ip) for ip in every}) == len(every) and mac_for("10.9.1.16") == "02:53:0a:09:01:10"
    with pytest.raises(SpecError, match="hypervisor.hosts: no entry 'c'"):
        layout.host("c")
    # Host a's static FDB: each of b's addresses (its bridge's and its role blocks') to b only.
    remote = layout.remote_macs("a")
    assert remote == {mac_for(ip): b.underlay for ip in [b.gateway] + every[32:]} and len(remote) == 33


def test_a_subnet_broadcast_address_is_never_a_vm_address(tmp_path):
    text = ("hypervisor: {hosts: [{name: a, address: 192.0.2.1, vm_range: 10.9.255.240/28}]}\n"
            "site_network: {subnet: 10.9.0.0/16, role_block: 4}\n" + ROLES
            + "  cas: {image: demo@1, port: 9042, network: site}\n")
    layout = SiteLayout(spec(text, tmp_path))
    assert [str(a) for a in layout.slots("cas", layout.host("a"))] == ["10.9.255.252", "10.9.255.253", "10.9.255.254"]


def test_the_rules_pass_the_kernels_own_check(tmp_path):
    """`nft -c` (check only, nothing applied) in a namespace of its own, with the devices named."""
    s = spec(HOSTS + NET + ROLES, tmp_path)
    text = rules.base_ruleset(s, SiteLayout(s), "a", bridge_meta=False)
    text += rules.attach_rules("tap7", "10.9.1.17", mac_for("10.9.1.17"))
    ns = f"sntc{abs(hash(str(tmp_path))) % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], input=text, text=True,
                              capture_output=True)
        assert proc.returncode == 0, proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    assert 'tcp dport { 6000 } accept' in text and "ip saddr { 10.9.1.32/28, 10.9.2.32/28 }" in text
    with pytest.raises(ValueError):
        rules.attach_rules('tap0" accept', "10.9.1.17", mac_for("10.9.1.17"))


def test_network_config_v2_names_the_leased_mac_address_and_mtu():
    cfg = GuestConfig(service_id="sage-0", role="sage", hostname="sage-0", port=6000, instance_id="i",
                      address="10.9.1.16/16", mac="02:53:0a:09:01:10", mtu=1450)
    doc = yaml.safe_load(network_config(cfg))
    nic = doc["ethernets"]["site0"]
    assert doc["version"] == 2 and nic["match"] == {"macaddress": "02:53:0a:09:01:10"}
    assert (nic["addresses"], nic["mtu"], nic["dhcp4"], nic["accept-ra"]) == (["10.9.1.16/16"], 1450, False, False)
    assert "gateway4" not in nic and "routes" not in nic
    env = cfg.env()
    assert (env["SALVUS_NET_ADDRESS"], env["SALVUS_NET_MTU"]) == ("10.9.1.16/16", "1450")


def run_wrapper_in(ns: str, spec_path: Path, hypervisor: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, WRAPPER, "--spec", str(spec_path), "--role", "sage",
                           "--service-id", "sage-x", "--hypervisor", hypervisor], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TMPDIR": str(tmp_path), "SALVUS_NET_DIR": str(tmp_path / "net")})


def test_a_host_without_the_bridge_exits_75_naming_the_command(demo_image, tmp_path):
    spec_path = tmp_path / "cluster.yaml"
    spec_path.write_text(site_spec_text(demo_image, tmp_path / "store"))
    ns = f"sntb{abs(hash(str(tmp_path))) % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = run_wrapper_in(ns, spec_path, "h2", tmp_path)
        assert proc.returncode == 75, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last == (f"salvus-vmjob: h2: no site network bridge salvusbr0: run `salvus_jobs network up "
                        f"--spec {spec_path} --host h2` as root on this host"), proc.stderr
        proc = run_wrapper_in(ns, spec_path, "h9", tmp_path)
        assert proc.returncode == 78 and "hypervisor.hosts: no entry 'h9'" in proc.stderr, proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    assert not (tmp_path / "store" / "state" / "jobs" / "sage-x.json").exists()
    # The host is marked unfit, so submissions place site jobs elsewhere (test_unfit_hosts.py).
    spec = load_spec(spec_path)
    with open_registry(spec) as registry:
        [mark] = unfit.read(spec, registry)
    assert (mark.host, mark.reason) == ("h2", last.removeprefix("salvus-vmjob: "))
