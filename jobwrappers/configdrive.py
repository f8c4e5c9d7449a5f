"""The NoCloud config drive (ISO9660, volume label `cidata`) a guest configures itself from.

`meta-data` and `user-data` are what cloud-init's NoCloud datasource reads, so a real cloud image
picks up its hostname, SSH keys and `/etc/salvus/service.json` by itself, and installs the salvus
guest agent (`guest/agent.sh`, POSIX sh) from `bootcmd`: cloud-init's first stage, long before
`runcmd` (its final stage, ~150 s under TCG). Two extra files serve
guests without cloud-init (the demo image's busybox init): `salvus.env`, shell-quoted assignments,
and `authorized_keys`. The ISO is built with genisoimage, so no mount and no root are needed.
"""
from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import SpecError, TempFailure
from cluster.files import out_of_space
from cluster.yamlmodel import is_single_line

LABEL = "cidata"
AGENT = Path(__file__).with_name("guest") / "agent.sh"
AGENT_PATH = "/usr/local/sbin/salvus-agent"
AGENT_ENV = "/etc/salvus/agent.env"
AGENT_UNIT = "salvus-agent"


@dataclass
class GuestConfig:
    service_id: str
    role: str
    hostname: str
    port: int  # the service port inside the guest
    instance_id: str
    upstreams: list[str] = field(default_factory=list)  # host:port as the guest reaches them
    disks: dict[str, str] = field(default_factory=dict)  # persistent disk name -> mount point
    ssh_keys: list[str] = field(default_factory=list)
    role_config: dict[str, Any] = field(default_factory=dict)
    reload: str = ""  # the role's reload command, run by the agent after an UPSTREAMS update
    # network: site: the VM's static address (ADDRESS/PREFIX), its MAC and the MTU; empty for
    # user-mode networking (the guest takes slirp's fixed addresses).
    address: str = ""
    mac: str = ""
    mtu: int = 0

    def service_json(self) -> dict[str, Any]:
        return {"service_id": self.service_id, "role": self.role, "port": self.port,
                "upstreams": self.upstreams, "disks": self.disks, "config": self.role_config}

    def env(self) -> dict[str, str]:
        env = {
            "SALVUS_HOSTNAME": self.hostname,
            "SALVUS_SERVICE_ID": self.service_id,
            "SALVUS_ROLE": self.role,
            "SALVUS_PORT": str(self.port),
            "SALVUS_UPSTREAMS": " ".join(self.upstreams),
            "SALVUS_DISKS": " ".join(f"{n}:{m}" for n, m in self.disks.items()),
            "SALVUS_DATA": next(iter(self.disks.values()), ""),
            "SALVUS_RELOAD": self.reload,
        }
        if self.address:
            env.update(SALVUS_NET_ADDRESS=self.address, SALVUS_NET_MAC=self.mac, SALVUS_NET_MTU=str(self.mtu))
        for key, value in self.role_config.items():
            if isinstance(value, (str, int, float, bool)) and re.fullmatch(r"[A-Za-z0-9_]+", key):
                env[f"SALVUS_CONFIG_{key.upper()}"] = str(value)
        return env


def hostname_for(service_id: str) -> str:
    """A valid hostname (RFC 1123 label) from a service id."""
    name = re.sub(r"[^a-z0-9-]+", "-", service_id.lower()).strip("-")[:63].strip("-")
    return name or "salvus-guest"


def env_file(cfg: GuestConfig) -> str:
    """Shell-quoted assignments, sourced by the demo guest's init and by the agent."""
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in cfg.env().items())


def agent_bootcmd(cfg: GuestConfig) -> str:
    """One `bootcmd` entry: writes the agent and its settings (base64, so nothing in them meets the
    shell's quoting), then starts it as a transient systemd unit (it outlives cloud-init), or
    detached where there is no systemd. bootcmd runs at every boot: a running agent is kept.
    The unit has no default dependencies and systemd-run does not wait: cloud-init.service runs
    before sysinit.target, which a default transient service is ordered after (a deadlock)."""
    agent = base64.b64encode(AGENT.read_bytes()).decode()
    env = base64.b64encode(env_file(cfg).encode()).decode()
    return (f"mkdir -p /etc/salvus /usr/local/sbin && chmod 755 /etc/salvus && umask 077"
            f" && echo {env} | base64 -d > {AGENT_ENV}"
            f" && echo {agent} | base64 -d > {AGENT_PATH} && chmod 700 {AGENT_PATH}"
            f" && if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then"
            f" systemctl is-active -q {AGENT_UNIT} || systemd-run --no-block --quiet --unit={AGENT_UNIT}"
            f" -p DefaultDependencies=no /bin/sh {AGENT_PATH};"
            f" else (setsid /bin/sh {AGENT_PATH} </dev/null >/dev/null 2>&1 &); fi")


def user_data(cfg: GuestConfig) -> str:
    doc: dict[str, Any] = {
        "bootcmd": [agent_bootcmd(cfg)],
        "hostname": cfg.hostname,
        "preserve_hostname": False,
        # The hostname in /etc/hosts (127.0.1.1), as cloud images have it: sudo resolves it.
        "manage_etc_hosts": "localhost",
        "write_files": [{"path": "/etc/salvus/service.json", "permissions": "0644",
                         "content": json.dumps(cfg.service_json(), indent=2) + "\n"}],
    }
    if cfg.ssh_keys:
        doc["ssh_authorized_keys"] = list(cfg.ssh_keys)
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def network_config(cfg: GuestConfig) -> str:
    """cloud-init network-config v2 (NoCloud reads it from the drive): the leased address on the NIC
    with the leased MAC, no gateway (the site network is one link; nothing routes off it)."""
    doc = {"version": 2, "ethernets": {"site0": {
        "match": {"macaddress": cfg.mac}, "set-name": "eth0", "dhcp4": False, "dhcp6": False,
        "accept-ra": False, "addresses": [cfg.address], "mtu": cfg.mtu}}}
    return yaml.safe_dump(doc, sort_keys=False)


def authorized_keys(keys: list[str]) -> str:
    """One line per key. The spec allows only single-line OpenSSH public keys (cluster.spec); a key
    with a line break would add an authorized_keys line of its own (`command=...`), so it is refused
    here too, whoever built the GuestConfig."""
    for i, key in enumerate(keys):
        if not is_single_line(key) or not key.strip():
            raise SpecError(f"ssh_keys[{i}]: expected one OpenSSH public key line, got {key[:40]!r}")
    return "".join(k.strip() + "\n" for k in keys)


def build_config_drive(dest: Path, cfg: GuestConfig) -> Path:
    files = {
        "meta-data": yaml.safe_dump({"instance-id": cfg.instance_id, "local-hostname": cfg.hostname},
                                    sort_keys=False),
        "user-data": user_data(cfg),
        "salvus.env": env_file(cfg),
        "authorized_keys": authorized_keys(cfg.ssh_keys),
    }
    if cfg.address:
        files["network-config"] = network_config(cfg)
    with tempfile.TemporaryDirectory(prefix="cidata-", dir=dest.parent) as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        try:
            proc = subprocess.run(["genisoimage", "-quiet", "-output", str(dest), "-volid", LABEL,
                                   "-joliet", "-rock", tmp], capture_output=True, text=True)
        except OSError as e:
            raise SpecError(f"cannot run genisoimage: {e.strerror} (install genisoimage: scripts/setup)") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        raise (TempFailure if out_of_space(detail) else SpecError)(f"genisoimage: {detail}")
    return dest
