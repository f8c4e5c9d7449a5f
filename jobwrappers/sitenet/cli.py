"""`salvus_jobs network up | down`: a hypervisor's part of the site network (root, once per host)."""
from __future__ import annotations

import argparse

from cluster.spec import load_spec
from jobwrappers.sitenet import host
from jobwrappers.sitenet.layout import host_identity


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("network", parents=[common], help="set up or remove this host's site network (root)",
                       description="The site network (roles with network: site): this hypervisor's bridge, "
                                   "its VXLAN link to the other hosts of hypervisor.hosts and the base "
                                   "nftables rules. Idempotent: what already matches the spec is left alone.")
    nsub = p.add_subparsers(dest="network_command", metavar="COMMAND", required=True)
    for name, what in (("up", "create or correct this host's bridge, VXLAN and rules"),
                       ("down", "remove them (stop this host's VMs first)")):
        q = nsub.add_parser(name, parents=[common], help=what, description=what,
                            epilog=f"example: salvus_jobs network {name} --spec /etc/salvus/cluster.yaml --host hv1")
        q.add_argument("--host", help="this host's entry in hypervisor.hosts (default $SALVUS_HYPERVISOR, "
                                      "$SLURMD_NODENAME, then the hostname)")
        q.set_defaults(func=cmd_network)


def cmd_network(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    here = host_identity(args.host)
    done = (host.up if args.network_command == "up" else host.down)(spec, here)
    for line in done:
        print(line)
    if not done:
        print(f"{here}: site network already {'as the spec says' if args.network_command == 'up' else 'absent'}; "
              "nothing changed")
    return 0
