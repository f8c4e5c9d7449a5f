"""The endorser's catalogue directory: add images, revoke them, sign the index, check it.

```
DIR/catalogue.yaml        origin URL (`url:`) and the last signed version, so versions stay monotonic
DIR/entries.yaml          the draft: entries added since (and including) the last signing, revocations
DIR/index.yaml            the signed index (written only by `sign`, never edited)
DIR/index.yaml.sig        its detached signatures
DIR/images/NAME-VERSION.qcow2|.raw    copies of the endorsed images (the web seed serves these)
DIR/torrents/NAME-VERSION.torrent     BitTorrent v2 metainfo of each image
```
A NAME@VERSION is immutable: adding other bytes under an existing NAME@VERSION is refused.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import StrictStr, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from cluster.errors import DataError, SpecError
from cluster.spec import split_image_ref
from cluster.yamlmodel import STRICT, ImageRef, NonNegativeInt, describe_validation_error, load_yaml
from cluster.yamlmodel import validate_document
from cluster.files import read_limited
from cluster.files import write_atomic
from catalogue.hashcache import sha256_file
from catalogue.index import (DEFAULT_MAX_INDEX_BYTES, Entry, Index, check_refs, check_virtual_size,
                             new_signature_file, now_utc, parse_index, parse_signature_file, sign_index_bytes)
from catalogue.keys import key_id
from catalogue.qcow2 import check_image_header
from catalogue.torrent import check_torrent, make_torrent
from catalogue.trust import check_signed_index

log = logging.getLogger(__name__)

MAX_DRAFT_BYTES = DEFAULT_MAX_INDEX_BYTES
MAX_CONFIG_BYTES = 1 << 16


@dataclass(config=STRICT)
class CatalogueConfig:
    """catalogue.yaml: what the endorser's directory remembers between commands."""

    url: Optional[StrictStr] = None  # the origin URL given to the first `add`
    last_version: Optional[NonNegativeInt] = None  # so versions stay monotonic even without index.yaml


@dataclass(config=STRICT)
class Draft:
    """entries.yaml: the entries the next `sign` publishes, and the revocations."""

    entries: list[Entry] = dataclasses.field(default_factory=list)
    revoked: list[ImageRef] = dataclasses.field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Draft":
        check_refs(self.entries, self.revoked)
        return self


@dataclasses.dataclass
class CatalogueDir:
    root: Path

    @property
    def index_path(self) -> Path:
        return self.root / "index.yaml"

    @property
    def sig_path(self) -> Path:
        return self.root / "index.yaml.sig"

    @property
    def draft_path(self) -> Path:
        return self.root / "entries.yaml"

    @property
    def config_path(self) -> Path:
        return self.root / "catalogue.yaml"

    def image_file(self, entry: Entry) -> Path:
        return self.root / "images" / entry.file_name

    def torrent_file(self, entry: Entry) -> Path:
        return self.root / entry.torrent

    # --- small state files

    def config(self) -> CatalogueConfig:
        if not self.config_path.exists():
            return CatalogueConfig()
        source = str(self.config_path)
        data = load_yaml(read_limited(self.config_path, MAX_CONFIG_BYTES), source, DataError, MAX_CONFIG_BYTES)
        return validate_document(CatalogueConfig, data, source, DataError)

    def save_config(self, **changes) -> None:
        config = dataclasses.replace(self.config(), **changes)
        kept = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
        write_atomic(self.config_path, yaml.safe_dump(kept).encode())

    def draft(self) -> tuple[list[Entry], list[str]]:
        if not self.draft_path.exists():
            return [], []
        source = str(self.draft_path)
        data = load_yaml(read_limited(self.draft_path, MAX_DRAFT_BYTES), source, DataError, MAX_DRAFT_BYTES)
        draft = validate_document(Draft, data, source, DataError)
        return draft.entries, draft.revoked

    def save_draft(self, entries: list[Entry], revoked: list[str]) -> None:
        doc = {"entries": [e.to_yaml_dict() for e in entries], "revoked": sorted(set(revoked))}
        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=1000).encode()
        write_atomic(self.draft_path, b"# unsigned draft; `salvus_jobs catalogue sign` publishes it\n" + body)

    def signed_bytes(self) -> tuple[bytes, bytes] | None:
        if not self.index_path.exists():
            return None
        sig = read_limited(self.sig_path, 1 << 16) if self.sig_path.exists() else b""
        return read_limited(self.index_path, DEFAULT_MAX_INDEX_BYTES), sig

    def signed_index_unverified(self) -> Index | None:
        """The published index as parsed, without checking signatures (for the endorser's own use)."""
        signed = self.signed_bytes()
        return parse_index(signed[0], source=str(self.index_path)) if signed else None


def image_info(image: Path) -> str:
    """The image's format per `qemu-img info`; refuses formats other than qcow2/raw and backing files
    (a base image must be self-contained: a backing file would be read from the host, unverified).
    The header rules proper (`catalogue.qcow2`) run on the copy that is hashed (`add_image`)."""
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", str(image)], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except FileNotFoundError:
        raise SpecError("qemu-img not found (Debian package qemu-utils)") from None
    except subprocess.CalledProcessError as e:
        why = e.stderr.strip().splitlines()[-1] if e.stderr.strip() else str(e)
        raise DataError(f"{image}: qemu-img cannot read it: {why}") from None
    info = json.loads(out)
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise DataError(f"{image}: format {fmt!r}; the catalogue takes qcow2 or raw")
    if info.get("backing-filename"):
        raise DataError(f"{image}: has a backing file ({info['backing-filename']}); "
                        "flatten it first (qemu-img convert -O qcow2)")
    return fmt


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copies src to dest atomically and returns the sha256 of the bytes written (the copy, not a
    second read of a source that might change meanwhile)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def _checked_copy(dest: Path, fmt: str) -> tuple[int, int]:
    """The file and virtual size of the copy in images/ after its header passes `catalogue.qcow2`'s
    rules (the bytes hashed are the bytes checked: the source may change after the copy). The
    virtual size is the strict reader's, never qemu-img's word about a file it was handed."""
    fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        virtual_size = check_image_header(fd, fmt, str(dest))
        return os.fstat(fd).st_size, virtual_size
    finally:
        os.close(fd)


def add_image(cat: CatalogueDir, image: Path, name: str, version: str, roles: list[str], targets: list[str],
              url: str | None, expires: datetime | None = None) -> Entry:
    """Copies the image into images/, makes its torrent, and records the entry in the draft."""
    try:
        split_image_ref(f"{name}@{version}")
    except ValueError as e:
        raise SpecError(f"--name/--version: {e}") from None
    if not image.is_file():
        raise SpecError(f"{image}: no such image file")
    url = url or cat.config().url
    if not url:
        raise SpecError(f"{cat.root}: no origin URL yet: pass --url http://HOST:PORT/ (remembered in catalogue.yaml)")
    if not url.startswith(("http://", "https://")):
        raise SpecError(f"--url: expected http(s)://HOST:PORT/, got {url!r}")
    url = url if url.endswith("/") else url + "/"
    entries, revoked = cat.draft()
    ref = f"{name}@{version}"
    if ref in revoked:
        raise DataError(f"{ref} was revoked; publish the image under a new version")
    fmt = image_info(image)
    try:
        draft = Entry(name=name, version=version, sha256="0" * 64, size=image.stat().st_size, format=fmt,
                      roles=sorted(set(roles)), info_hash="0" * 64, torrent=f"torrents/{name}-{version}.torrent",
                      web_seeds=[url + "images/"], created=now_utc(), expires=expires, targets=sorted(set(targets)))
    except ValidationError as e:  # --role/--target/--url as the index would refuse them
        raise SpecError(f"catalogue add: {describe_validation_error(e, Entry)}") from None
    old = next((e for e in entries if e.ref == ref), None)
    if old is not None and old.sha256 != sha256_file(image):
        raise DataError(f"{ref} is already in the catalogue with different bytes; use a new version")
    dest = cat.image_file(draft)
    copied = old is None or not dest.exists()
    try:
        draft.sha256 = _copy_hashing(image, dest) if copied else old.sha256  # type: ignore[union-attr]
        draft.size, draft.virtual_size = _checked_copy(dest, fmt)
        torrent, draft.info_hash = make_torrent(dest, draft.web_seeds[0])
        write_atomic(cat.torrent_file(draft), torrent)
        if old is not None:
            draft.created = old.created
        cat.save_draft([e for e in entries if e.ref != ref] + [draft], revoked)
        cat.save_config(url=url)
    except BaseException:
        if copied:  # no image file without an entry describing it
            dest.unlink(missing_ok=True)
        raise
    return draft


def revoke(cat: CatalogueDir, ref: str) -> bool:
    """Drops NAME@VERSION from the draft and lists it as revoked in the next signed index."""
    try:
        split_image_ref(ref)
    except ValueError as e:
        raise SpecError(f"revoke: {e}") from None
    entries, revoked = cat.draft()
    if ref in revoked:
        return False
    cat.save_draft([e for e in entries if e.ref != ref], revoked + [ref])
    return True


def sign_index(cat: CatalogueDir, key: Ed25519PrivateKey, valid_for: timedelta) -> Index:
    """Writes index.yaml (draft + next version) and a fresh index.yaml.sig over its exact bytes."""
    entries, revoked = cat.draft()
    published = cat.signed_index_unverified()
    last = max(cat.config().last_version or 0, published.version if published else 0)
    issued = now_utc()
    index = Index(version=last + 1, issued=issued, expires=issued + valid_for, entries=entries, revoked=revoked)
    raw = index.render()
    parse_index(raw, source="the index about to be signed")  # never publish what hosts would refuse
    sig = new_signature_file([sign_index_bytes(raw, key)])
    cat.save_config(last_version=index.version)
    # Two files cannot be replaced in one step: a client reading between the two renames gets a
    # signature that does not match, refuses, and succeeds at its next poll.
    write_atomic(cat.sig_path, sig)
    write_atomic(cat.index_path, raw)
    return index


def cosign_index(cat: CatalogueDir, key: Ed25519PrivateKey) -> Index:
    """Adds this key's signature of the published index.yaml (for a threshold above 1)."""
    signed = cat.signed_bytes()
    if signed is None:
        raise SpecError(f"{cat.index_path}: nothing to co-sign; run `sign` first")
    raw, sig = signed
    index = parse_index(raw, source=str(cat.index_path))
    mine = key_id(key.public_key())
    others = [f"ed25519 {s.key_id} {base64.b64encode(s.signature).decode()}\n"
              for s in (parse_signature_file(sig, str(cat.sig_path)) if sig.strip() else []) if s.key_id != mine]
    write_atomic(cat.sig_path, new_signature_file(others + [sign_index_bytes(raw, key)]))
    return index


def verify_catalogue(cat: CatalogueDir, keys: list[Ed25519PublicKey], threshold: int) -> tuple[Index | None, list[str]]:
    """Every problem of the published catalogue, one line each: signature, expiry, each image's
    bytes and torrent. An empty list means the catalogue is sound."""
    signed = cat.signed_bytes()
    if signed is None:
        return None, [f"{cat.index_path}: missing (run `salvus_jobs catalogue sign`)"]
    try:
        index = check_signed_index(signed[0], signed[1], keys, threshold, DEFAULT_MAX_INDEX_BYTES,
                                   source=str(cat.index_path))
    except DataError as e:
        problems = [str(e)]
        try:
            index = parse_index(signed[0], source=str(cat.index_path))
        except DataError:
            return None, problems
    else:
        problems = []
    for entry in index.entries:
        problems += _entry_problems(cat, entry)
    return index, problems


def _entry_problems(cat: CatalogueDir, entry: Entry) -> list[str]:
    path = cat.image_file(entry)
    try:
        st = path.stat()
    except OSError as e:
        return [f"{entry.ref}: {path}: {e.strerror}"]
    problems = []
    if st.st_size != entry.size:
        problems.append(f"{entry.ref}: {path}: {st.st_size} bytes, the index says {entry.size}")
    elif sha256_file(path) != entry.sha256:
        problems.append(f"{entry.ref}: {path}: sha256 does not match the index (tampered or corrupt)")
    else:
        try:
            check_virtual_size(entry, _checked_copy(path, entry.format)[1], str(path))
        except DataError as e:
            problems.append(f"{entry.ref}: {e}")
    try:
        check_torrent(entry, read_limited(cat.torrent_file(entry), 16 << 20), str(cat.torrent_file(entry)))
    except DataError as e:
        problems.append(f"{entry.ref}: {e}")
    return problems

