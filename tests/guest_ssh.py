"""Logging into a real test guest: a fresh key pair for the spec's `ssh_keys`, and a command run
as the image's cloud-init user (the key went in through the config drive)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cluster.registry import Service


def new_key(path: Path | None = None) -> paramiko.Ed25519Key:
    """A fresh key; with `path`, also written there (OpenSSH format, 0600) for commands that read
    a key file (`salvus_jobs ssh -i`)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    if path is not None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


def spec_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()} test@salvus"


def ssh_run(svc: Service, key: paramiko.PKey, command: str, user: str = "debian") -> str:
    """`command`'s standard output. Host keys are not what these tests check here (the real-guest
    tests compare them with the registry separately), so any is accepted."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(svc.host, svc.port, username=user, pkey=key, timeout=30, banner_timeout=60,
                   auth_timeout=60, allow_agent=False, look_for_keys=False)
    try:
        _, out, _ = client.exec_command(command, timeout=120)
        return out.read().decode()
    finally:
        client.close()
