"""The signed image index: `index.yaml` and its detached `index.yaml.sig`.

## index.yaml (written by `salvus_jobs catalogue sign`, read by every hypervisor)

```yaml
schema: salvus-image-index/1
version: 7                          # monotonic; a host refuses anything older than it accepted
issued: '2026-11-23T05:00:00Z'      # UTC, always quoted ISO 8601 with a trailing Z
expires: '2026-12-23T05:00:00Z'     # after this the index is stale (freeze attack) and refused
entries:
- name: demo                        # NAME and VERSION become file names: [A-Za-z0-9][A-Za-z0-9_.+-]*
  version: '1'                      # always a string
  sha256: 9f86d081...               # 64 lowercase hex: sha256 of the image file's bytes
  size: 104857600                   # bytes; a puller never reads more than this
  format: qcow2                     # qcow2 | raw (as `qemu-img info` reported; no backing file)
  roles: [sage, hub]                # roles that may boot it; empty = any role
  info_hash: 5e1c0c2a...            # BitTorrent v2 info hash (sha256 of the info dict), 64 hex
  torrent: torrents/demo-1.torrent  # path relative to the origin URL
  web_seeds: ['http://origin:8765/images/']   # BEP 19 web seeds: DIRECTORY URLs ending in '/'
  created: '2026-11-23T04:58:12Z'
  expires: null                     # optional per-image end of life
  targets: []                       # hypervisor or cluster names it is meant for; empty = all
revoked: [demo@0]                   # optional: NAME@VERSION the endorser withdrew
```

`web_seeds` are directory URLs: give them as they are to libtorrent (`add_url_seed`), which appends
the file name; a URL naming the file itself fails (a one-file v2 torrent has a pad file, so
libtorrent requests URL/NAME). The plain HTTP URL of the image is `Entry.http_urls`.

Parsing is strict: the size is checked before YAML is touched (endless data), YAML is read with
the safe loader (`yaml.CSafeLoader`, else `yaml.SafeLoader`: what `yaml.safe_load` uses),
every key is required unless marked optional above, unknown keys, duplicate
NAME@VERSION and wrong types are refused with one line naming the field. Entries never name files
on the host: the store path is derived from NAME-VERSION (see `Entry.file_name`), so a hostile
index cannot point outside the store.

## index.yaml.sig (detached; the signature covers the EXACT bytes of index.yaml)

A small UTF-8 text file, one signature per line; blank lines and `#` comments are ignored:

```
# salvus-index-signature/1
ed25519 KEYID SIGNATURE
```

- `KEYID` is the first 16 bytes of sha256(raw 32-byte Ed25519 public key), 32 lowercase hex
  (`catalogue.keys.key_id`); it only selects the trust anchor, it is not trusted by itself.
- `SIGNATURE` is standard base64 of the 64-byte Ed25519 signature of the index file's bytes as
  they are on disk / on the wire. Nothing is re-serialized before verifying, so any byte change
  (whitespace, comments, key order) breaks the signature, and the same file can be checked with
  `openssl pkeyutl -verify -rawin -pubin -inkey KEY.pub -in index.yaml -sigfile SIG.bin`.
- Several endorsers sign the same bytes by each appending a line (`sign --cosign`). A host counts
  the distinct trusted keys whose signature verifies and accepts when that count reaches the spec's
  `catalogue.trust.threshold`; lines from unknown keys are ignored, a key counts once however many
  lines it has, a malformed line (wrong length, bad base64) is an error.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from datetime import datetime, timezone
from typing import Any, Iterable

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cluster.errors import DataError
from cluster.spec import split_image_ref
from catalogue.keys import key_id

SCHEMA = "salvus-image-index/1"
SIG_HEADER = "# salvus-index-signature/1"
DEFAULT_MAX_INDEX_BYTES = 16 << 20
MAX_SIG_BYTES = 64 << 10
FORMATS = ("qcow2", "raw")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,30}$")
_TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}$")
_TORRENT_RE = re.compile(r"^torrents/[A-Za-z0-9][A-Za-z0-9_.+-]{0,150}\.torrent$")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(_TIME_FORMAT)


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclasses.dataclass
class Entry:
    name: str
    version: str
    sha256: str
    size: int
    format: str
    roles: list[str]
    info_hash: str
    torrent: str
    web_seeds: list[str]
    created: datetime
    expires: datetime | None = None
    targets: list[str] = dataclasses.field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def file_name(self) -> str:
        """NAME-VERSION.qcow2 (or .raw): the name in the catalogue's images/ and the store's base/."""
        return f"{self.name}-{self.version}.{'qcow2' if self.format == 'qcow2' else 'raw'}"

    @property
    def http_urls(self) -> list[str]:
        """Plain HTTP URLs of the image file (web seed directory + file name)."""
        return [seed + self.file_name for seed in self.web_seeds]

    def serves(self, role: str) -> bool:
        return not self.roles or role in self.roles

    def meant_for(self, *names: str) -> bool:
        """True when the entry has no targets or names one of these hosts/clusters."""
        return not self.targets or any(n in self.targets for n in names)

    def expired(self, at: datetime | None = None) -> bool:
        return self.expires is not None and (at or now_utc()) >= self.expires

    def to_yaml_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["created"] = format_time(self.created)
        d["expires"] = format_time(self.expires) if self.expires else None
        return d


@dataclasses.dataclass
class Index:
    version: int
    issued: datetime
    expires: datetime
    entries: list[Entry]
    revoked: list[str] = dataclasses.field(default_factory=list)

    def find(self, name: str, version: str) -> Entry | None:
        return next((e for e in self.entries if e.name == name and e.version == version), None)

    def expired(self, at: datetime | None = None) -> bool:
        return (at or now_utc()) >= self.expires

    def to_json(self) -> bytes:
        """The parsed form, for a host's own cache of an index it already verified (never signed)."""
        return json.dumps({"version": self.version, "issued": format_time(self.issued),
                           "expires": format_time(self.expires), "revoked": self.revoked,
                           "entries": [e.to_yaml_dict() for e in self.entries]}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Index":
        """Inverse of `to_json`; trusts its input as much as the state directory it was read from."""
        d = json.loads(raw)
        entries = [Entry(**{**e, "created": _time(e["created"]), "expires": _time(e["expires"])})
                   for e in d["entries"]]
        return cls(version=int(d["version"]), issued=_time(d["issued"]),  # type: ignore[arg-type]
                   expires=_time(d["expires"]), entries=entries, revoked=list(d["revoked"]))  # type: ignore[arg-type]

    def render(self) -> bytes:
        """The bytes `sign` writes and signs; never used to verify (verification uses the file)."""
        doc: dict[str, Any] = {"schema": SCHEMA, "version": self.version,
                               "issued": format_time(self.issued), "expires": format_time(self.expires),
                               "entries": [e.to_yaml_dict() for e in self.entries]}
        if self.revoked:
            doc["revoked"] = list(self.revoked)
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1000).encode()


# ----------------------------------------------------------------------------- strict parsing

class _Fields:
    """Typed access to one mapping of the document, naming the exact field in every error."""

    def __init__(self, source: str, where: str, data: Any, required: Iterable[str], optional: Iterable[str]):
        self.source, self.where = source, where
        if not isinstance(data, dict):
            self.fail("", f"expected a mapping, got {type(data).__name__}")
        required, optional = list(required), list(optional)
        unknown = [k for k in data if k not in required and k not in optional]
        if unknown:
            self.fail(str(unknown[0]), f"unknown key (expected one of: {', '.join(required + optional)})")
        missing = [k for k in required if k not in data]
        if missing:
            self.fail(missing[0], "required field is missing")
        self.data = data

    def fail(self, key: str, msg: str) -> None:
        path = ".".join(p for p in (self.where, key) if p)
        raise DataError(f"{self.source}: {path or '(top level)'}: {msg}")

    def _got(self, v: Any) -> str:
        shown = repr(v)
        return shown if len(shown) < 60 else shown[:57] + "..."

    def str(self, key: str, pattern: re.Pattern[str] | None = None, what: str = "a string") -> str:
        v = self.data.get(key)
        if not isinstance(v, str) or (pattern is not None and not pattern.match(v)):
            self.fail(key, f"expected {what}, got {self._got(v)}")
        return v

    def int(self, key: str, minimum: int = 0) -> int:
        v = self.data.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            self.fail(key, f"expected an integer >= {minimum}, got {self._got(v)}")
        return v

    def time(self, key: str, optional: bool = False) -> datetime | None:
        v = self.data.get(key)
        if v is None and optional:
            return None
        try:
            return datetime.strptime(v, _TIME_FORMAT).replace(tzinfo=timezone.utc)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(key, f"expected a quoted UTC time like '2026-01-31T12:00:00Z', got {self._got(v)}")
        raise AssertionError  # unreachable: fail() raises

    def str_list(self, key: str, pattern: re.Pattern[str], what: str) -> list[str]:
        v = self.data.get(key, [])
        if not isinstance(v, list):
            self.fail(key, f"expected a list of {what}, got {self._got(v)}")
        for i, item in enumerate(v):
            if not isinstance(item, str) or not pattern.match(item):
                self.fail(f"{key}[{i}]", f"expected {what}, got {self._got(item)}")
        return list(v)


_SEED_URL_RE = re.compile(r"^https?://[^\s/?#]+/([^\s?#]*/)?$")
_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}@[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _parse_entry(source: str, i: int, data: Any) -> Entry:
    f = _Fields(source, f"entries[{i}]", data,
                required=("name", "version", "sha256", "size", "format", "roles", "info_hash",
                          "torrent", "web_seeds", "created"),
                optional=("expires", "targets"))
    what_part = "letters, digits, '.', '_', '+', '-' (no '/', no '..', not starting with '.')"
    name = f.str("name", _NAME_PART, what_part)
    version = f.str("version", _NAME_PART, what_part)
    try:
        split_image_ref(f"{name}@{version}")  # the store's own rule, so both sides agree
    except ValueError as e:
        f.fail("name", str(e))
    entry = Entry(
        name=name, version=version,
        sha256=f.str("sha256", _HEX64, "64 lowercase hex digits"),
        size=f.int("size"),
        format=f.str("format", re.compile(r"^(qcow2|raw)$"), "'qcow2' or 'raw'"),
        roles=f.str_list("roles", _ROLE_RE, "role names ([a-z][a-z0-9_-]*)"),
        info_hash=f.str("info_hash", _HEX64, "a BitTorrent v2 info hash (64 lowercase hex digits)"),
        torrent=f.str("torrent", _TORRENT_RE, "'torrents/NAME-VERSION.torrent'"),
        web_seeds=f.str_list("web_seeds", _SEED_URL_RE, "http(s) directory URLs ending in '/'"),
        created=f.time("created"),  # type: ignore[arg-type]
        expires=f.time("expires", optional=True),
        targets=f.str_list("targets", _TARGET_RE, "host or cluster names"),
    )
    return entry


def parse_index(raw: bytes, max_bytes: int = DEFAULT_MAX_INDEX_BYTES, source: str = "index.yaml") -> Index:
    """The Index in `raw`, or DataError naming the first problem. Does NOT check signatures."""
    f = load_yaml_mapping(raw, max_bytes, source, required=("schema", "version", "issued", "expires", "entries"),
                          optional=("revoked",))
    if f.data["schema"] != SCHEMA:
        f.fail("schema", f"expected {SCHEMA!r}, got {f._got(f.data['schema'])}")
    entries, revoked = parse_entries(f)
    index = Index(version=f.int("version", minimum=1), issued=f.time("issued"),  # type: ignore[arg-type]
                  expires=f.time("expires"), entries=entries, revoked=revoked)  # type: ignore[arg-type]
    if index.expires <= index.issued:
        f.fail("expires", "must be later than 'issued'")
    return index


def load_yaml_mapping(raw: bytes, max_bytes: int, source: str, required: Iterable[str],
                      optional: Iterable[str]) -> _Fields:
    """A size-checked, safely loaded YAML mapping with exactly the keys allowed; DataError otherwise."""
    if len(raw) > max_bytes:
        raise DataError(f"{source}: {len(raw)} bytes exceeds the limit of {max_bytes} bytes; refused unread")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text (byte {e.start})") from None
    try:
        # The safe loader (plain types only, like yaml.safe_load) with libyaml's C parser when
        # present: 6x faster on a 1,000-entry index, which every pre-boot check parses.
        data = yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a SafeLoader, never the full one
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataError(f"{source}: malformed YAML{where}: {problem}") from None
    return _Fields(source, "", data, required=required, optional=optional)


def parse_entries(f: _Fields) -> tuple[list[Entry], list[str]]:
    """`entries` and `revoked` of a document, with NAME@VERSION unique and not both."""
    entries_raw = f.data.get("entries", [])
    if not isinstance(entries_raw, list):
        f.fail("entries", f"expected a list of entries, got {type(entries_raw).__name__}")
    entries = [_parse_entry(f.source, i, e) for i, e in enumerate(entries_raw)]
    revoked = f.str_list("revoked", _REF_RE, "NAME@VERSION")
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e.ref in seen:
            f.fail(f"entries[{i}]", f"{e.ref} is listed twice")
        if e.ref in revoked:
            f.fail(f"entries[{i}]", f"{e.ref} is both listed and revoked")
        seen.add(e.ref)
    return entries, revoked


# ----------------------------------------------------------------------------- signatures

@dataclasses.dataclass
class SignatureLine:
    key_id: str
    signature: bytes


def sign_index_bytes(raw: bytes, key: Ed25519PrivateKey) -> str:
    """One signature line for the exact bytes `raw`."""
    sig = base64.b64encode(key.sign(raw)).decode()
    return f"ed25519 {key_id(key.public_key())} {sig}\n"


def new_signature_file(lines: Iterable[str]) -> bytes:
    return (SIG_HEADER + "\n" + "".join(lines)).encode()


def parse_signature_file(sig: bytes, source: str = "index.yaml.sig") -> list[SignatureLine]:
    if len(sig) > MAX_SIG_BYTES:
        raise DataError(f"{source}: {len(sig)} bytes exceeds the limit of {MAX_SIG_BYTES} bytes")
    try:
        text = sig.decode("ascii")
    except UnicodeDecodeError:
        raise DataError(f"{source}: not ASCII text") from None
    lines: list[SignatureLine] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] != "ed25519" or not re.match(r"^[0-9a-f]{32}$", parts[1]):
            raise DataError(f"{source}: line {n}: expected 'ed25519 KEYID BASE64SIG'")
        try:
            raw_sig = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"{source}: line {n}: signature is not valid base64 (truncated?)") from None
        if len(raw_sig) != 64:
            raise DataError(f"{source}: line {n}: signature is {len(raw_sig)} bytes, expected 64 (truncated?)")
        lines.append(SignatureLine(parts[1], raw_sig))
    if not lines:
        raise DataError(f"{source}: no signature lines (empty or truncated file)")
    return lines


def verify_signatures(raw: bytes, sig: bytes, trusted: list[Ed25519PublicKey], threshold: int,
                      source: str = "index.yaml.sig") -> list[str]:
    """The key ids of the trusted keys with a valid signature over `raw`; DataError when fewer than
    `threshold` distinct trusted keys signed. Each message says which way it failed."""
    lines = parse_signature_file(sig, source)
    by_id = {key_id(k): k for k in trusted}
    good: set[str] = set()
    bad: list[str] = []
    for line in lines:
        key = by_id.get(line.key_id)
        if key is None or line.key_id in good:
            continue
        try:
            key.verify(line.signature, raw)
            good.add(line.key_id)
        except InvalidSignature:
            bad.append(line.key_id)
    if len(good) >= threshold:
        return sorted(good)
    if bad:
        raise DataError(f"{source}: forged or mismatched signature by trusted key {bad[0]} "
                        f"(the index bytes were changed after signing, or the signature was)")
    if not any(line.key_id in by_id for line in lines):
        signers = ", ".join(sorted({line.key_id for line in lines}))
        raise DataError(f"{source}: signed only by untrusted key(s) {signers}; trusted: "
                        f"{', '.join(sorted(by_id)) or 'none'}")
    raise DataError(f"{source}: {len(good)} valid signature(s) from trusted keys, threshold is {threshold}")
