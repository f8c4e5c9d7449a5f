"""The cluster spec: one YAML file (`cluster.yaml`) describing the site, as validated dataclasses.

Validation is pydantic's (dataclasses with `extra='forbid'` and strict scalar types, the shared types
and YAML loader of `cluster.yamlmodel`) so that every error carries the field path; `load_spec` turns
the first error into one line naming the file, the path (`roles.sage.vcpus`) and what was expected.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import field_validator, model_validator
from pydantic.dataclasses import dataclass

from cluster.errors import DataError, SpecError
from cluster.files import read_limited
from cluster.store import DEFAULT_STORE, Store
from cluster.yamlmodel import STRICT, ImageRef, Name, NonNegativeInt, PositiveInt, SchedulerWord, SingleLine
from cluster.yamlmodel import full_match, is_name, is_single_line
from cluster.yamlmodel import load_yaml, validate_document
from cluster.yamlmodel import split_image_ref  # noqa: F401 - callers take it from here with the spec

SPEC_ENV = "SALVUS_SPEC"
DEFAULT_SPEC_NAME = "cluster.yaml"
MAX_SPEC_BYTES = 1 << 20

Port = Annotated[StrictInt, Field(ge=1, le=65535)]
# A timeout or interval: finite (`.inf` would make sleep() and deadlines overflow) and at most a
# year, far beyond any real wait, so every deadline computed from it is an ordinary float.
MAX_SECONDS = 365 * 86400
Seconds = Annotated[StrictInt | StrictFloat, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)]
# Services per role, in the spec and on `scale`'s command line: far beyond any site, small enough
# that a typo (an extra digit run) is refused instead of submitting millions of jobs.
MAX_ROLE_COUNT = 10_000
RoleCount = Annotated[StrictInt, Field(ge=0, le=MAX_ROLE_COUNT)]
# The longest validity an endorser may give a signed index (catalogue sign --expires).
MAX_INDEX_LIFETIME_DAYS = 3650
# Slurm's time forms (sbatch --time): MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_WALLTIME_RE = re.compile(r"(?:(?P<days>[0-9]{1,5})-)?(?P<clock>[0-9]{1,7}(?::[0-9]{1,2}){0,2})")
WALLTIME_WHAT = "a Slurm time: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 7-00:00:00)"


def parse_walltime(text: str) -> int:
    """A Slurm-style time limit in seconds; ValueError (saying the forms) for anything else, so
    each backend renders its own form (PBS HH:MM:SS, HTCondor and SGE seconds) from real numbers."""
    m = _WALLTIME_RE.fullmatch(text)
    if not m:
        raise ValueError(f"expected {WALLTIME_WHAT}, got {text!r}")
    fields = [int(f) for f in m["clock"].split(":")]
    if m["days"] is not None:  # D-HH[:MM[:SS]]
        hours, minutes, secs = fields + [0] * (3 - len(fields))
        if hours > 23:
            raise ValueError(f"expected {WALLTIME_WHAT}: hours after 'D-' must be below 24, got {text!r}")
        seconds = int(m["days"]) * 86400 + hours * 3600 + minutes * 60 + secs
    else:  # MINUTES, MM:SS or HH:MM:SS
        hours, minutes, secs = ([0, fields[0], 0], [0, *fields], fields)[len(fields) - 1]
        seconds = hours * 3600 + minutes * 60 + secs
    if any(f > 59 for f in fields[1:]):
        raise ValueError(f"expected {WALLTIME_WHAT}: minutes and seconds must be below 60, got {text!r}")
    if seconds <= 0:
        raise ValueError(f"expected a time limit above zero (leave walltime unset for none), got {text!r}")
    return seconds


def _walltime(v: str) -> str:
    parse_walltime(v)
    return v


Walltime = Annotated[StrictStr, AfterValidator(_walltime)]

# One OpenSSH public key line: TYPE BASE64 [COMMENT]; no options (command=, from=, ...), no newline.
_SSH_KEY_RE = re.compile(r"(?P<type>[a-z0-9][a-z0-9.@-]{0,63}) (?P<blob>[A-Za-z0-9+/]{16,16384}={0,2})"
                         r"(?: [^\x00-\x1f\x7f]{0,256})?")


def check_ssh_public_key(v: str) -> str:
    """`v` if it is exactly one OpenSSH public key line (what authorized_keys and cloud-init get)."""
    m = _SSH_KEY_RE.fullmatch(v)
    what = "one OpenSSH public key line 'TYPE BASE64 [COMMENT]' (no options, no newline)"
    if not m:
        raise ValueError(f"expected {what}, got {v[:40]!r}{'...' if len(v) > 40 else ''}")
    try:
        blob = base64.b64decode(m["blob"], validate=True)
    except binascii.Error:
        raise ValueError(f"expected {what}: the key is not valid base64") from None
    inner = blob[4:4 + int.from_bytes(blob[:4], "big")] if len(blob) > 4 else b""
    if inner != m["type"].encode():
        raise ValueError(f"expected {what}: the key data is not a {m['type']} key")
    try:
        load_ssh_public_key(f"{m['type']} {m['blob']}".encode())
    except UnsupportedAlgorithm:
        pass  # a type this cryptography cannot load (security-key types): the type check above holds
    except ValueError:
        raise ValueError(f"expected {what}: the {m['type']} key data is malformed") from None
    return v


SshPublicKey = Annotated[StrictStr, AfterValidator(check_ssh_public_key)]
KeyspaceName = full_match(r"[a-z][a-z0-9_]{0,47}", "a keyspace name ([a-z][a-z0-9_]*, at most 48 characters)")


MIN_UEFI_MEMORY_MB = 192


@dataclass(config=STRICT)
class DiskSpec:
    """A persistent disk kept under `persistent/SERVICE_ID/NAME.qcow2`; it survives the job."""

    name: Name
    size_mb: PositiveInt
    # Guest mount point; informational for real images, used by the demo guest's init.
    mount: StrictStr = "/data"


@dataclass(config=STRICT)
class BootSpec:
    """Direct kernel boot (the demo image); real images boot from their own disk via firmware.

    `kernel` and `initrd` are each a catalogue entry NAME@VERSION (resolved like `image`: the store's
    images/base/NAME-VERSION.raw, signed hash, approval, for this role) or, only with
    `catalogue.insecure_allow_unsigned`, a file path (`boot_ref` tells them apart: a value with a
    '/' or without an '@' is a path)."""

    kernel: StrictStr
    initrd: Optional[StrictStr] = None
    cmdline: StrictStr = "console=ttyS0 root=/dev/vda rw rootfstype=ext4 panic=-1 quiet"


@dataclass(config=STRICT)
class ProbeSpec:
    """How the wrapper confirms a booted guest's service answers: connect to the forwarded port,
    send `send` (may be empty), and require bytes back (containing `expect` when it is set)."""

    send: StrictStr = ""
    expect: StrictStr = ""
    timeout: Seconds = 5


UserName = full_match(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}", "a user name ([A-Za-z_][A-Za-z0-9_.-]*)")


@dataclass(config=STRICT)
class AllowSpec:
    """One `roles.R.allow` entry: VMs of role `from` may connect to R's VMs on these TCP ports
    (`all`: every port and protocol)."""

    from_: Annotated[StrictStr, Field(alias="from")]
    ports: Annotated[list[Port], Field(min_length=1)] | Literal["all"]


@dataclass(config=STRICT)
class RoleSpec:
    image: ImageRef  # NAME@VERSION, resolved in the store as images/base/NAME-VERSION.qcow2
    port: Port  # the service port inside the guest
    vcpus: PositiveInt = 1
    memory_mb: Annotated[StrictInt, Field(ge=96)] = 160
    disk_mb: NonNegativeInt = 2048  # scratch the job asks the scheduler for (overlay growth)
    count: RoleCount = 0  # desired number of running services
    # "site": a tap on the hypervisor's site bridge, an address of the role's block (README "The
    # site network"); "user": QEMU's user-mode networking and one host port forward.
    network: Literal["user", "bridge", "site"] = "user"
    bridge: Optional[StrictStr] = None
    # network: site only. Who may connect to this role's VMs (nothing but the site's hosts, to
    # `port`, without an entry), and guest ports forwarded from the hypervisor's own address.
    allow: list[AllowSpec] = dataclasses.field(default_factory=list)
    publish: list[Port] = dataclasses.field(default_factory=list)
    # An explicit image file instead of the store (demo, development). Trust checks still apply
    # when the catalogue section is configured.
    image_path: Optional[StrictStr] = None
    boot: Optional[BootSpec] = None
    # Without `boot:` the image boots its own bootloader and kernel: SeaBIOS, or OVMF with `uefi`
    # (README "Firmware boot and direct boot").
    firmware: Literal["bios", "uefi"] = "bios"
    persistent: list[DiskSpec] = dataclasses.field(default_factory=list)
    # Role-specific settings passed to the guest through the config drive.
    config: dict[StrictStr, Any] = dataclasses.field(default_factory=dict)
    # Hypervisors a job of this role must run on (cassandra: where its persistent disk lives).
    hosts: list[SchedulerWord] = dataclasses.field(default_factory=list)
    # Roles whose registered endpoints the guest is given, and kept up to date (the hub: [sage]).
    upstreams: list[StrictStr] = dataclasses.field(default_factory=list)
    probe: ProbeSpec = dataclasses.field(default_factory=ProbeSpec)
    # How the wrapper learns the guest is up (README "Your own images"): `agent` waits for the
    # salvus agent's (or the demo guest's) READY on the host channel, `cloud-init-final` for the
    # agent's CLOUD-INIT-FINAL, `probe` only polls the probe (a guess, for images with neither).
    readiness: Literal["agent", "probe", "cloud-init-final"] = "agent"
    # Override hypervisor.boot_timeout / stop_timeout for this role (a real userland under TCG is
    # slower to boot and to power off than the demo guest).
    boot_timeout: Optional[Seconds] = None
    stop_timeout: Optional[Seconds] = None
    # Run by the guest agent (as root, by /bin/sh) after it wrote a new /etc/salvus/upstreams.
    reload: Optional[SingleLine] = None
    # `salvus_jobs ssh`/`exec` log in as this user (default: Debian's cloud-init user, `debian`), with
    # this private key (default: ssh-agent, then ~/.ssh/id_*).
    ssh_user: Optional[UserName] = None
    ssh_key_file: Optional[SingleLine] = None
    # Succession and rolling upgrades (README "Succession and upgrades"): a VM being replaced is
    # deregistered, serves what it has for drain_seconds, then stops; an upgrade replaces max_surge
    # VMs at a time and halts after max_failures new VMs failed to become healthy.
    drain_seconds: Annotated[StrictInt | StrictFloat, Field(ge=0, le=3600, allow_inf_nan=False)] = 10
    max_surge: Annotated[StrictInt, Field(ge=1, le=MAX_ROLE_COUNT)] = 1
    max_failures: Annotated[StrictInt, Field(ge=1, le=1000)] = 2

    @model_validator(mode="after")
    def _bridge_named(self) -> "RoleSpec":
        if self.network == "bridge" and not self.bridge:
            raise ValueError("network 'bridge' needs 'bridge: BRIDGE_NAME'")
        if self.network != "site" and (self.allow or self.publish):
            raise ValueError("allow and publish apply to 'network: site' roles only")
        if self.boot is not None and self.firmware == "uefi":
            raise ValueError("firmware 'uefi' applies to images booted by firmware: remove 'boot:' "
                             "(direct kernel boot starts the kernel without firmware) or the firmware")
        if self.firmware == "uefi" and self.memory_mb < MIN_UEFI_MEMORY_MB:
            raise ValueError(f"firmware 'uefi' needs memory_mb >= {MIN_UEFI_MEMORY_MB} (OVMF itself "
                             f"takes memory: with 128 it crashed loading the bootloader)")
        return self

    @property
    def image_name(self) -> str:
        return split_image_ref(self.image)[0]

    @property
    def image_version(self) -> str:
        return split_image_ref(self.image)[1]


# A host name or address for the login node: no spaces, no leading '-' (never an ssh option).
HostName = full_match(r"[A-Za-z0-9_.:\[\]-]+", "a host name or address", 253)
EnvName = full_match(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")


@dataclass(config=STRICT)
class LoginSpec:
    """The cluster's login node: submit from a workstation, with every scheduler client command
    run there over one SSH connection (`cluster/ssh.py`). Host keys come only from `known_hosts`."""

    host: HostName
    user: Optional[UserName] = None  # default: this user's name
    port: Port = 22
    # The private key (default: ssh-agent, then ~/.ssh/id_*); an encrypted key needs the agent.
    key_file: Optional[SingleLine] = None
    known_hosts: SingleLine = "~/.ssh/known_hosts"
    # Set before every command on the login node (e.g. SLURM_CONF): no secrets here, the remote
    # shell's command line carries them.
    env: dict[EnvName, SingleLine] = dataclasses.field(default_factory=dict)
    # One shell line run before every command, e.g. "module load slurm" or ". /etc/profile".
    profile: Optional[SingleLine] = None
    connect_timeout: Seconds = 15


HypervisorName = full_match(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}", "a host name or address (letters, digits, "
                            "'_', '.', ':', '-'; not starting with '-' or '.')")
IpAddress = full_match(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f:.]{2,45}", "an IPv4 or IPv6 address")


def _ip_address(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))  # the canonical form, as peers' addresses are compared
    except ValueError:
        raise ValueError(f"expected an IPv4 or IPv6 address, got {v!r}") from None


def _ipv4_network(v: str) -> str:
    try:
        return str(ipaddress.IPv4Network(v, strict=True))
    except ValueError as e:
        raise ValueError(f"expected an IPv4 network such as 10.77.0.0/16 (no host bits set), got {v!r}: {e}") from None


@dataclass(config=STRICT)
class HostSpec:
    """One hypervisor of the site: the one place per-host facts live (README "Image distribution").
    In `hypervisor.hosts` a bare name stands for `{name: NAME}`."""

    name: HypervisorName  # what the host calls itself: hypervisor.advertise_host, else its hostname
    # The address it reaches the origin from; the origin derives the host's stripe from it (and,
    # with imgdist.tracker_hosts_only, admits only listed addresses). Default: the name when it is one.
    address: Optional[Annotated[IpAddress, AfterValidator(_ip_address)]] = None
    # network: site: this host's part of site_network.subnet (e.g. 10.77.1.0/24); its VMs' addresses
    # come from it, so no two hosts ever hand out the same one.
    vm_range: Optional[Annotated[StrictStr, AfterValidator(_ipv4_network)]] = None

    @property
    def ip(self) -> str | None:
        """`address`, else the name when it is an address, else None (the origin can't place it)."""
        if self.address is not None:
            return self.address
        try:
            return str(ipaddress.ip_address(self.name))
        except ValueError:
            return None


InterfaceName = full_match(r"[A-Za-z][A-Za-z0-9_-]{0,14}", "a network interface name (a letter, then letters, "
                           "digits, '_' or '-'; at most 15 characters)")
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8


@dataclass(config=STRICT)
class SiteNetworkSpec:
    """`network: site` (README "The site network"): one bridge per hypervisor, the bridges joined by
    VXLAN over the site's hosts, VM addresses from each host's `vm_range`."""

    subnet: Annotated[StrictStr, AfterValidator(_ipv4_network)]
    bridge: InterfaceName = "salvusbr0"
    vxlan_device: InterfaceName = "salvusvx0"
    vxlan_id: Annotated[StrictInt, Field(ge=1, le=(1 << 24) - 1)] = 4242
    vxlan_port: Port = 4789
    # The site network's MTU; guests get this minus VXLAN's 50 bytes.
    underlay_mtu: Annotated[StrictInt, Field(ge=1330, le=9216)] = 1500
    # Addresses per role per host: at most this many VMs of one role on one hypervisor at once.
    role_block: Literal[4, 8, 16, 32, 64, 128] = 16
    # QEMU's tap maker for job users who are not root (setuid root, or with CAP_NET_ADMIN).
    bridge_helper: SingleLine = "/usr/lib/qemu/qemu-bridge-helper"

    @property
    def mtu(self) -> int:
        return self.underlay_mtu - VXLAN_OVERHEAD


def _host_entry(v: Any) -> Any:
    if isinstance(v, str):
        return {"name": v}
    if not isinstance(v, dict):
        raise ValueError(f"expected a host name or a mapping {{name, address}}, got {type(v).__name__}")
    return v


# Backends that run client commands through `submit/runner.py`, so a login node can run them.
LOGIN_BACKENDS = ("slurm", "pbs")


@dataclass(config=STRICT)
class SchedulerSpec:
    """Every string here reaches a job script, a directive, a submit description or a scheduler
    client's arguments: single lines only, names as plain words, the walltime parsed."""

    backend: Literal["local", "slurm", "pbs", "condor", "drmaa"] = "local"
    queue: Optional[SchedulerWord] = None  # Slurm partition, PBS/SGE queue
    account: Optional[SchedulerWord] = None
    walltime: Optional[Walltime] = None  # e.g. "7-00:00:00"; unlimited when unset
    # Extra lines copied verbatim into rendered job descriptions (site policy): `#SBATCH ...`/`#PBS
    # ...` (a bare `-option` gets the backend's prefix), `key = value` for HTCondor.
    extra_directives: list[SingleLine] = dataclasses.field(default_factory=list)
    # Where job logs go (relative paths are relative to the spec file).
    log_dir: Optional[SingleLine] = None
    # HTCondor: schedd name and collector; unset means the local schedd.
    schedd: Optional[SingleLine] = None
    collector: Optional[SingleLine] = None
    # DRMAA native specification appended to every job template.
    native_spec: Optional[SingleLine] = None
    max_retries: NonNegativeInt = 5
    # salvus-vmjob as execute nodes see it; default the one installed beside this Python.
    wrapper: Optional[SingleLine] = None
    # HTCondor: extra `requirements` ANDed with the image/hypervisor match (site policy).
    requirements: Optional[SingleLine] = None
    # Jobs ask for a host that advertises the role's image (imgdist classad / slurm-features):
    # Slurm --constraint, PBS -l proc, HTCondor requirements. false: any host may pull at boot.
    require_image: StrictBool = True
    # Directory of the scheduler's client commands (sbatch, qsub, ...); default: found on PATH.
    bin_dir: Optional[SingleLine] = None
    # DRMAA: the scheduler's libdrmaa (default $DRMAA_LIBRARY_PATH, else Grid Engine's on Debian).
    drmaa_library: Optional[SingleLine] = None
    # Submit from this machine through the cluster's login node (slurm, pbs).
    login: Optional[LoginSpec] = None
    # The account whose jobs are this site's (with the site's job names): a backend lists, counts
    # and cancels only its jobs, never another user's look-alikes. Default: the account that
    # submits (the login node's user with `login`, else this process's effective user).
    submit_user: Optional[UserName] = None

    @model_validator(mode="after")
    def _login_backend(self) -> "SchedulerSpec":
        why = {"drmaa": "DRMAA needs its library on the submitting host: run salvus_jobs on the login node",
               "condor": "HTCondor is driven by its Python bindings: name the cluster's schedd with "
                         "scheduler.schedd and scheduler.collector instead",
               "local": "the local backend runs jobs on this machine"}
        if self.login is not None and self.backend not in LOGIN_BACKENDS:
            raise ValueError(f"login is not supported with backend {self.backend!r} ({why[self.backend]})")
        if self.login is not None and not self.wrapper:
            # The default (the one installed beside this Python) is a path on the workstation.
            raise ValueError("login needs 'wrapper': the path of salvus-vmjob on the execute nodes")
        return self


@dataclass(config=STRICT)
class CassandraTlsSpec:
    """TLS to the nodes: each node's certificate must chain to `ca_file` and name the address the
    driver connects to (or `server_hostname` for every node); `cert_file` + `key_file` (PEM) are
    presented when the cluster requires client certificates."""

    ca_file: StrictStr
    cert_file: Optional[StrictStr] = None
    key_file: Optional[StrictStr] = None  # unencrypted PEM, readable by its owner only
    check_hostname: StrictBool = True
    server_hostname: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _pair(self) -> "CassandraTlsSpec":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (give both or neither)")
        if self.server_hostname is not None and not self.check_hostname:
            raise ValueError("server_hostname is the name checked: it needs check_hostname: true")
        return self


@dataclass(config=STRICT)
class CassandraSpec:
    contact_points: Annotated[list[StrictStr], Field(min_length=1)]
    port: Port = 9042
    keyspace: KeyspaceName = "salvus"
    replication: dict[StrictStr, StrictStr | StrictInt] = dataclasses.field(
        default_factory=lambda: {"class": "SimpleStrategy", "replication_factor": 1})
    consistency: StrictStr = "LOCAL_QUORUM"
    local_dc: Optional[StrictStr] = None
    request_timeout: Seconds = 1.0
    connect_timeout: Seconds = 5.0
    username: Optional[StrictStr] = None
    # The password is read from this file, never from the spec or the command line; the file
    # must be readable by its owner only.
    password_file: Optional[StrictStr] = None
    tls: Optional[CassandraTlsSpec] = None

    @field_validator("consistency")
    @classmethod
    def _consistency(cls, v: str) -> str:
        levels = ("ONE", "TWO", "THREE", "QUORUM", "ALL", "LOCAL_QUORUM", "EACH_QUORUM", "LOCAL_ONE")
        if v.upper() not in levels:
            raise ValueError(f"expected a consistency level ({', '.join(levels)})")
        return v.upper()


@dataclass(config=STRICT)
class RegistrySpec:
    sqlite: Optional[StrictStr] = None  # path; default STORE/state/registry.sqlite
    cassandra: Optional[CassandraSpec] = None
    ttl: Annotated[StrictInt, Field(ge=1)] = 30  # seconds a service stays live without a heartbeat
    heartbeat_interval: Seconds = 10

    @model_validator(mode="after")
    def _one_backend(self) -> "RegistrySpec":
        if self.sqlite is not None and self.cassandra is not None:
            raise ValueError("give either 'sqlite' or 'cassandra', not both")
        if self.heartbeat_interval >= self.ttl:
            raise ValueError(f"heartbeat_interval ({self.heartbeat_interval}) must be shorter than "
                             f"ttl ({self.ttl}) or live services would expire")
        return self

    @property
    def backend(self) -> str:
        return "cassandra" if self.cassandra is not None else "sqlite"


QemuCpuModel = full_match(r"[a-z][a-z0-9_.-]*", "a QEMU CPU model name such as max or qemu64", 40)


@dataclass(config=STRICT)
class TcgSpec:
    """QEMU's emulator settings, used only where KVM can't run guests."""

    # A QEMU CPU model (`qemu-system-x86_64 -cpu help`); "max" is every feature TCG emulates.
    cpu: QemuCpuModel = "max"
    # The translation cache per VM. QEMU's default (1 GiB per VM) caps a host at a few VMs; 16 MiB
    # thrashes on a real userland (the Debian guest reached sshd in 297 s, 129 s with 32, 121 s
    # with 64: README "Benchmarks"). The demo guest doesn't mind either way.
    tb_size_mb: Annotated[StrictInt, Field(ge=1, le=2048)] = 64


@dataclass(config=STRICT)
class OvmfSpec:
    """UEFI firmware for `firmware: uefi` (Debian's `ovmf`): the code is shared read-only, the
    variable store is a template each VM gets its own copy of, in the job's scratch."""

    code: StrictStr = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    vars: StrictStr = "/usr/share/OVMF/OVMF_VARS_4M.fd"


@dataclass(config=STRICT)
class HypervisorSpec:
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    # "auto": libvirt when a daemon answers, else plain QEMU; "never": plain QEMU; else a URI.
    libvirt: StrictStr = "auto"
    domain_template: Optional[StrictStr] = None  # site override of the libvirt domain XML
    # Fits a real cloud-init guest under TCG: registered at ~245 s alone on a 2-core host, ~360 s
    # two at once (README "Your own images"); roles may override.
    boot_timeout: Seconds = 600
    # SIGTERM -> the guest powered off by ACPI, else destroyed. The wrapper asks the scheduler for
    # this plus its clean-up as the SIGTERM -> SIGKILL grace; roles may override.
    stop_timeout: Seconds = 20
    tcg: TcgSpec = dataclasses.field(default_factory=TcgSpec)
    ovmf: OvmfSpec = dataclasses.field(default_factory=OvmfSpec)
    # Address recorded in the registry for forwarded ports; default this host's name.
    advertise_host: Optional[StrictStr] = None
    # A guest's console log past this is cut, its last MiBs kept in LOG.1 (jobwrappers/consolelog.py):
    # a chatty guest must not fill the file system of the store.
    console_log_max_mb: Annotated[StrictInt, Field(ge=1, le=1 << 20)] = 16
    # The site's hypervisors, each a name or {name, address}: imgdist's stripes and the tracker's
    # allowlist come from here (README "Image distribution").
    hosts: list[Annotated[HostSpec, BeforeValidator(_host_entry)]] = dataclasses.field(default_factory=list)

    @field_validator("hosts")
    @classmethod
    def _unique_names(cls, v: list[HostSpec]) -> list[HostSpec]:
        seen: dict[str, int] = {}
        for i, h in enumerate(v):
            if h.name in seen:
                raise ValueError(f"{h.name!r} is listed twice (entries {seen[h.name]} and {i}); "
                                 "a host's position in the list is its stripe")
            seen[h.name] = i
        return v

    @property
    def host_names(self) -> list[str]:
        return [h.name for h in self.hosts]


@dataclass(config=STRICT)
class TrustSpec:
    keys: list[StrictStr] = dataclasses.field(default_factory=list)  # endorser public key files
    threshold: PositiveInt = 1

    @model_validator(mode="after")
    def _threshold(self) -> "TrustSpec":
        if self.keys and self.threshold > len(self.keys):
            raise ValueError(f"threshold {self.threshold} exceeds the {len(self.keys)} keys given")
        return self


@dataclass(config=STRICT)
class CatalogueSpec:
    url: Optional[StrictStr] = None  # the origin serving index.yaml, its signature and images
    trust: TrustSpec = dataclasses.field(default_factory=TrustSpec)
    max_index_bytes: PositiveInt = 16 << 20
    # An index valid for longer than this (expires - issued) is refused: a stolen old index must
    # not stay replayable for decades.
    max_index_lifetime_days: Annotated[StrictInt, Field(ge=1, le=MAX_INDEX_LIFETIME_DAYS)] = 400
    # Skip the trust checks (development only; the wrapper logs a warning at every boot).
    insecure_allow_unsigned: StrictBool = False


@dataclass(config=STRICT)
class ImgdistSpec:
    listen_port: Port = 6881
    interval: Seconds = 60
    stall_timeout: Seconds = 60
    peers: list[StrictStr] = dataclasses.field(default_factory=list)  # host:port, besides the origin's list
    keep_versions: NonNegativeInt = 2
    # Announce URL of the origin's tracker (`imgdist --origin`), e.g. http://origin:6969/announce.
    tracker: Optional[StrictStr] = None
    # Origin only: its upload rate in bytes/s, shared among the hosts pulling in proportion to what
    # each still lacks of its own stripe (0 = no pacing).
    origin_upload_rate: NonNegativeInt = 0
    listen_ip: StrictStr = "0.0.0.0"
    # Bytes kept free on the store's file system besides the image being pulled.
    reserve_mb: NonNegativeInt = 64
    # Origin only: the tracker answers only addresses of hypervisor.hosts (every entry needs one).
    tracker_hosts_only: StrictBool = False


# HOST:PORT a controller's status server binds (an IPv6 literal in brackets).
ListenAddress = full_match(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}", "HOST:PORT such as 127.0.0.1:9108", 300)


@dataclass(config=STRICT)
class ControllerSpec:
    """`salvus_jobs controller` (README "The controller")."""

    interval: Seconds = 5  # seconds between reconciliations
    lease: Annotated[StrictInt, Field(ge=2, le=3600)] = 10  # seconds the lease lasts unless renewed
    listen: ListenAddress = "127.0.0.1:9108"  # status and metrics over HTTP; port 0: none
    unhealthy_after: PositiveInt = 3  # consecutive failed probes that make a service unhealthy
    probe_concurrency: PositiveInt = 16
    probe_timeout: Seconds = 5  # cap on each probe (the role's probe.timeout when shorter)
    max_submit: PositiveInt = 10  # jobs submitted per cycle at most
    cancel_after: PositiveInt = 2  # cycles a surplus must persist before jobs are cancelled
    events: PositiveInt = 50  # recent events /status shows
    # Walltime succession: a successor is submitted when a job's time to its earliest signal drops
    # below the role's lead time: the p95 of submit-to-healthy over the last lead_samples jobs (at
    # least lead_floor seconds), plus the role's drain_seconds and two intervals.
    lead_floor: Seconds = 120
    lead_samples: PositiveInt = 20

    @model_validator(mode="after")
    def _lease_outlasts_a_cycle(self) -> "ControllerSpec":
        if self.lease <= self.interval:
            raise ValueError(f"lease ({self.lease}) must be longer than interval ({self.interval}) "
                             "or the controller would lose it between cycles")
        port = int(self.listen.rpartition(":")[2])
        if port > 65535:
            raise ValueError(f"listen: port {port} is above 65535")
        return self


@dataclass(config=STRICT)
class ClusterSpec:
    roles: dict[StrictStr, RoleSpec]
    # Tags every job (`SITE.ROLE`) and names its script files: a name like a role's.
    site: Name = "salvus"
    store: StrictStr = DEFAULT_STORE
    scheduler: SchedulerSpec = dataclasses.field(default_factory=SchedulerSpec)
    registry: RegistrySpec = dataclasses.field(default_factory=RegistrySpec)
    hypervisor: HypervisorSpec = dataclasses.field(default_factory=HypervisorSpec)
    catalogue: CatalogueSpec = dataclasses.field(default_factory=CatalogueSpec)
    imgdist: ImgdistSpec = dataclasses.field(default_factory=ImgdistSpec)
    controller: ControllerSpec = dataclasses.field(default_factory=ControllerSpec)
    site_network: Optional[SiteNetworkSpec] = None
    ssh_keys: list[SshPublicKey] = dataclasses.field(default_factory=list)  # public keys for guests
    # Absolute path of the file this spec was loaded from (set by load_spec, not by YAML).
    source: StrictStr = ""

    @field_validator("roles")
    @classmethod
    def _role_names(cls, v: dict[str, RoleSpec]) -> dict[str, RoleSpec]:
        for name in v:
            if not is_name(name):
                raise ValueError(f"role name {name!r}: expected [a-z][a-z0-9_-]*")
        return v

    @model_validator(mode="after")
    def _hosts_have_addresses(self) -> "ClusterSpec":
        if self.imgdist.tracker_hosts_only:
            if not self.hypervisor.hosts:
                raise ValueError("imgdist.tracker_hosts_only needs hypervisor.hosts (with addresses)")
            for i, h in enumerate(self.hypervisor.hosts):
                if h.ip is None:
                    raise ValueError(f"hypervisor.hosts[{i}] ({h.name}) has no address: with "
                                     "imgdist.tracker_hosts_only the tracker would refuse it (add 'address')")
        return self

    @model_validator(mode="after")
    def _site_network(self) -> "ClusterSpec":
        site_roles = [n for n, r in self.roles.items() if r.network == "site"]
        for name, r in self.roles.items():
            for i, a in enumerate(r.allow):
                if a.from_ not in self.roles:
                    raise ValueError(f"roles.{name}.allow[{i}].from: no role {a.from_!r} in this spec")
        if not site_roles:
            return self
        net = self.site_network
        if net is None:
            raise ValueError(f"roles.{site_roles[0]}: network 'site' needs a site_network section (subnet)")
        subnet = ipaddress.IPv4Network(net.subnet)
        if not self.hypervisor.hosts:
            raise ValueError("network 'site' needs hypervisor.hosts, each with address and vm_range")
        ranges: list[tuple[ipaddress.IPv4Network, int]] = []
        for i, h in enumerate(self.hypervisor.hosts):
            where = f"hypervisor.hosts[{i}] ({h.name})"
            if h.ip is None or h.vm_range is None:
                raise ValueError(f"{where}: network 'site' needs 'address' (its site LAN address, the "
                                 f"VXLAN endpoint) and 'vm_range' (its part of {subnet})")
            vr = ipaddress.IPv4Network(h.vm_range)
            if not vr.subnet_of(subnet):
                raise ValueError(f"{where}: vm_range {vr} is not inside site_network.subnet {subnet}")
            for other, j in ranges:
                if vr.overlaps(other):
                    raise ValueError(f"{where}: vm_range {vr} overlaps hypervisor.hosts[{j}]'s {other}")
            # Block 0 holds the host's own address on the bridge; role k has block k + 1.
            blocks = vr.num_addresses // net.role_block
            if blocks < len(self.roles) + 1:
                raise ValueError(f"{where}: vm_range {vr} holds {blocks} blocks of site_network.role_block "
                                 f"{net.role_block}: the host's own and one per role need {len(self.roles) + 1}")
            ranges.append((vr, i))
        return self

    def role(self, name: str) -> RoleSpec:
        try:
            return self.roles[name]
        except KeyError:
            raise SpecError(f"{self.source}: roles.{name}: no such role "
                            f"(the spec defines: {', '.join(sorted(self.roles)) or 'none'})") from None

    def boot_timeout(self, role: str) -> float:
        r = self.role(role)
        return r.boot_timeout if r.boot_timeout is not None else self.hypervisor.boot_timeout

    def stop_timeout(self, role: str) -> float:
        r = self.role(role)
        return r.stop_timeout if r.stop_timeout is not None else self.hypervisor.stop_timeout

    @property
    def store_path(self) -> Path:
        return Path(self.store)

    @property
    def sqlite_path(self) -> Path:
        return Path(self.registry.sqlite) if self.registry.sqlite else Store(self.store_path).runtime.registry_sqlite


def resolve_spec_path(arg: str | None) -> Path:
    """--spec FILE, else ./cluster.yaml when it exists, else $SALVUS_SPEC."""
    if arg:
        return Path(arg)
    local = Path(DEFAULT_SPEC_NAME)
    if local.exists():
        return local
    env = os.environ.get(SPEC_ENV)
    if env:
        return Path(env)
    raise SpecError(f"no spec: pass --spec FILE, create ./{DEFAULT_SPEC_NAME}, or set ${SPEC_ENV}")


def load_spec(arg: str | Path | None = None) -> ClusterSpec:
    path = resolve_spec_path(str(arg) if arg else None)
    try:
        raw = read_limited(path, MAX_SPEC_BYTES, what="spec")
    except DataError as e:
        raise SpecError(str(e)) from None
    return parse_spec(raw, path)


def parse_spec(raw: bytes | str, path: Path) -> ClusterSpec:
    data = load_yaml(raw, str(path), SpecError)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of sections (roles, scheduler, registry, ...), "
                        f"got {type(data).__name__}")
    if "source" in data:
        raise SpecError(f"{path}: source: unknown key (it is set from the file name)")
    base = path.resolve().parent
    if not is_single_line(str(path.resolve())):
        # The spec's own path is baked into job scripts and submit descriptions.
        raise SpecError(f"{str(path)!r}: the spec's path must be a single line (no newline or control character)")
    spec = validate_document(ClusterSpec, {**data, "source": str(path.resolve())}, str(path), SpecError,
                             internal=("source",))
    return _absolutize(spec, base)


def boot_ref(value: str) -> tuple[str, str] | None:
    """(NAME, VERSION) when a boot.kernel/boot.initrd value names a catalogue entry, None for a path."""
    if "/" in value:
        return None
    try:
        return split_image_ref(value)
    except ValueError:
        return None


def _abs(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    return str((base / os.path.expanduser(p)).resolve()) if not p.startswith("/") else p


def _absolutize(spec: ClusterSpec, base: Path) -> ClusterSpec:
    """Relative paths in a spec are relative to the spec file, so jobs can run from anywhere."""
    spec.store = _abs(base, spec.store) or spec.store
    spec.registry.sqlite = _abs(base, spec.registry.sqlite)
    if spec.registry.cassandra:
        spec.registry.cassandra.password_file = _abs(base, spec.registry.cassandra.password_file)
        tls = spec.registry.cassandra.tls
        if tls:
            tls.ca_file = _abs(base, tls.ca_file) or tls.ca_file
            tls.cert_file, tls.key_file = _abs(base, tls.cert_file), _abs(base, tls.key_file)
    spec.hypervisor.domain_template = _abs(base, spec.hypervisor.domain_template)
    ovmf = spec.hypervisor.ovmf
    ovmf.code, ovmf.vars = _abs(base, ovmf.code) or ovmf.code, _abs(base, ovmf.vars) or ovmf.vars
    spec.scheduler.log_dir = _abs(base, spec.scheduler.log_dir)
    if spec.scheduler.login:
        # This machine's files, unlike the paths the login node sees (store, log_dir, wrapper).
        login = spec.scheduler.login
        login.key_file = _abs(base, login.key_file)
        login.known_hosts = _abs(base, login.known_hosts) or login.known_hosts
    spec.catalogue.trust.keys = [_abs(base, k) or k for k in spec.catalogue.trust.keys]
    for role in spec.roles.values():
        role.image_path = _abs(base, role.image_path)
        role.ssh_key_file = _abs(base, role.ssh_key_file)
        if role.boot:
            if boot_ref(role.boot.kernel) is None:
                role.boot.kernel = _abs(base, role.boot.kernel) or role.boot.kernel
            if role.boot.initrd and boot_ref(role.boot.initrd) is None:
                role.boot.initrd = _abs(base, role.boot.initrd)
    return spec
