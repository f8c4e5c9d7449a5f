"""Trust on the hypervisor: which signed index this host accepted, and whether an image may boot.

An image (and a role's direct-boot kernel/initrd, which are catalogue entries too) may boot only
when these checks pass, in this order:
  1. index fresh — an accepted index exists, its signatures still verify with the spec's trust
     anchors (threshold), and it has not expired (a frozen mirror cannot keep a host on old images);
  2. endorsed    — NAME@VERSION is an entry of that index, not revoked, not expired, for this role;
  3. approved    — the site's approvals list it and pin exactly the entry's sha256, size and
                   format (`catalogue.approvals`);
  4. file        — opened once (O_NOFOLLOW), StrictModes (only root or the store's owner can change
     it: `catalogue.imagefile`), and a self-contained header for the entry's format (`catalogue.qcow2`)
     giving the entry's virtual size when it records one (compressed clusters are fine);
  5. hash        — the size and sha256 of that descriptor match the entry (cached per file stamp).
`verified_image` returns the open file (QEMU gets its descriptor, never the path again), raises
DataError (exit 65) naming the failed check and creates nothing on failure.

Accepting an index (`accept_index`, used by `salvus_jobs catalogue accept` and imgdist) checks, in
order: size before reading (endless data), signatures over the exact bytes (arbitrary software,
mix-and-match), structure, expiry (freeze), version not older than the last accepted one and not the
same version with other bytes (rollback), and no entry the accepted index lists with other sha256,
size or format (an endorser changing a version's bytes). Only then is the copy stored, atomically,
under `STORE/trust/catalogue/` (`Store.checked_trust`: owned by the store's owner, writable by no
one else): `index-V-SHA.yaml` (the exact bytes), `.yaml.sig`, `.yaml.json` (the parsed form, so a
boot need not re-parse a large index; its sha256 is in the pointer) and the pointer
`accepted.json`, whose rename is the commit point. Then the approvals are pinned to the entries they
cover that had no pin yet (`approvals.pin_accepted`).

The accepted index is the rollback floor only while it still verifies under the current trust
anchors: after a compromised key is removed from the spec, an index it signed (say `version: 2**62`)
would otherwise refuse every real index forever. Like TUF after a root rotation, such an index stops
being the floor (with a WARNING naming its version and why) and the next valid index is accepted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cluster.errors import DataError, SpecError
from cluster.spec import ClusterSpec, boot_ref, split_image_ref
from cluster.store import Store, image_file_name
from catalogue import approvals, hashcache
from catalogue.approvals import is_approved
from cluster.files import locked, read_limited, write_atomic
from catalogue.imagefile import OpenImage, open_image, suffix_format
from catalogue.index import Entry, Index, check_virtual_size, format_time, now_utc, parse_index, verify_signatures
from catalogue.keys import load_trust_keys

log = logging.getLogger(__name__)

CHECKS = ("index fresh", "endorsed", "approved", "file", "hash")
__all__ = ["accept_index", "accepted_index", "accepted_version", "base_image_path", "check_image_bytes",
           "check_signed_index", "is_approved", "trust_keys", "verified_boot_files",
           "verified_image"]


def state_dir(spec: ClusterSpec) -> Path:
    return Store.of(spec).trust.catalogue_dir


def hash_cache_path(spec: ClusterSpec) -> Path:
    return Store.of(spec).trust.hash_cache


def trust_keys(spec: ClusterSpec) -> list[Ed25519PublicKey]:
    if not spec.catalogue.trust.keys:
        raise SpecError(f"{spec.source}: catalogue.trust.keys: no endorser keys configured (or set "
                        "catalogue.insecure_allow_unsigned: true for development)")
    return load_trust_keys(spec.catalogue.trust.keys)


def check_signed_index(index_bytes: bytes, sig_bytes: bytes, keys: list[Ed25519PublicKey], threshold: int,
                       max_bytes: int, source: str = "index.yaml") -> Index:
    """Size, then signatures over the exact bytes, then structure, then expiry; the parser only
    ever sees bytes a trusted key signed."""
    if len(index_bytes) > max_bytes:
        raise DataError(f"{source}: {len(index_bytes)} bytes exceeds the limit of {max_bytes} bytes; "
                        "refused unread")
    verify_signatures(index_bytes, sig_bytes, keys, threshold, source=f"{source}.sig")
    index = parse_index(index_bytes, max_bytes=max_bytes, source=source)
    if index.expired():
        raise DataError(f"{source}: version {index.version} expired at {format_time(index.expires)} "
                        "(stale index: the endorser must re-sign)")
    return index


def check_lifetime(index: Index, max_days: int, source: str) -> None:
    """DataError when the endorser made the index valid for longer than the site allows
    (catalogue.max_index_lifetime_days): a leaked old index must not stay replayable for years."""
    if index.expires - index.issued > timedelta(days=max_days):
        raise DataError(f"{source}: version {index.version} is valid from {format_time(index.issued)} to "
                        f"{format_time(index.expires)}, longer than catalogue.max_index_lifetime_days "
                        f"({max_days}): refused")


def _pointer_path(spec: ClusterSpec) -> Path:
    return state_dir(spec) / "accepted.json"


def _owners(spec: ClusterSpec) -> frozenset[int]:
    """Who may have written the trust state, once its directories pass `Store.checked_trust`."""
    return Store.of(spec).checked_trust().owners


def _read_pointer(spec: ClusterSpec) -> dict | None:
    path = _pointer_path(spec)
    owners = _owners(spec)
    if not path.exists():
        return None
    try:
        ptr = json.loads(read_limited(path, 1 << 16, owners=owners))
        int(ptr["version"]), str(ptr["sha256"]), str(ptr["index"]), str(ptr["sig"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: damaged; re-run `salvus_jobs catalogue accept`") from None
    return ptr


def accepted_version(spec: ClusterSpec) -> int:
    """The version of the last accepted index, 0 when none."""
    ptr = _read_pointer(spec)
    return int(ptr["version"]) if ptr else 0


def _accepted_bytes(spec: ClusterSpec) -> tuple[bytes, bytes, dict] | None:
    """(index bytes, signature bytes, pointer) of the accepted index, or None."""
    ptr = _read_pointer(spec)
    if ptr is None:
        return None
    d, owners = state_dir(spec), _owners(spec)
    raw = read_limited(d / Path(ptr["index"]).name, spec.catalogue.max_index_bytes, owners=owners)
    sig = read_limited(d / Path(ptr["sig"]).name, 1 << 16, owners=owners)
    if hashlib.sha256(raw).hexdigest() != ptr["sha256"]:
        raise DataError(f"{d / ptr['index']}: changed since it was accepted")
    return raw, sig, ptr


def _parsed(spec: ClusterSpec, raw: bytes, ptr: dict) -> Index:
    """The accepted index as parsed at acceptance (a JSON copy: parsing a 1,000-entry YAML index
    costs ~0.3 s, which every boot would pay), else parsed again from the signed bytes. The copy is
    used only when its sha256 is the one the pointer recorded at acceptance, so the copy alone can
    never change a boot decision; a pointer from before that pin re-parses."""
    parsed, pinned = ptr.get("parsed"), ptr.get("parsed_sha256")
    if isinstance(parsed, str) and isinstance(pinned, str):
        try:
            copy = read_limited(state_dir(spec) / Path(parsed).name, 4 * spec.catalogue.max_index_bytes,
                                owners=_owners(spec))
            if hashlib.sha256(copy).hexdigest() != pinned:
                raise ValueError("changed since it was accepted")
            index = Index.from_json(copy)
            if index.version == int(ptr["version"]):
                return index
        except (DataError, ValueError, KeyError, TypeError) as e:
            log.warning("parsed copy of the accepted index is unusable (%s); parsing the index again",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
    return parse_index(raw, max_bytes=spec.catalogue.max_index_bytes, source=str(state_dir(spec) / "accepted index"))


def accepted_index(spec: ClusterSpec) -> Index | None:
    """The index this host last accepted (as stored; see `verified_image` for the full checks)."""
    stored = _accepted_bytes(spec)
    return _parsed(spec, stored[0], stored[2]) if stored else None


def trusted_accepted_index(spec: ClusterSpec) -> Index | None:
    """The accepted index when it still verifies under the spec's trust anchors (what `approve`
    pins from), else None."""
    if not spec.catalogue.trust.keys:
        return None
    floor = _rollback_floor(spec, warn=False)
    return floor[1] if floor else None


def _rollback_floor(spec: ClusterSpec, warn: bool = True) -> tuple[dict, Index | None] | None:
    """(pointer, index) of the accepted index while it is the rollback floor. An accepted index
    that no longer verifies under the current anchors is not (see the module docstring): None,
    with a WARNING when `warn`. Damaged stored bytes keep the pointer's version as the floor (damage
    must not open the door to an old index), without an index to compare entries with."""
    ptr = _read_pointer(spec)
    if ptr is None:
        return None
    try:
        stored = _accepted_bytes(spec)
    except DataError as e:
        if warn:
            log.warning("accepted index version %s is unreadable (%s); it stays the rollback floor",
                        ptr["version"], e)
        return ptr, None
    if stored is None:
        return None
    raw, sig, ptr = stored
    try:
        verify_signatures(raw, sig, trust_keys(spec), spec.catalogue.trust.threshold,
                          source=f"accepted index {state_dir(spec)}.sig")
    except DataError as e:
        if warn:
            log.warning("accepted index version %s no longer verifies under the current trust anchors "
                        "(%s): it is no longer the rollback floor", ptr["version"], e)
        return None
    return ptr, _parsed(spec, raw, ptr)


def _refuse_rollback(spec: ClusterSpec, index: Index, digest: str, warn: bool = False) -> bool:
    """True when this exact index is already the accepted one; DataError on rollback, equivocation
    or an entry whose bytes changed."""
    floor = _rollback_floor(spec, warn=warn)
    if floor is None:
        return False
    ptr, old = floor
    last = int(ptr["version"])
    if index.version < last:
        raise DataError(f"index version {index.version} is older than the accepted version {last}: "
                        "rollback refused")
    if index.version == last and digest != ptr["sha256"]:
        raise DataError(f"index version {index.version} was already accepted with different content: "
                        "refused (an endorser must bump the version on every change)")
    for e in index.entries if old else []:
        was = old.find(e.name, e.version)  # type: ignore[union-attr]
        changed = [f for f in ("sha256", "size", "format") if was and getattr(was, f) != getattr(e, f)]
        if changed:
            raise DataError(f"index version {index.version}: {e.ref} has another {', '.join(changed)} than in "
                            f"the accepted version {last}: refused (changed bytes need a new image version)")
    return index.version == last and isinstance(ptr.get("parsed_sha256"), str)


def accept_index(spec: ClusterSpec, index_bytes: bytes, sig_bytes: bytes) -> Index:
    """Verifies a fetched index and, if it passes every check, makes it this host's accepted index
    and pins the approvals it is the first to list."""
    cat = spec.catalogue
    index = check_signed_index(index_bytes, sig_bytes, trust_keys(spec), cat.trust.threshold, cat.max_index_bytes)
    check_lifetime(index, cat.max_index_lifetime_days, "index.yaml")
    digest = hashlib.sha256(index_bytes).hexdigest()
    # Checked before taking the lock as well, so a refused index leaves the state untouched.
    if _refuse_rollback(spec, index, digest):
        approvals.pin_accepted(spec, index)
        return index
    d = state_dir(spec)
    with locked(Store.of(spec).open().checked_trust(create=True).catalogue_lock):
        if _refuse_rollback(spec, index, digest, warn=True):
            approvals.pin_accepted(spec, index)
            return index
        old = _read_pointer(spec)
        name = f"index-{index.version}-{digest[:16]}.yaml"
        parsed = index.to_json()
        write_atomic(d / name, index_bytes)
        write_atomic(d / f"{name}.sig", sig_bytes)
        write_atomic(d / f"{name}.json", parsed)
        pointer = {"version": index.version, "sha256": digest, "index": name, "sig": f"{name}.sig",
                   "parsed": f"{name}.json", "parsed_sha256": hashlib.sha256(parsed).hexdigest(),
                   "accepted": format_time(now_utc()), "expires": format_time(index.expires)}
        write_atomic(_pointer_path(spec), json.dumps(pointer, indent=1).encode())
        if old:
            for f in (old["index"], old["sig"], old.get("parsed")):
                if isinstance(f, str) and Path(f).name not in (name, f"{name}.sig", f"{name}.json"):
                    (d / Path(f).name).unlink(missing_ok=True)
    pinned = approvals.pin_accepted(spec, index)
    log.info("accepted catalogue index version %d (%d entries, expires %s)%s", index.version,
             len(index.entries), format_time(index.expires), f"; pinned {', '.join(pinned)}" if pinned else "")
    return index


def store_owner(spec: ClusterSpec) -> int:
    """The uid whose files the store trusts besides root's (StrictModes, `catalogue.imagefile`)."""
    root = Store.of(spec).root
    try:
        return os.stat(root).st_uid
    except OSError as e:
        raise DataError(f"{root}: cannot read the store: {e.strerror or e}") from None


def check_image_bytes(spec: ClusterSpec, entry: Entry, image: OpenImage) -> None:
    """DataError unless the open `image` holds exactly the entry's bytes, hashed from the descriptor
    QEMU will read. The sha256 is remembered per file stamp in STORE/state (only ever for files that
    passed StrictModes: nobody else can write them), so an unchanged image is not re-read at every boot."""
    st = os.fstat(image.fd)
    if st.st_size != entry.size:
        raise DataError(f"{image.path}: {st.st_size} bytes, but {entry.ref} has {entry.size}")
    cache = hash_cache_path(spec)
    digest = hashcache.cached_sha256(cache, image.path, st)
    if digest is None:
        try:
            digest, stamp = hashcache.hash_fd_with_stamp(image.fd, str(image.path))
        except OSError as e:
            raise DataError(f"{image.path}: cannot hash image: {e}") from None
        if digest == entry.sha256:
            hashcache.remember(cache, image.path, digest, stamp)
    if digest != entry.sha256:
        raise DataError(f"{image.path}: sha256 {digest[:16]}... does not match {entry.ref}'s {entry.sha256[:16]}... "
                        "(tampered or corrupt)")


def _store_image_path(spec: ClusterSpec, file_name: str) -> Path:
    try:
        return Store.of(spec).base_image(file_name)
    except ValueError as e:
        raise DataError(str(e)) from None


def base_image_path(spec: ClusterSpec, image_ref: str) -> Path:
    """STORE/images/base/NAME-VERSION.qcow2; the name was validated not to escape the store."""
    name, version = split_image_ref(image_ref)
    return _store_image_path(spec, image_file_name(name, version))


def image_path(spec: ClusterSpec, role_name: str, entry: Entry | None = None) -> Path:
    """Where a role's image is read from: its explicit `image_path`, else the store's base/."""
    role = spec.role(role_name)
    if role.image_path:
        return Path(role.image_path)
    return _store_image_path(spec, entry.file_name) if entry else base_image_path(spec, role.image)


class _Refusal:
    def __init__(self, ref: str, role: str):
        self.ref, self.role = ref, role

    def __call__(self, check: str, detail: str) -> DataError:
        assert check in CHECKS
        return DataError(f"image {self.ref} for role {self.role}: {check} check failed: {detail}")


def _fresh_index(spec: ClusterSpec, refuse: _Refusal) -> Index:
    keys = trust_keys(spec)  # a spec without anchors is a configuration error (78), said first
    try:
        stored = _accepted_bytes(spec)
    except DataError as e:
        raise refuse("index fresh", str(e)) from None
    if stored is None:
        raise refuse("index fresh", f"this host has accepted no signed index yet (run `salvus_jobs "
                                    f"catalogue accept` or imgdist); state dir {state_dir(spec)}")
    raw, sig, ptr = stored
    source = f"accepted index {state_dir(spec)}"
    try:
        # The signatures are checked again at every boot: a key removed from the spec (compromised
        # endorser) stops its indexes at once, without waiting for the next accept.
        verify_signatures(raw, sig, keys, spec.catalogue.trust.threshold, source=f"{source}.sig")
        index = _parsed(spec, raw, ptr)
    except DataError as e:
        raise refuse("index fresh", str(e)) from None
    if index.expired():
        raise refuse("index fresh", f"{source}: version {index.version} expired at {format_time(index.expires)} "
                                    "(stale index: the endorser must re-sign, then accept it)")
    try:  # checked at boot too: the spec's limit may have been lowered since the accept
        check_lifetime(index, spec.catalogue.max_index_lifetime_days, source)
    except DataError as e:
        raise refuse("index fresh", str(e)) from None
    return index


def _endorsed_entry(index: Index, role_name: str, name: str, version: str, refuse: _Refusal) -> Entry:
    ref = f"{name}@{version}"
    if ref in index.revoked:
        raise refuse("endorsed", f"revoked by the endorser in index version {index.version}")
    entry = index.find(name, version)
    if entry is None:
        raise refuse("endorsed", f"not in the accepted signed index (version {index.version})")
    if entry.expired():
        raise refuse("endorsed", f"the endorsement expired at {format_time(entry.expires)}")  # type: ignore[arg-type]
    if not entry.serves(role_name):
        raise refuse("endorsed", f"endorsed for roles {', '.join(entry.roles)}, not {role_name}")
    return entry


def _approved_entry(spec: ClusterSpec, index: Index, role_name: str, ref: str, refuse: _Refusal) -> Entry:
    name, version = split_image_ref(ref)
    entry = _endorsed_entry(index, role_name, name, version, refuse)
    try:
        refusal = approvals.refusal(spec, entry)
    except DataError as e:
        raise refuse("approved", str(e)) from None
    if refusal:
        raise refuse("approved", refusal)
    return entry


def _opened(spec: ClusterSpec, entry: Entry, where: Callable[[], Path], refuse: _Refusal) -> OpenImage:
    try:
        image = open_image(where(), entry.format, store_owner(spec))
    except DataError as e:
        raise refuse("file", str(e)) from None
    try:
        check_virtual_size(entry, image.virtual_size, str(image.path))
    except DataError as e:
        image.close()
        raise refuse("file", str(e)) from None
    try:
        check_image_bytes(spec, entry, image)
    except DataError as e:
        image.close()
        raise refuse("hash", str(e)) from None
    return image


def verified_image(spec: ClusterSpec, role_name: str) -> OpenImage:
    """The image `role_name` may boot, opened once, after every check above (the qcow2 header rules
    included); DataError (65) naming the failed check otherwise. The caller hands QEMU the
    descriptor (never the path again) and closes it. Reads only; the hash cache is updated only
    after a successful hash."""
    role = spec.role(role_name)
    refuse = _Refusal(role.image, role_name)
    if spec.catalogue.insecure_allow_unsigned:
        log.warning("catalogue.insecure_allow_unsigned is set: booting %s for role %s WITHOUT "
                    "signature, approval or hash checks", role.image, role_name)
        path = image_path(spec, role_name)
        try:  # no signed entry to give the format: the suffix rule, never probing; headers still checked
            return open_image(path, suffix_format(path), None)
        except DataError as e:
            raise DataError(f"image {role.image} for role {role_name}: {e}") from None
    index = _fresh_index(spec, refuse)
    entry = _approved_entry(spec, index, role_name, role.image, refuse)
    return _opened(spec, entry, lambda: image_path(spec, role_name, entry), refuse)


def verified_boot_files(spec: ClusterSpec, role_name: str) -> dict[str, OpenImage]:
    """The role's direct-boot files (`kernel`, `initrd`), opened once. With the catalogue on each
    must be a catalogue entry NAME@VERSION passing the same four checks as the image (a file path
    is refused with one line); in insecure mode a path is opened as it is."""
    boot = spec.role(role_name).boot
    wanted = {k: v for k, v in (("kernel", boot.kernel), ("initrd", boot.initrd)) if v} if boot else {}
    opened: dict[str, OpenImage] = {}
    try:
        for label, value in wanted.items():
            opened[label] = _boot_file(spec, role_name, label, value)
    except BaseException:
        for f in opened.values():
            f.close()
        raise
    return opened


def _boot_file(spec: ClusterSpec, role_name: str, label: str, value: str) -> OpenImage:
    ref = boot_ref(value)
    if spec.catalogue.insecure_allow_unsigned:
        path = _store_image_path(spec, image_file_name(*ref, "raw")) if ref else Path(value)
        try:
            return open_image(path, "raw", None)
        except DataError as e:
            raise DataError(f"roles.{role_name}.boot.{label}: {e}") from None
    if ref is None:
        raise SpecError(f"{spec.source}: roles.{role_name}.boot.{label}: {value!r} is a file; with the "
                        "catalogue on it must name a catalogue entry NAME@VERSION (endorsed, approved)")
    refuse = _Refusal(value, role_name)
    entry = _approved_entry(spec, _fresh_index(spec, refuse), role_name, value, refuse)
    if entry.format != "raw":
        raise refuse("endorsed", f"boot.{label} must be a raw entry (the file's bytes), not {entry.format}")
    return _opened(spec, entry, lambda: _store_image_path(spec, entry.file_name), refuse)
