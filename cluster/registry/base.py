"""The registry interface shared by the SQLite and Cassandra backends, and its versioning rule.

Versioning: the registry carries `SCHEMA_VERSION` (SQLite `PRAGMA user_version`, Cassandra the
comment of its tables). A backend opening a registry written by an older version
adds the project's own missing columns in place (`ALTER TABLE ... ADD`) and stamps the version;
rows written before a column existed read as the field's default (`Service.from_row`); tables a
newer schema added (schema 4: `state`, `leases`) are created in place. A registry stamped with a
newer version than this code knows is refused (RegistryMisconfigured, exit 78): this code would
drop what it does not know when it rewrites a row.

Besides services the registry holds what every controller and `scale` must see alike (schema 4):
small state rows by kind and key (`desired` counts per role, each backend's `ledger:BACKEND` of
submitted jobs and `pending:BACKEND` submissions), and leases: one holder at a time per name, with
an expiry and a fencing token that grows with every change of holder, so a holder that was paused
past its lease and resumes finds its token stale (`lease_valid`) and does nothing.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger(__name__)

# Any registry writer can store any string: a row's endpoint is used (printed, handed to guests,
# connected to) only when it is a plain host name or IP literal and a real port. A newline in a
# host would start a new command line on a guest's channel; an escape sequence retitles terminals.
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,252}")


def valid_endpoint(host: object, port: object) -> bool:
    return (isinstance(host, str) and _HOST_RE.fullmatch(host) is not None
            and type(port) is int and 1 <= port <= 65535)


def same_owner(row: "Service", owner: "Service | None") -> bool:
    return owner is None or (row.job_id, row.host, row.port) == (owner.job_id, owner.host, owner.port)


def valid_services(services: Iterable["Service"]) -> list["Service"]:
    """The rows whose endpoint passes `valid_endpoint`; the others are logged and left out."""
    out = []
    for s in services:
        if valid_endpoint(s.host, s.port):
            out.append(s)
        else:
            log.warning("registry row %r has an invalid endpoint %r:%r: ignored", s.service_id, s.host, s.port)
    return out


# The state kind of services a controller is draining: service id -> the job id being drained. Its
# wrapper finds its row gone and, seeing its job here, stays deregistered instead of registering
# again (jobwrappers/heartbeat.py); the controller removes the row once the job has ended.
DRAINING = "draining"


@dataclass
class Service:
    """One live service instance (one VM): a row of the registry. A field added later must have a
    default: rows an older version wrote have no value for it."""

    role: str
    service_id: str
    host: str  # endpoint host clients connect to
    port: int  # endpoint port
    hypervisor: str = ""  # the machine running the VM
    scheduler: str = ""  # backend that runs the job (local, slurm, ...)
    job_id: str = ""
    image: str = ""  # NAME@VERSION
    started: float = dataclasses.field(default_factory=time.time)  # epoch seconds
    last_heartbeat: float = 0.0  # epoch seconds, set by the registry
    # The guest's SSH host public keys as its agent reported them, one "TYPE BASE64" per line
    # (schema 2), so operators and tools can pin them; "" when unknown.
    host_keys: str = ""
    # Where the guest's sshd answers (schema 3): a port on `host` (a forward on the hypervisor, or
    # 22 at a VM's own address); 0 when unknown (a wrapper from before it).
    ssh_port: int = 0

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: tuple) -> "Service":
        """A row in field order; NULLs (columns added after the row was written) become defaults."""
        if None not in row:
            return cls(*row)
        return cls(*(v if v is not None else column_default(f) for v, f in zip(row, dataclasses.fields(cls))))


# Bumped whenever a backend's schema changes (a column added); see the module docstring.
SCHEMA_VERSION = 4  # 2: host_keys; 3: ssh_port; 4: state and leases tables


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as the registry holds it: who, the fencing token, and seconds left (about)."""

    name: str
    holder: str
    token: int
    remaining: float


def column_default(f: dataclasses.Field) -> object:
    """The value a column added in place holds for rows written before it existed."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return {"float": 0.0, "int": 0, "str": ""}[str(f.type)]


class Registry(abc.ABC):
    """register/heartbeat/deregister/lookup with TTL liveness.

    A service whose heartbeats stop for `ttl` seconds disappears from lookup() and all() by itself.
    Registering an existing service_id replaces its row.
    """

    ttl: int

    @abc.abstractmethod
    def register(self, service: Service) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, service_id: str, owner: Service | None = None) -> bool:
        """Refresh the TTL. False when the service is unknown or already expired (re-register).
        With `owner` (the wrapper's own row) also False, nothing refreshed, when the row's job id,
        host or port differ: another writer registered the id, and re-registering takes it back
        instead of keeping the hijacked row alive."""

    @abc.abstractmethod
    def deregister(self, service_id: str) -> None: ...

    @abc.abstractmethod
    def lookup(self, role: str) -> list[Service]:
        """Live services of a role, oldest first."""

    @abc.abstractmethod
    def all(self) -> list[Service]:
        """Every live service, by role then start time."""

    def get(self, service_id: str) -> Service | None:
        return next((s for s in self.all() if s.service_id == service_id), None)

    # --- shared state (schema 4) ------------------------------------------------------------------
    @abc.abstractmethod
    def read_state(self, kind: str) -> dict[str, str]:
        """Every row of `kind` as key -> value."""

    @abc.abstractmethod
    def write_state(self, kind: str, key: str, value: str | None) -> None:
        """Sets a row of `kind` (None deletes it)."""

    # --- leases ---------------------------------------------------------------------------------------
    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl: int) -> int | None:
        """Takes the lease `name` for `ttl` seconds when it is free or expired and returns its new
        fencing token (greater than every token before it); None while another holder has it. A
        holder asking again gets a new token too: renewing is `renew_lease`."""

    @abc.abstractmethod
    def renew_lease(self, name: str, holder: str, token: int, ttl: int) -> bool:
        """Extends the lease by `ttl` seconds from now if `holder` still has it with `token`;
        False when it expired or passed on (the holder must stop acting)."""

    @abc.abstractmethod
    def release_lease(self, name: str, holder: str, token: int) -> None:
        """Gives the lease up at once (only while `holder` has it with `token`)."""

    @abc.abstractmethod
    def lease(self, name: str) -> LeaseInfo | None:
        """The lease's live holder, None when it is free."""

    def lease_valid(self, name: str, holder: str, token: int) -> bool:
        """The fencing check each action makes: is the lease still `holder`'s with `token`?"""
        info = self.lease(name)
        return info is not None and (info.holder, info.token) == (holder, token)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
