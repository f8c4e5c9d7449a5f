"""The signed image index: `index.yaml` and its detached `index.yaml.sig`.

## index.yaml (written by `salvus_jobs catalogue sign`, read by every hypervisor)

```yaml
schema: salvus-image-index/2        # 1 or 2 (see Versions below)
version: 7                          # monotonic; a host refuses anything older than it accepted
issued: '2026-11-23T05:00:00Z'      # UTC, always quoted ISO 8601 with a trailing Z
expires: '2026-12-23T05:00:00Z'     # after this the index is stale (freeze attack) and refused
entries:
- name: demo                        # NAME and VERSION become file names: [A-Za-z0-9][A-Za-z0-9_.+-]*
  version: '1'                      # always a string
  sha256: 9f86d081...               # 64 lowercase hex: sha256 of the image file's bytes
  size: 104857600                   # bytes of the file; a puller never reads more than this
  virtual_size: 2147483648          # optional (schema 2): the disk the guest sees, from the strict
                                    # header reader (catalogue.qcow2; raw: = size); a compressed
                                    # qcow2 has virtual_size far above size
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

## Versions

The schema line names the format's version; a field added to an entry is optional (old entries read
as its default) and raises the version. `render` writes the lowest version that holds its entries
(`salvus-image-index/1` while no entry has a `virtual_size`), so an index with nothing new still
reads on hosts that know only version 1; a host refuses a schema it does not know with one line,
and a version-1 index carrying a version-2 field is refused like any unknown key.

Parsing is strict: the size is checked before YAML is touched (endless data), YAML is read with
the project's safe loader (`cluster.yamlmodel`: libyaml's safe loader, a key given twice refused),
every key is required unless marked optional above, unknown keys, duplicate
NAME@VERSION and wrong types are refused with one line naming the field (pydantic dataclasses
with the shared full-match types). Entries never name files
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
from typing import Any, Iterable, Literal, Optional

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import StrictStr, TypeAdapter, field_validator, model_validator
from pydantic.dataclasses import dataclass

from cluster.errors import DataError, SpecError
from cluster.yamlmodel import STRICT, ImagePart, ImageRef, Name, NonNegativeInt, PositiveInt, UtcTime, full_match
from cluster.yamlmodel import format_time, load_yaml, validate_document
from catalogue.keys import key_id

SCHEMA_V1 = "salvus-image-index/1"
SCHEMA = "salvus-image-index/2"  # 2: entries' optional virtual_size
SCHEMAS = (SCHEMA_V1, SCHEMA)
SIG_HEADER = "# salvus-index-signature/1"
DEFAULT_MAX_INDEX_BYTES = 16 << 20
MAX_SIG_BYTES = 64 << 10
FORMATS = ("qcow2", "raw")

Hex64 = full_match(r"[0-9a-f]{64}", "64 lowercase hex digits")
InfoHash = full_match(r"[0-9a-f]{64}", "a BitTorrent v2 info hash (64 lowercase hex digits)")
TorrentPath = full_match(r"torrents/[A-Za-z0-9][A-Za-z0-9_.+-]{0,150}\.torrent", "'torrents/NAME-VERSION.torrent'")
SeedUrl = full_match(r"https?://[^\s/?#]+/([^\s?#]*/)?", "an http(s) directory URL ending in '/'")
Target = full_match(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}", "a host or cluster name")


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


@dataclass(config=STRICT)
class Entry:
    name: ImagePart
    version: ImagePart
    sha256: Hex64
    size: NonNegativeInt
    format: Literal["qcow2", "raw"]
    roles: list[Name]
    info_hash: InfoHash
    torrent: TorrentPath
    web_seeds: list[SeedUrl]
    created: UtcTime
    expires: Optional[UtcTime] = None
    targets: list[Target] = dataclasses.field(default_factory=list)
    virtual_size: Optional[NonNegativeInt] = None  # schema 2; None: an entry written before it

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
        """The entry as index.yaml lists it: virtual_size beside size, left out when unknown (so an
        entry from before schema 2 renders as it was)."""
        d: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self).items():
            if k == "virtual_size":
                continue
            d[k] = v
            if k == "size" and self.virtual_size is not None:
                d["virtual_size"] = self.virtual_size
        d["created"] = format_time(self.created)
        d["expires"] = format_time(self.expires) if self.expires else None
        return d


def check_virtual_size(entry: Entry, actual: int, source: str) -> None:
    """DataError when the entry records a virtual size other than the header's `actual` one (an
    entry without it, from before schema 2, passes)."""
    if entry.virtual_size is not None and entry.virtual_size != actual:
        raise DataError(f"{source}: virtual size {actual} bytes, the signed index says {entry.virtual_size}")


def check_refs(entries: list[Entry], revoked: list[str]) -> None:
    """NAME@VERSION listed once, and never both listed and revoked (ValueError naming the entry)."""
    seen: set[str] = set()
    gone = set(revoked)
    for i, e in enumerate(entries):
        ref = f"{e.name}@{e.version}"
        if ref in seen:
            raise ValueError(f"entries[{i}]: {ref} is listed twice")
        if ref in gone:
            raise ValueError(f"entries[{i}]: {ref} is both listed and revoked")
        seen.add(ref)


@dataclass(config=STRICT)
class Index:
    version: PositiveInt
    issued: UtcTime
    expires: UtcTime
    entries: list[Entry]
    revoked: list[ImageRef] = dataclasses.field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Index":
        check_refs(self.entries, self.revoked)
        if self.expires <= self.issued:
            raise ValueError("expires: must be later than 'issued'")
        return self

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
        """Inverse of `to_json`, checked like the YAML it was parsed from (pydantic reads the JSON
        itself: no dict in between, as fast as the unchecked copy it replaced)."""
        return TypeAdapter(cls).validate_json(raw)

    def needed_schema(self) -> str:
        """The lowest schema that holds these entries (see Versions above)."""
        return SCHEMA if any(e.virtual_size is not None for e in self.entries) else SCHEMA_V1

    def render(self) -> bytes:
        """The bytes `sign` writes and signs; never used to verify (verification uses the file)."""
        doc: dict[str, Any] = {"schema": self.needed_schema(), "version": self.version,
                               "issued": format_time(self.issued), "expires": format_time(self.expires),
                               "entries": [e.to_yaml_dict() for e in self.entries]}
        if self.revoked:
            doc["revoked"] = list(self.revoked)
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1000).encode()


# ----------------------------------------------------------------------------- strict parsing

@dataclass(config=STRICT, kw_only=True)
class _IndexFile(Index):
    """index.yaml as written: the Index and its schema line."""

    schema: StrictStr

    @field_validator("schema")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value not in SCHEMAS:
            raise ValueError(f"{value!r} is not a version this salvus-jobs reads ({', '.join(SCHEMAS)}); "
                             "an index from a newer endorser needs a newer salvus-jobs here")
        return value

    @model_validator(mode="after")
    def _fields_of_its_schema(self) -> "_IndexFile":
        if self.schema == SCHEMA_V1:
            for i, e in enumerate(self.entries):
                if e.virtual_size is not None:
                    raise ValueError(f"entries[{i}].virtual_size: unknown key in {SCHEMA_V1} "
                                     f"(it came with {SCHEMA})")
        return self


def parse_index(raw: bytes, max_bytes: int = DEFAULT_MAX_INDEX_BYTES, source: str = "index.yaml") -> Index:
    """The Index in `raw`, or DataError naming the first problem. Does NOT check signatures."""
    data = load_yaml(raw, source, DataError, max_bytes=max_bytes)
    doc = validate_document(_IndexFile, data, source, DataError)
    # The entries are validated Entry objects already: Index() takes them as they are.
    return Index(version=doc.version, issued=doc.issued, expires=doc.expires, entries=doc.entries,
                 revoked=doc.revoked)


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
        if len(parts) != 3 or parts[0] != "ed25519" or not re.fullmatch(r"[0-9a-f]{32}", parts[1]):
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
    `threshold` distinct trusted keys signed. Each message says which way it failed. A threshold
    below 1 is refused: with it any bytes, signed by nobody, would verify."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SpecError(f"{source}: signature threshold must be a positive integer, got {threshold!r}")
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
