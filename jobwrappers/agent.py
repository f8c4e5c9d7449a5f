"""The host side of the guest agent's reports (`guest/agent.sh`) on the host channel.

Besides `READY ROLE SERVICE_ID` (probe.py's HostChannel waits for it) the agent reports the guest's
SSH host public keys, `HOSTKEY TYPE BASE64` per key then `HOSTKEYS-DONE`, and `CLOUD-INIT-FINAL`.
A guest is not trusted to be well-behaved: a HOSTKEY line must match in full, name a known key type,
stay within bounds and carry key data of that type, or it is dropped with a warning.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from cluster.spec import check_ssh_public_key

log = logging.getLogger(__name__)

KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
MAX_KEYS = 8
# An RSA-16384 key is ~2.8 KiB of base64; nothing legitimate is longer.
_HOSTKEY_RE = re.compile(rf"HOSTKEY ({'|'.join(map(re.escape, KEY_TYPES))}) ([A-Za-z0-9+/]{{16,4096}}={{0,2}})")
DONE = "HOSTKEYS-DONE"
CLOUD_INIT_FINAL = "CLOUD-INIT-FINAL"


def parse_host_key(line: str) -> str | None:
    """`TYPE BASE64` from a well-formed HOSTKEY line, else None."""
    m = _HOSTKEY_RE.fullmatch(line)
    if not m:
        return None
    key = f"{m[1]} {m[2]}"
    try:
        check_ssh_public_key(key)
    except ValueError:
        return None
    return key


@dataclass
class GuestReports:
    """What the agent has said so far, line by line."""

    pending_keys: list[str] = field(default_factory=list)
    host_keys: str = ""  # set once HOSTKEYS-DONE arrives: "TYPE BASE64" lines
    keys_changed: bool = False  # host_keys set since the wrapper last recorded them
    cloud_init_final: bool = False

    def take(self, line: str) -> None:
        if line.startswith("HOSTKEY "):
            key = parse_host_key(line)
            if key is None:
                log.warning("guest sent a malformed HOSTKEY line (%d bytes); ignored", len(line))
            elif len(self.pending_keys) >= MAX_KEYS:
                log.warning("guest sent more than %d host keys; the rest are ignored", MAX_KEYS)
            elif key not in self.pending_keys:
                self.pending_keys.append(key)
        elif line == DONE:
            self.host_keys = "\n".join(self.pending_keys)
            self.pending_keys = []
            self.keys_changed = True
            log.info("guest reported %d SSH host key(s)", len(self.host_keys.splitlines()))
        elif line == CLOUD_INIT_FINAL:
            self.cloud_init_final = True
            log.info("guest: cloud-init's final stage is done")
        elif line and not line.startswith("READY"):
            log.debug("guest line ignored: %.80r", line)
