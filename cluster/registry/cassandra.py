"""Cassandra registry backend: a site's registry, replicated, surviving the loss of a node.

Data model — two tables holding the same row, each written `USING TTL ttl`:

    services_by_role  PRIMARY KEY ((role), service_id)   lookup(role): one partition, one replica set
    services_by_id    PRIMARY KEY (service_id)           heartbeat/get/deregister by id: one row

Liveness is the TTL. TTL is per cell, so a heartbeat re-inserts *every* column (row marker
included) with a fresh TTL: a row is either wholly live or wholly gone, never a row with some
columns expired. Each heartbeat reads the row by id (that read is also how it answers False for an
unknown or expired service) and upserts it in place in both tables, in one unlogged batch.

Tombstones — why reads stay small:
- One row per service instance, overwritten in place: heartbeats *shadow* the previous cells, they
  do not create tombstones; a read merging memtable and sstables sees one live row per service.
  Tombstones come only from services that went away (deregistered, or expired), one per service.
- gc_grace_seconds = 900 (15 min) instead of 10 days. The usual reason for a long grace is that a
  replica which missed a delete would resurrect the row once the tombstone is purged. Here every
  row carries a TTL, so a resurrected row dies again by itself within `ttl` seconds — no worse than
  a wrapper that crashed. Expired cells expire identically on every replica, so purging them early
  resurrects nothing. Hints live at most gc_grace; 15 minutes covers a node restart, and anything
  a hint would have carried is rewritten by the next heartbeat anyway.
- TimeWindowCompactionStrategy, 5-minute windows: all cells of an sstable flushed in a window
  expire within `ttl` of the window's end (or are shadowed by later heartbeats in newer windows),
  so once `ttl + gc_grace` has passed TWCS drops the whole sstable without rewriting it. A read
  touches at most ~(ttl + gc_grace) / window + 1 ≈ 4-5 sstables, and the dead rows a lookup skips
  are the services of that role that left in the last ~20 minutes (far below the 1,000-tombstone
  warning for the sizes this project runs; a site churning thousands of services of one role per
  quarter hour would add a bucket to the partition key).
- One partition per role keeps lookup() a single-partition read answered by one replica set; the
  price is that every heartbeat of a role lands on the same replicas (about 1,000 writes/s for
  10,000 services at a 10 s interval, well within a Cassandra node).

Shared state and leases (schema 4) — two small tables beside the services:

    state   PRIMARY KEY ((kind), item)  desired counts, ledgers: a kind is one partition, read whole
    leases  PRIMARY KEY (name)          holder (written USING TTL: the expiry), fencing_token (no TTL)

A lease is taken and renewed by lightweight transactions (Paxos, serial consistency): taking it is
one conditional batch that sets the holder with the lease's TTL only while no holder is live and
the token is still the one read, and raises the token by one; renewing sets the holder with a fresh
TTL only while it and the token are unchanged. The token carries no TTL, so it keeps growing across
expiries and a paused holder's token never comes back.

Client: one Cluster/Session per registry object, reused for every request (the process opens its
registry once; never a connection per request), prepared statements, token-aware routing over
DC-aware round robin, consistency and request timeout from the spec (defaults LOCAL_QUORUM, 1 s),
and speculative execution so a slow replica is skipped instead of waited for. Every driver failure
— at start-up or later — surfaces as one line: RegistryUnavailable (exit 75, worth retrying) for
what may pass, RegistryMisconfigured (exit 78) for what the cluster refuses whatever the time (wrong
credentials, a keyspace that cannot serve the consistency level asked for, tables with another
schema, an unknown local_dc).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import ssl
import stat
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

from cassandra import (AuthenticationFailed, ConsistencyLevel, DriverException, InvalidRequest, OperationTimedOut,
                       ProtocolVersion)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionException
from cassandra.encoder import Encoder
from cassandra.protocol import ErrorMessage
from cassandra.query import BatchStatement, BatchType, tuple_factory
from cassandra.policies import ConstantSpeculativeExecutionPolicy, DCAwareRoundRobinPolicy, TokenAwarePolicy

from cluster.errors import RegistryMisconfigured, RegistryUnavailable, SalvusError, SpecError
from cluster.registry.base import SCHEMA_VERSION, LeaseInfo, Registry, Service, same_owner, valid_services
from cluster.spec import CassandraSpec, CassandraTlsSpec

log = logging.getLogger(__name__)

BY_ROLE = "services_by_role"
BY_ID = "services_by_id"
# The schema version lives in each table's comment: schema metadata, agreed between nodes like the
# tables themselves (a separate table of our own, created by many wrappers at once, raced: "Unknown CF").
SCHEMA_COMMENT = "salvus-jobs registry schema {}"
# Column order is Service's field order; CQL types as the driver's metadata reports them.
COLUMNS: dict[str, str] = {
    "role": "text", "service_id": "text", "host": "text", "port": "int", "hypervisor": "text",
    "scheduler": "text", "job_id": "text", "image": "text", "started": "double",
    "last_heartbeat": "double", "host_keys": "text", "ssh_port": "int",
}
KEYS = {BY_ROLE: (["role"], ["service_id"]), BY_ID: (["service_id"], [])}
STATE = "state"
LEASES = "leases"
# Schema 4's tables: columns (CQL types as the driver reports them), partition and clustering key.
EXTRA_TABLES: dict[str, tuple[dict[str, str], list[str], list[str]]] = {
    STATE: ({"kind": "text", "item": "text", "value": "text"}, ["kind"], ["item"]),
    LEASES: ({"name": "text", "holder": "text", "fencing_token": "bigint"}, ["name"], []),
}
GC_GRACE_SECONDS = 900
TABLE_ID_NAMESPACE = uuid.UUID("6f1c2a4e-5a17-45e5-9b6e-3c0a1d2b7f10")  # salvus-jobs registry tables
TWCS_WINDOW_MINUTES = 5
SCHEMA_SETTLE_ATTEMPTS = 5  # many wrappers starting at once on a new keyspace race to create it
DDL_TIMEOUT_S = 60.0  # schema changes wait for agreement between nodes; not the 1 s request budget
SYSTEM_KEYSPACES = {"system", "system_auth", "system_schema", "system_distributed", "system_traces",
                    "system_views", "system_virtual_schema"}
# Replicas of the local DC a consistency level needs, given that DC's replication factor.
REPLICAS_NEEDED: dict[str, Callable[[int], int]] = {
    "ONE": lambda rf: 1, "LOCAL_ONE": lambda rf: 1, "TWO": lambda rf: 2,
    "THREE": lambda rf: 3, "QUORUM": lambda rf: rf // 2 + 1, "LOCAL_QUORUM": lambda rf: rf // 2 + 1,
    "EACH_QUORUM": lambda rf: rf // 2 + 1, "ALL": lambda rf: rf,
}

# Server-side errors the driver raises as protocol messages (InvalidRequest, Unauthorized...) are not
# DriverExceptions; connection errors are neither.
DRIVER_ERRORS = (NoHostAvailable, DriverException, ConnectionException, ErrorMessage)

T = TypeVar("T")


def table_id(keyspace: str, table: str) -> uuid.UUID:
    """The id every client gives a table it creates. Cassandra otherwise picks a random id per CREATE,
    and wrappers creating a new keyspace's tables at once each got "IF NOT EXISTS" past the check: one
    id won, the others' clients failed with "Unknown CF". One id per name makes the race harmless."""
    return uuid.uuid5(TABLE_ID_NAMESPACE, f"{keyspace}.{table}")


def _table_ddl(keyspace: str, table: str) -> str:
    partition, clustering = KEYS[table]
    cols = ", ".join(f"{c} {t}" for c, t in COLUMNS.items())
    key = f"(({', '.join(partition)}){''.join(', ' + c for c in clustering)})"
    return (f"CREATE TABLE IF NOT EXISTS {keyspace}.{table} ({cols}, PRIMARY KEY {key}) WITH "
            f"gc_grace_seconds = {GC_GRACE_SECONDS} AND compaction = {{'class': "
            f"'TimeWindowCompactionStrategy', 'compaction_window_unit': 'MINUTES', "
            f"'compaction_window_size': {TWCS_WINDOW_MINUTES}}} AND ID = {table_id(keyspace, table)} "
            f"AND comment = '{SCHEMA_COMMENT.format(SCHEMA_VERSION)}'")


def _extra_table_ddl(keyspace: str, table: str) -> str:
    columns, partition, clustering = EXTRA_TABLES[table]
    cols = ", ".join(f"{c} {t}" for c, t in columns.items())
    key = f"(({', '.join(partition)}){''.join(', ' + c for c in clustering)})"
    return (f"CREATE TABLE IF NOT EXISTS {keyspace}.{table} ({cols}, PRIMARY KEY {key}) WITH "
            f"ID = {table_id(keyspace, table)} AND comment = '{SCHEMA_COMMENT.format(SCHEMA_VERSION)}'")


def comment_version(comment: str | None) -> int:
    """The schema version a table's comment records; 0 for a table from before versioning."""
    m = re.fullmatch(SCHEMA_COMMENT.format(r"(\d+)"), comment or "")
    return int(m.group(1)) if m else 0


MISSING = "table missing"


def _reason(exc: BaseException) -> str:
    """The useful part of a driver error, on one line."""
    text = str(exc).replace("\n", " ")
    server_says = re.search(r'message="(.*?)"', text)  # "Error from server: code=... message=..."
    if server_says:
        text = server_says.group(1)
    if "Last error: " in text:
        text = text.split("Last error: ", 1)[1]
    return text.strip(" .\"'") or type(exc).__name__


def describe_failure(exc: BaseException, where: str) -> str:
    """One line saying what failed talking to the cluster at `where`."""
    if isinstance(exc, NoHostAvailable):
        errors = getattr(exc, "errors", None) or {}
        if not isinstance(errors, dict):  # a list of hosts when none was even tried
            return f"{where}: no node available ({', '.join(map(str, errors))})"
        auth = [e for e in errors.values() if isinstance(e, AuthenticationFailed)]
        if auth:
            return f"{where}: authentication failed: {_reason(auth[0])}"
        if errors:
            return f"{where}: no node reachable (" + "; ".join(
                f"{h}: {_reason(e)}" for h, e in errors.items()) + ")"
        return f"{where}: no node available ({_reason(exc)})"
    if isinstance(exc, OperationTimedOut):
        return f"{where}: request timed out ({_reason(exc)})"
    return f"{where}: {type(exc).__name__}: {_reason(exc)}"


def _schema_settling(e: BaseException) -> bool:
    """A node that knows a just-created table only in part: not yet in its schema ("does not exist"),
    or in its schema while the table's store is still opening (a server error "Unknown CF <id>", seen
    when a second client's CREATE ... IF NOT EXISTS returned before the first one's had finished)."""
    errors = getattr(e, "errors", None)
    found = list(errors.values()) if isinstance(e, NoHostAvailable) and isinstance(errors, dict) else [e]
    return bool(found) and all("does not exist" in str(x) or "Unknown CF" in str(x) for x in found)


def _tls_refused(e: BaseException) -> bool:
    """A TLS handshake that failed (the driver rewraps certificate errors as a plain OSError whose
    text keeps OpenSSL's "[SSL: ...]")."""
    return isinstance(e, ssl.SSLError) or "[SSL" in str(e)


def startup_failure(exc: BaseException, where: str) -> SalvusError:
    """A failure while connecting: credentials or TLS the cluster refuses (an unknown CA, a name the
    certificate does not carry, a client certificate missing or refused) are configuration (78);
    anything else may pass (75)."""
    errors = getattr(exc, "errors", None)
    if isinstance(exc, NoHostAvailable) and isinstance(errors, dict) and errors:
        if all(isinstance(e, AuthenticationFailed) for e in errors.values()):
            return RegistryMisconfigured(describe_failure(exc, where))
        if all(_tls_refused(e) for e in errors.values()):
            return RegistryMisconfigured(describe_failure(exc, where).replace(
                ": no node reachable (", ": TLS handshake failed (check registry.cassandra.tls) (", 1))
    return RegistryUnavailable(describe_failure(exc, where))


def _translate(op: Callable[..., T]) -> Callable[..., T]:
    """Driver exceptions become RegistryUnavailable: a wrapper retries those, never crashes on them."""

    @functools.wraps(op)
    def wrapped(self: "CassandraRegistry", *args: Any, **kw: Any) -> T:
        try:
            return op(self, *args, **kw)
        except DRIVER_ERRORS as e:
            raise RegistryUnavailable(describe_failure(e, f"{self.where}: {op.__name__}")) from None
    return wrapped


@contextlib.contextmanager
def _quiet_driver_logs() -> Iterator[None]:
    """While connecting, the driver logs a traceback per failed contact point; the failure reaches
    the caller as one RegistryUnavailable line instead, so those records would only repeat it."""
    driver_log = logging.getLogger("cassandra")
    level = driver_log.level
    driver_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        driver_log.setLevel(level)


def _refuse_shared(mode: int, path: str, field: str) -> None:
    """Refuses a secret (password, private key) that others than its owner may read or write, as
    ssh does with a private key: a secret others can read is no longer one."""
    if mode & 0o077:
        raise SpecError(f"registry.cassandra.{field}: {path} is open to group or others (mode "
                        f"{stat.S_IMODE(mode):04o}); expected readable by its owner only (chmod 600)")


def _read_private(path: str, field: str) -> str:
    try:
        with open(path) as f:
            _refuse_shared(os.fstat(f.fileno()).st_mode, path, field)  # the file read, not the name
            return f.read()
    except OSError as e:
        raise SpecError(f"registry.cassandra.{field}: cannot read {path}: {e.strerror or e}") from None


def _read_password(spec: CassandraSpec) -> str | None:
    if spec.username is None and spec.password_file is None:
        return None
    if spec.username is None or spec.password_file is None:
        raise SpecError("registry.cassandra: username and password_file go together (give both or neither)")
    return _read_private(spec.password_file, "password_file").rstrip("\r\n")


def ssl_context(tls: CassandraTlsSpec | None) -> ssl.SSLContext | None:
    """The driver's TLS context: the nodes verified against the site's CA (and their names checked
    unless check_hostname is off), the client certificate loaded when one is given."""
    if tls is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise SpecError(f"registry.cassandra.tls.ca_file: cannot load {tls.ca_file}: "
                        f"{getattr(e, 'strerror', None) or e}") from None
    ctx.check_hostname = tls.check_hostname
    if tls.cert_file and tls.key_file:
        try:
            _refuse_shared(os.stat(tls.key_file).st_mode, tls.key_file, "tls.key_file")
            ctx.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as e:
            raise SpecError(f"registry.cassandra.tls: cannot load the client certificate {tls.cert_file} "
                            f"with key {tls.key_file}: {getattr(e, 'strerror', None) or e}") from None
    return ctx


def _consistency(name: str) -> int:
    try:
        return ConsistencyLevel.name_to_value[name.upper()]
    except KeyError:
        raise SpecError(f"registry.cassandra.consistency: expected one of "
                        f"{', '.join(sorted(REPLICAS_NEEDED))}, got {name!r}") from None


class CassandraRegistry(Registry):
    def __init__(self, spec: CassandraSpec, ttl: int = 30) -> None:
        self.spec = spec
        self.ttl = ttl
        self.keyspace = spec.keyspace
        self.where = f"cassandra registry {','.join(spec.contact_points)}:{spec.port}/{spec.keyspace}"
        if spec.keyspace in SYSTEM_KEYSPACES:
            raise SpecError(f"registry.cassandra.keyspace: {spec.keyspace!r} is Cassandra's own keyspace; "
                            f"name one for the registry")
        consistency = _consistency(spec.consistency)
        password = _read_password(spec)
        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=spec.local_dc)),
            consistency_level=consistency,
            request_timeout=spec.request_timeout,
            row_factory=tuple_factory,  # rows become Service(*row): no namedtuple class per result
            # A replica that has not answered within half the budget gets company: the request also
            # goes to the next one and the first answer wins (idempotent statements only: all ours).
            speculative_execution_policy=ConstantSpeculativeExecutionPolicy(
                delay=spec.request_timeout / 2, max_attempts=2))
        try:
            # Cluster() resolves the contact points: an unknown host name fails here already.
            self._cluster = Cluster(
                contact_points=list(spec.contact_points), port=spec.port,
                auth_provider=PlainTextAuthProvider(spec.username, password) if password is not None else None,
                execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                connect_timeout=spec.connect_timeout, control_connection_timeout=spec.connect_timeout,
                # Cassandra 4.0+ speaks v5; pinning it skips two failed handshakes per node.
                protocol_version=ProtocolVersion.V5,
                ssl_context=ssl_context(spec.tls),
                ssl_options={"server_hostname": spec.tls.server_hostname}
                if spec.tls and spec.tls.server_hostname else None)
        except DriverException as e:
            raise RegistryUnavailable(describe_failure(e, self.where)) from None
        try:
            try:
                with _quiet_driver_logs():
                    self._session: Session = self._cluster.connect()
            except NoHostAvailable:
                # The control connection may have reached nodes that the load balancer then refused
                # to use because they are in another datacenter than local_dc.
                self._check_local_dc()
                raise
            version = self._ensure_schema()
            self._check_replication(spec.consistency.upper())
            self._stamp_schema(version)
            self._prepare()
        except SalvusError:
            self._cluster.shutdown()
            raise
        except DRIVER_ERRORS as e:
            self._cluster.shutdown()
            raise startup_failure(e, self.where) from None

    # -- start-up ---------------------------------------------------------------------------------

    def _ddl(self, cql: str) -> None:
        try:
            self._session.execute(cql, timeout=DDL_TIMEOUT_S)
        except (NoHostAvailable, OperationTimedOut, ConnectionException):
            raise
        except (DriverException, ErrorMessage) as e:  # Unauthorized, InvalidRequest, ConfigurationException
            raise RegistryMisconfigured(f"{self.where}: cannot create the registry schema: {_reason(e)}") from None

    def _ensure_schema(self) -> int:
        """Creates what is missing (and only that: a user without CREATE may use an existing schema),
        and brings tables an older version made up to SCHEMA_VERSION (base.py's versioning rule)."""
        meta = self._cluster.metadata
        if self.keyspace not in meta.keyspaces:
            replication = Encoder().cql_encode_all_types(dict(self.spec.replication))
            log.info("creating keyspace %s with replication %s", self.keyspace, replication)
            self._ddl(f"CREATE KEYSPACE IF NOT EXISTS {self.keyspace} WITH replication = {replication}")
        version = self._schema_version()
        if version > SCHEMA_VERSION:
            raise RegistryMisconfigured(
                f"{self.where}: keyspace {self.keyspace} has registry schema version {version}, written by "
                f"a newer salvus-jobs (this one knows {SCHEMA_VERSION}); upgrade salvus-jobs here")
        for table in (BY_ROLE, BY_ID):
            ks = meta.keyspaces.get(self.keyspace)
            if ks is None or table not in ks.tables:
                log.info("creating table %s.%s", self.keyspace, table)
                self._ddl(_table_ddl(self.keyspace, table))
            else:
                self._add_missing_columns(table)
            self._check_table(table)
        for table in EXTRA_TABLES:
            # Schema 4's tables; a keyspace an older version made gets them in place.
            if self._table_meta(table) is None:
                log.info("creating table %s.%s", self.keyspace, table)
                self._ddl(_extra_table_ddl(self.keyspace, table))
            self._check_extra_table(table)
        return version

    def _check_extra_table(self, table: str) -> None:
        columns, partition, clustering = EXTRA_TABLES[table]
        for attempt in range(SCHEMA_SETTLE_ATTEMPTS):
            meta = self._table_meta(table)
            if (meta is not None and [c.name for c in meta.partition_key] == partition
                    and [c.name for c in meta.clustering_key] == clustering
                    and all(c in meta.columns and meta.columns[c].cql_type == t for c, t in columns.items())):
                return
            if attempt + 1 < SCHEMA_SETTLE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                self._cluster.refresh_schema_metadata(max_schema_agreement_wait=DDL_TIMEOUT_S)
        if meta is None:
            raise RegistryUnavailable(f"{self.where}: table {table} missing after creating it")
        raise RegistryMisconfigured(f"{self.where}: table {table} exists with another schema (expected "
                                    f"{', '.join(f'{c} {t}' for c, t in columns.items())}); is "
                                    f"registry.cassandra.keyspace another application's?")

    def _stamp_schema(self, version: int) -> None:
        """Records SCHEMA_VERSION in the comment of tables an older version made (new tables are
        created with it), once the keyspace is known to be usable."""
        if version >= SCHEMA_VERSION:
            return
        for table in (BY_ROLE, BY_ID):
            meta = self._table_meta(table)
            if meta is None or comment_version(meta.options.get("comment")) < SCHEMA_VERSION:
                self._ddl(f"ALTER TABLE {self.keyspace}.{table} WITH comment = "
                          f"'{SCHEMA_COMMENT.format(SCHEMA_VERSION)}'")

    def _schema_version(self) -> int:
        """The newest version the keyspace's tables record; 0 when none do (new, or from before
        versioning)."""
        ks = self._cluster.metadata.keyspaces.get(self.keyspace)
        tables = [ks.tables[t] for t in (BY_ROLE, BY_ID) if ks is not None and t in ks.tables]
        return max((comment_version(t.options.get("comment")) for t in tables), default=0)

    def _add_missing_columns(self, table: str) -> None:
        """ALTER TABLE ... ADD for our columns an older version's table lacks, only when what is
        there is ours (our key, our types): another application's table is refused, not altered."""
        meta = self._table_meta(table)
        partition, clustering = KEYS[table]
        if (meta is None or [c.name for c in meta.partition_key] != partition
                or [c.name for c in meta.clustering_key] != clustering
                or any(c not in COLUMNS or col.cql_type != COLUMNS[c] for c, col in meta.columns.items())):
            return  # _check_table says what is wrong
        for c, t in COLUMNS.items():
            if c not in meta.columns:
                log.info("adding column %s to %s.%s", c, self.keyspace, table)
                try:
                    self._ddl(f"ALTER TABLE {self.keyspace}.{table} ADD {c} {t}")
                except RegistryMisconfigured:
                    # Another wrapper starting at once may have added it first.
                    self._cluster.refresh_schema_metadata(max_schema_agreement_wait=DDL_TIMEOUT_S)
                    if c not in (self._table_meta(table) or meta).columns:
                        raise

    def _table_meta(self, table: str) -> Any:
        ks = self._cluster.metadata.keyspaces.get(self.keyspace)
        if ks is None or table not in ks.tables:
            # A CREATE ... IF NOT EXISTS that another process won is a no-op with no schema event
            # for this client yet: ask for the schema instead of waiting for the event.
            self._cluster.refresh_schema_metadata(max_schema_agreement_wait=DDL_TIMEOUT_S)
            ks = self._cluster.metadata.keyspaces.get(self.keyspace)
        return ks.tables.get(table) if ks else None

    def _check_table(self, table: str) -> None:
        # When several clients create the schema at once, one may see the table before the schema
        # event carrying its columns has reached it: refresh and look again before refusing.
        for attempt in range(SCHEMA_SETTLE_ATTEMPTS):
            problems = self._table_problems(table)
            if not problems:
                return
            if attempt + 1 < SCHEMA_SETTLE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                self._cluster.refresh_schema_metadata(max_schema_agreement_wait=DDL_TIMEOUT_S)
        if problems == [MISSING]:
            raise RegistryUnavailable(f"{self.where}: table {table} missing after creating it")
        raise RegistryMisconfigured(f"{self.where}: table {table} exists with another schema ({'; '.join(problems)}); "
                                    f"is registry.cassandra.keyspace another application's?")

    def _table_problems(self, table: str) -> list[str]:
        meta = self._table_meta(table)
        if meta is None:
            return [MISSING]
        partition, clustering = KEYS[table]
        problems = [f"column {c} is {meta.columns[c].cql_type if c in meta.columns else 'missing'}, "
                    f"expected {t}" for c, t in COLUMNS.items()
                    if c not in meta.columns or meta.columns[c].cql_type != t]
        if [c.name for c in meta.partition_key] != partition or [c.name for c in meta.clustering_key] != clustering:
            problems.append(f"primary key is not (({', '.join(partition)}){''.join(', ' + c for c in clustering)})")
        return problems

    def _check_local_dc(self) -> None:
        """A local_dc the cluster does not have leaves the load balancer no node to ask."""
        dcs = sorted({h.datacenter for h in self._cluster.metadata.all_hosts() if h.datacenter})
        if self.spec.local_dc is not None and dcs and self.spec.local_dc not in dcs:
            raise RegistryMisconfigured(f"{self.where}: local_dc {self.spec.local_dc!r} is not a datacenter "
                                      f"of this cluster (it has: {', '.join(dcs)})")

    def _check_replication(self, consistency: str) -> None:
        """Refuses a keyspace whose replicas in the local DC can never satisfy the consistency level
        (RF 3 on a 1-node cluster, or no replicas in this DC): every request would fail later."""
        meta = self._cluster.metadata
        strategy = meta.keyspaces[self.keyspace].replication_strategy
        hosts = list(meta.all_hosts())
        local_dc = self.spec.local_dc or next((h.datacenter for h in hosts if h.is_up), None)
        if strategy is None or local_dc is None or consistency not in REPLICAS_NEEDED:
            return
        nodes = sum(1 for h in hosts if h.datacenter == local_dc)
        options = getattr(strategy, "dc_replication_factors", None)
        rf = int(options.get(local_dc, 0)) if options is not None else int(getattr(strategy, "replication_factor", 1))
        needed = REPLICAS_NEEDED[consistency](rf)
        if needed > min(rf, nodes) or (rf == 0 and consistency.startswith("LOCAL")):
            raise RegistryMisconfigured(
                f"{self.where}: keyspace {self.keyspace} has replication factor {rf} in datacenter "
                f"{local_dc} ({nodes} node{'s' if nodes != 1 else ''}); {consistency} needs {max(needed, 1)} "
                f"replica{'s' if needed != 1 else ''} there (check registry.cassandra.replication/local_dc)")

    def _prepare(self) -> None:
        cols = ", ".join(COLUMNS)
        marks = ", ".join("?" * len(COLUMNS))
        ks = self.keyspace
        statements = {
            "insert_by_role": f"INSERT INTO {ks}.{BY_ROLE} ({cols}) VALUES ({marks}) USING TTL ?",
            "insert_by_id": f"INSERT INTO {ks}.{BY_ID} ({cols}) VALUES ({marks}) USING TTL ?",
            "select_by_id": f"SELECT {cols} FROM {ks}.{BY_ID} WHERE service_id = ?",
            "select_by_role": f"SELECT {cols} FROM {ks}.{BY_ROLE} WHERE role = ?",
            "select_all": f"SELECT {cols} FROM {ks}.{BY_ROLE}",
            "delete_by_role": f"DELETE FROM {ks}.{BY_ROLE} WHERE role = ? AND service_id = ?",
            "delete_by_id": f"DELETE FROM {ks}.{BY_ID} WHERE service_id = ?",
        }
        statements.update({
            "select_state": f"SELECT item, value FROM {ks}.{STATE} WHERE kind = ?",
            "insert_state": f"INSERT INTO {ks}.{STATE} (kind, item, value) VALUES (?, ?, ?)",
            "delete_state": f"DELETE FROM {ks}.{STATE} WHERE kind = ? AND item = ?",
        })
        self._stmt = {}
        for name, cql in statements.items():
            stmt = self._prepare_settled(cql)
            stmt.is_idempotent = True  # upserts/deletes with client timestamps: safe to send twice
            self._stmt[name] = stmt
        # Lightweight transactions: not idempotent (never sent twice by speculative execution).
        lwt = {
            "select_lease": f"SELECT holder, fencing_token, TTL(holder) FROM {ks}.{LEASES} WHERE name = ?",
            "create_lease": f"INSERT INTO {ks}.{LEASES} (name, fencing_token) VALUES (?, 0) IF NOT EXISTS",
            "take_lease": f"UPDATE {ks}.{LEASES} USING TTL ? SET holder = ? WHERE name = ? "
                          "IF holder = null AND fencing_token = ?",
            "bump_token": f"UPDATE {ks}.{LEASES} SET fencing_token = ? WHERE name = ?",
            "renew_lease": f"UPDATE {ks}.{LEASES} USING TTL ? SET holder = ? WHERE name = ? "
                           "IF holder = ? AND fencing_token = ?",
            "release_lease": f"DELETE holder FROM {ks}.{LEASES} WHERE name = ? IF holder = ? AND fencing_token = ?",
        }
        for name, cql in lwt.items():
            stmt = self._prepare_settled(cql)
            stmt.serial_consistency_level = ConsistencyLevel.LOCAL_SERIAL
            self._stmt[name] = stmt
        # A serial read sees every transaction accepted before it (a plain read might not yet).
        self._stmt["select_lease"].consistency_level = ConsistencyLevel.LOCAL_SERIAL

    def _prepare_settled(self, cql: str) -> Any:
        """Prepares `cql`, waiting out a node that has not applied a just-created table yet."""
        for attempt in range(SCHEMA_SETTLE_ATTEMPTS):
            try:
                return self._session.prepare(cql)
            except (InvalidRequest, NoHostAvailable) as e:
                if not _schema_settling(e) or attempt + 1 == SCHEMA_SETTLE_ATTEMPTS:
                    raise
                time.sleep(0.2 * (attempt + 1))
                self._cluster.control_connection.wait_for_schema_agreement(wait_time=DDL_TIMEOUT_S)
        raise AssertionError("unreachable")

    # -- operations -------------------------------------------------------------------------------

    def _row(self, service_id: str) -> Service | None:
        row = self._session.execute(self._stmt["select_by_id"], (service_id,)).one()
        return Service.from_row(row) if row else None

    def _valid_row(self, service_id: str) -> Service | None:
        found = valid_services([s for s in [self._row(service_id)] if s is not None])
        return found[0] if found else None

    def _both_tables(self, *statements: tuple[str, tuple]) -> None:
        """One UNLOGGED batch for the row in both tables: one request instead of two. Not LOGGED: were one half lost, the
        next heartbeat rewrites both and TTL removes strays, so the batchlog's cost buys nothing."""
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for name, values in statements:
            batch.add(self._stmt[name], values)
        batch.is_idempotent = True
        self._session.execute(batch)

    def _upsert(self, service: Service) -> None:
        values = (*(getattr(service, c) for c in COLUMNS), self.ttl)
        self._both_tables(("insert_by_role", values), ("insert_by_id", values))

    @_translate
    def register(self, service: Service) -> None:
        previous = self._row(service.service_id)
        if previous is not None and previous.role != service.role:
            self._session.execute(self._stmt["delete_by_role"], (previous.role, previous.service_id))
        service.last_heartbeat = time.time()
        self._upsert(service)

    @_translate
    def heartbeat(self, service_id: str, owner: Service | None = None) -> bool:
        current = self._row(service_id)
        # Compared on the row read, not as a lightweight transaction (4 round trips): a takeover
        # landing between the read and the upsert is overwritten by it, or caught by the next beat.
        if current is None or not same_owner(current, owner):
            return False
        current.last_heartbeat = time.time()
        self._upsert(current)
        return True

    @_translate
    def deregister(self, service_id: str) -> None:
        current = self._row(service_id)
        if current is None:
            self._session.execute(self._stmt["delete_by_id"], (service_id,))
        else:
            self._both_tables(("delete_by_id", (service_id,)), ("delete_by_role", (current.role, service_id)))

    @_translate
    def lookup(self, role: str) -> list[Service]:
        rows = self._session.execute(self._stmt["select_by_role"], (role,))
        return sorted(valid_services(Service.from_row(r) for r in rows), key=lambda s: (s.started, s.service_id))

    @_translate
    def all(self) -> list[Service]:
        rows = self._session.execute(self._stmt["select_all"])
        return sorted(valid_services(Service.from_row(r) for r in rows),
                      key=lambda s: (s.role, s.started, s.service_id))

    @_translate
    def get(self, service_id: str) -> Service | None:
        return self._valid_row(service_id)

    @_translate
    def read_state(self, kind: str) -> dict[str, str]:
        return {k: v for k, v in self._session.execute(self._stmt["select_state"], (kind,))}

    @_translate
    def write_state(self, kind: str, key: str, value: str | None) -> None:
        if value is None:
            self._session.execute(self._stmt["delete_state"], (kind, key))
        else:
            self._session.execute(self._stmt["insert_state"], (kind, key, value))

    def _lease_row(self, name: str) -> tuple | None:
        return self._session.execute(self._stmt["select_lease"], (name,)).one()

    @_translate
    def acquire_lease(self, name: str, holder: str, ttl: int) -> int | None:
        row = self._lease_row(name)
        if row is None:
            self._session.execute(self._stmt["create_lease"], (name,))  # the token's row, kept for good
            row = self._lease_row(name)
        if row is None or row[0] is not None and row[0] != holder:
            return None
        token = int(row[1] or 0)
        batch = BatchStatement(serial_consistency_level=ConsistencyLevel.LOCAL_SERIAL)
        if row[0] == holder:
            # Our own lease again: passes on only if it is still ours with that token.
            batch.add(self._stmt["renew_lease"], (max(1, int(ttl)), holder, name, holder, token))
        else:
            batch.add(self._stmt["take_lease"], (max(1, int(ttl)), holder, name, token))
        batch.add(self._stmt["bump_token"], (token + 1, name))
        return token + 1 if self._session.execute(batch).was_applied else None

    @_translate
    def renew_lease(self, name: str, holder: str, token: int, ttl: int) -> bool:
        return bool(self._session.execute(self._stmt["renew_lease"],
                                          (max(1, int(ttl)), holder, name, holder, token)).was_applied)

    @_translate
    def release_lease(self, name: str, holder: str, token: int) -> None:
        self._session.execute(self._stmt["release_lease"], (name, holder, token))

    @_translate
    def lease(self, name: str) -> LeaseInfo | None:
        row = self._lease_row(name)
        if row is None or row[0] is None:
            return None
        return LeaseInfo(name, row[0], int(row[1] or 0), float(row[2] or 0))

    def close(self) -> None:
        self._cluster.shutdown()
