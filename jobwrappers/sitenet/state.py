"""Host-local state of the site network: what `network up` set up (read by the root helper, never
taken from a job's spec) and the VMs' address leases. Root-owned; one file per host name, so the
emulated site's namespaces on one machine keep theirs apart."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cluster.errors import TempFailure
from cluster.files import write_atomic_text

# One directory for tests (both trees under it); the defaults are volatile runtime state (the
# bridge is gone after a reboot too) and leases that survive a reboot (persistent roles' addresses).
DIR_ENV = "SALVUS_NET_DIR"
RUN_DIR = Path("/run/salvus-net")
LIB_DIR = Path("/var/lib/salvus-net")


def _test_dir() -> Path | None:
    """$SALVUS_NET_DIR, never under sudo or setuid: a job user must not point the helper at state
    of its own (sudo's env_reset drops it anyway; a site's env_keep must not bring it back)."""
    if os.environ.get(DIR_ENV) and "SUDO_UID" not in os.environ and os.getuid() == os.geteuid():
        return Path(os.environ[DIR_ENV])
    return None


def run_dir() -> Path:
    base = _test_dir()
    return base / "run" if base else RUN_DIR


def lease_dir(host: str) -> Path:
    base = _test_dir()
    return (base / "lib" if base else LIB_DIR) / host


def netns_id() -> int:
    """This process's network namespace (its inode): a host's state is used only inside it."""
    return os.stat("/proc/self/ns/net").st_ino


def host_state_path(host: str) -> Path:
    return run_dir() / f"{host}.json"


def write_host_state(host: str, state: dict) -> None:
    run_dir().mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic_text(host_state_path(host), json.dumps(state, indent=1, sort_keys=True) + "\n", 0o644)


def read_host_state(host: str) -> dict | None:
    try:
        return json.loads(host_state_path(host).read_text())
    except FileNotFoundError:
        return None


def current_host_state() -> dict:
    """The state `network up` wrote for the host whose namespace this is."""
    me = netns_id()
    try:
        entries = sorted(run_dir().glob("*.json"))
    except OSError:
        entries = []
    for p in entries:
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if st.get("netns") == me:
            return st
    raise TempFailure("no site network on this host: run `salvus_jobs network up --spec SPEC` as root here")
