"""The one SSH client of the project (paramiko): a connection to a host whose key must already be
in a known_hosts file, commands on new channels of that one connection, and files up by SFTP.

`submit/` runs scheduler commands on a login node through it (`submit.runner.SshRunner`); the CLI's
`ssh`/`exec`/`console` commands (`cluster/vmaccess.py`) use the same class, with a guest's host keys
pinned from the registry instead of a known_hosts file, and optionally through a channel of another
connection (a jump host). Host keys are never learned: an unknown or changed key is refused with one
line naming the fingerprint the server offered (SHA256:..., as OpenSSH prints it), so the operator
can compare it out of band and add it with ssh-keyscan.
Errors: a refused host key or failed login is the site's configuration (78, `LoginRefused`); a
host that cannot be reached or a connection that drops is transient (75, `SshUnavailable`).
"""
from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import posixpath
import select
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paramiko

from cluster.errors import SpecError, TempFailure

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16


class LoginRefused(SpecError):
    """The host key is unknown or changed, or the server refused our credentials (exit 78)."""


class SshUnavailable(TempFailure):
    """The host cannot be reached, or the connection dropped (exit 75: try again)."""


def fingerprint(key: paramiko.PKey) -> str:
    """A key's fingerprint as `ssh-keygen -l` and OpenSSH's prompts print it."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names a host: `[host]:port` unless the port is 22."""
    return host if port == 22 else f"[{host}]:{port}"


def public_key(line: str) -> paramiko.PKey:
    """A `TYPE BASE64` public key line as paramiko's key (ValueError when it is not one)."""
    try:
        kind, blob = line.split()[:2]
        return paramiko.PKey.from_type_string(kind, base64.b64decode(blob, validate=True))
    except (ValueError, TypeError, paramiko.SSHException) as e:
        raise ValueError(f"not an SSH public key: {e}") from None


class _Refuse(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, with the fingerprint in the one line."""

    def __init__(self, known_hosts: str, pinned: list[paramiko.PKey] | None = None) -> None:
        self.known_hosts = known_hosts
        self.pinned = pinned

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if self.pinned is not None:
            # Pinned keys of other types only: still a different key, never one to accept.
            raise LoginRefused(f"{hostname}: host key {fingerprint(key)} does not match {self.known_hosts} "
                               f"({', '.join(map(fingerprint, self.pinned)) or 'none recorded'}): refused")
        raise LoginRefused(f"{hostname}: host key {fingerprint(key)} is not in {self.known_hosts}; "
                           f"check it with the host's admin, then add it (ssh-keyscan)")


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class SshConnection:
    """One connection, opened on first use and kept for the life of this object; every command is
    a new channel on its transport. Not thread-safe (one command at a time)."""

    host: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"
    connect_timeout: float = 15.0
    # Instead of known_hosts: the only host keys accepted, `TYPE BASE64` lines (a guest's, as the
    # registry recorded them); `pinned_source` names where they came from in a refusal.
    pinned_keys: tuple[str, ...] | None = None
    pinned_source: str = "the recorded host keys"  # "...does not match PINNED_SOURCE (FINGERPRINT)"
    # A channel to talk SSH over instead of a TCP connection (`tunnel` of a jump host's connection).
    sock: Any = None
    _client: paramiko.SSHClient | None = field(default=None, init=False, repr=False)

    @property
    def target(self) -> str:
        return f"{self.user or getpass.getuser()}@{known_hosts_name(self.host, self.port)}"

    def transport(self) -> paramiko.Transport:
        t = self._client.get_transport() if self._client else None
        if t is not None and t.is_active():
            return t
        if self._client is not None:
            # A dropped connection is reported by the command that saw it; never silently redone
            # within one command, but a later command may connect again.
            self.close()
        self._client = self._connect()
        return self._client.get_transport()

    def _host_keys(self, client: paramiko.SSHClient) -> str:
        """Loads the keys this host may present into `client`; returns them as a refusal names
        them ("the one in FILE", or `pinned_source`)."""
        if self.pinned_keys is not None:
            pinned = []
            for line in self.pinned_keys:
                try:
                    pinned.append(public_key(line))
                except ValueError:
                    log.warning("%s: a recorded host key is malformed; ignored", self.target)
            name = known_hosts_name(self.host, self.port)
            for key in pinned:
                client.get_host_keys().add(name, key.get_name(), key)
            client.set_missing_host_key_policy(_Refuse(self.pinned_source, pinned))
            return self.pinned_source
        known = os.path.expanduser(self.known_hosts)
        try:
            client.load_host_keys(known)  # only this file: never ~/.ssh/known_hosts behind our back
        except FileNotFoundError:
            pass  # every host is unknown: refused below with its fingerprint
        except (OSError, paramiko.SSHException) as e:
            raise LoginRefused(f"{known}: cannot read known_hosts: {e}") from None
        client.set_missing_host_key_policy(_Refuse(known))
        return f"the one in {known}"

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        known = self._host_keys(client)
        try:
            client.connect(self.host, self.port, username=self.user or getpass.getuser(), sock=self.sock,
                           key_filename=self.key_file, allow_agent=self.key_file is None,
                           look_for_keys=self.key_file is None, timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout, auth_timeout=self.connect_timeout)
        except LoginRefused:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise LoginRefused(f"{self.target}: host key {fingerprint(e.key)} does not match {known} "
                               f"({fingerprint(e.expected_key)}): refused (a changed key may be an "
                               f"attack; ask the host's admin)") from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise LoginRefused(f"{self.target}: the key {self.key_file} is encrypted: load it into "
                               f"ssh-agent and leave login.key_file unset") from None
        except paramiko.AuthenticationException:
            client.close()
            raise LoginRefused(f"{self.target}: authentication failed (is the public key of "
                               f"{self.key_file or 'your agent or ~/.ssh'} in the host's "
                               f"authorized_keys?)") from None
        except FileNotFoundError as e:
            client.close()
            raise LoginRefused(f"{self.target}: cannot read the key file: {e.filename or e}") from None
        except (OSError, socket.timeout, paramiko.SSHException, EOFError) as e:
            client.close()
            raise SshUnavailable(f"{self.target}: cannot connect: {e or type(e).__name__}") from None
        log.debug("ssh: connected to %s", self.target)
        return client

    def connected(self) -> bool:
        """Whether the connection is up (after a channel ended without an exit status: was it the
        command, or the connection?)."""
        t = self._client.get_transport() if self._client else None
        return t is not None and t.is_active()

    def session(self) -> paramiko.Channel:
        """A new session channel on the connection (for a command or a shell the caller drives)."""
        try:
            return self.transport().open_session(timeout=self.connect_timeout)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise SshUnavailable(f"{self.target}: cannot open a channel: {e or type(e).__name__}") from None

    def tunnel(self, host: str, port: int) -> paramiko.Channel:
        """A TCP connection from this host to `host:port` (direct-tcpip: what `ssh -J` does)."""
        try:
            return self.transport().open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                                 timeout=self.connect_timeout)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise SshUnavailable(f"{self.target}: cannot reach {host}:{port} from there: "
                                 f"{e or type(e).__name__}") from None

    def exec(self, command: str, input: str | None = None, timeout: float = 60.0,
             what: str = "a command") -> ExecResult:
        """Runs `command` (one shell command line, already quoted) on a new channel; a channel
        that closes without an exit status (connection dropped) is `SshUnavailable`. `what` names
        the command in errors (never the command line, which may carry settings)."""
        chan = self.session()
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(command)
            if input:
                chan.sendall(input.encode())
            chan.shutdown_write()
            while True:
                if chan.recv_ready():
                    out += chan.recv(READ_CHUNK)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(READ_CHUNK)
                elif chan.exit_status_ready() or chan.closed:
                    break
                elif time.monotonic() >= deadline:
                    raise SshUnavailable(f"{self.target}: {what}: no answer within {timeout:.0f}s")
                else:
                    select.select([chan], [], [], min(0.05, max(deadline - time.monotonic(), 0)))
            while chan.recv_ready():
                out += chan.recv(READ_CHUNK)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(READ_CHUNK)
            status = chan.exit_status if chan.exit_status_ready() else -1
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise SshUnavailable(f"{self.target}: connection lost while running {what}: "
                                 f"{e or type(e).__name__}") from None
        finally:
            chan.close()
        if status == -1:
            if not self.connected():
                raise SshUnavailable(f"{self.target}: connection lost while running {what} "
                                     f"(its outcome is unknown)")
            status = 255  # no exit status on a live connection: the command died of a signal
        return ExecResult(status, out.decode(errors="replace"), err.decode(errors="replace"))

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Writes `data` to `path` on the host, whole or not at all: a temporary name beside it,
        then a rename; missing parent directories are made."""
        tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with self.transport().open_sftp_client() as sftp:
                self._makedirs(sftp, posixpath.dirname(path))
                with sftp.open(tmp, "wb") as f:
                    f.write(data)
                sftp.chmod(tmp, mode)
                sftp.posix_rename(tmp, path)
        except PermissionError as e:
            raise LoginRefused(f"{self.target}: cannot write {path}: {e}") from None
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise SshUnavailable(f"{self.target}: cannot upload {path}: {e or type(e).__name__}") from None

    def make_dirs(self, path: str) -> None:
        """`mkdir -p path` on the host, by SFTP."""
        try:
            with self.transport().open_sftp_client() as sftp:
                self._makedirs(sftp, path)
        except PermissionError as e:
            raise LoginRefused(f"{self.target}: cannot make {path}: {e}") from None
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise SshUnavailable(f"{self.target}: cannot make {path}: {e or type(e).__name__}") from None

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, d: str) -> None:
        missing = []
        while d not in ("", "/"):
            try:
                sftp.stat(d)
                break
            except FileNotFoundError:
                missing.append(d)
                d = posixpath.dirname(d)
        for m in reversed(missing):
            sftp.mkdir(m)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
