"""The site's approvals: which endorsed images this site lets its hypervisors boot, and the bytes
each approval pins.

Endorsement is the endorser's word; approval is the site admin's, kept with the hypervisor's trust
state (`STORE/trust/approvals.yaml`, `cluster.store`), never in the endorser's catalogue directory.
An entry is `NAME@VERSION` or `NAME@*` (every endorsed version of NAME). An approval holds only for
the bytes it pinned: `pinned` records sha256, size and format per NAME@VERSION, so a later index
that gives `demo@1` other bytes cannot get them booted.

- `approve NAME@VERSION` pins the entry of the accepted index (verified under the current trust
  anchors); when that index does not list it yet, the first accepted index that does pins it.
- `approve NAME@*` pins every version the accepted index lists, and each new version when the
  first index listing it is accepted: `@*` trusts the endorser for versions not yet seen, never to
  change the bytes of a version already seen.
- `unapprove` drops the approval and the pins no other approval covers; unapproving and approving
  again is how an admin accepts new bytes for a version on purpose.

```yaml
# written by `salvus_jobs catalogue approve/unapprove` (and `accept`, which pins)
approved: [demo@1, sage-ubuntu@*]
pinned:
  demo@1: {sha256: 5f1e...64 hex, size: 4456448, format: qcow2}
```
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, StrictStr
from pydantic.dataclasses import dataclass

from cluster.errors import DataError, SpecError
from cluster.spec import ClusterSpec
from cluster.store import Store
from cluster.yamlmodel import STRICT, ImageRef, NonNegativeInt, load_yaml, split_image_ref, validate_document
from cluster.files import locked, read_limited, write_atomic
from catalogue.index import Entry, Hex64, Index

MAX_APPROVALS_BYTES = 1 << 20
HEADER = b"# written by `salvus_jobs catalogue approve/unapprove` (and `accept`, which pins)\n"


def approvals_path(spec: ClusterSpec) -> Path:
    return Store.of(spec).trust.approvals


def _pattern(ref: str) -> str:
    name, _, version = ref.partition("@")
    try:
        split_image_ref(f"{name}@{'any' if version == '*' else version}")
    except ValueError as e:
        raise ValueError(f"{e} (or NAME@* for every version)") from None
    return ref


ApprovalPattern = Annotated[StrictStr, AfterValidator(_pattern)]  # NAME@VERSION or NAME@*


@dataclass(config=STRICT)
class Pin:
    """The bytes an approval holds for: what the accepted index said when it was pinned."""

    sha256: Hex64
    size: NonNegativeInt
    format: Literal["qcow2", "raw"]

    @classmethod
    def of(cls, entry: Entry) -> "Pin":
        return cls(entry.sha256, entry.size, entry.format)


@dataclass(config=STRICT)
class Approvals:
    """approvals.yaml: what this site lets its hypervisors boot (NAME@VERSION or NAME@*) and, per
    NAME@VERSION, the bytes pinned for it."""

    approved: list[ApprovalPattern] = dataclasses.field(default_factory=list)
    pinned: dict[ImageRef, Pin] = dataclasses.field(default_factory=dict)

    def covers(self, name: str, version: str) -> bool:
        return f"{name}@{version}" in self.approved or f"{name}@*" in self.approved


def check_pattern(ref: str) -> str:
    """NAME@VERSION or NAME@*; SpecError (78) otherwise."""
    try:
        return _pattern(ref)
    except ValueError as e:
        raise SpecError(f"approval {ref!r}: {e}") from None


def load(spec: ClusterSpec) -> Approvals:
    """The approvals file, read only from the checked trust directory (`Store.checked_trust`)."""
    trust = Store.of(spec).checked_trust()
    if not trust.approvals.exists():
        return Approvals()
    raw = read_limited(trust.approvals, MAX_APPROVALS_BYTES, owners=trust.owners)
    data = load_yaml(raw, str(trust.approvals), DataError, MAX_APPROVALS_BYTES)
    return validate_document(Approvals, data, str(trust.approvals), DataError)


def load_approvals(spec: ClusterSpec) -> list[str]:
    return list(load(spec).approved)


def is_approved(spec: ClusterSpec, name: str, version: str) -> bool:
    """The site's word alone (for listings); `refusal` also checks the pinned bytes."""
    return load(spec).covers(name, version)


def refusal(spec: ClusterSpec, entry: Entry, loaded: Approvals | None = None) -> str | None:
    """Why `entry` may not boot or be pulled here (not approved, never pinned, or other bytes than
    the ones pinned), or None when the site's approval holds for exactly these bytes. `loaded`:
    the approvals already read, when checking many entries."""
    ap = loaded or load(spec)
    if not ap.covers(entry.name, entry.version):
        return (f"not in the site's approvals ({approvals_path(spec)}); an admin runs "
                f"`salvus_jobs catalogue approve {entry.ref}`")
    pin = ap.pinned.get(entry.ref)
    if pin is None:
        return (f"approved, but no bytes are pinned for it in {approvals_path(spec)}; run `salvus_jobs "
                "catalogue accept` (it pins approved entries of the accepted index)")
    if pin != Pin.of(entry):
        return (f"the index gives {entry.ref} other bytes than the approval pinned (sha256 {pin.sha256[:16]}..., "
                f"{pin.size} bytes, {pin.format}; now {entry.sha256[:16]}..., {entry.size} bytes, {entry.format}); "
                f"to trust the new bytes an admin unapproves and approves {entry.ref} again")
    return None


def _save(spec: ClusterSpec, ap: Approvals) -> None:
    doc = {"approved": sorted(ap.approved),
           "pinned": {ref: dataclasses.asdict(pin) for ref, pin in sorted(ap.pinned.items())}}
    body = yaml.safe_dump(doc, default_flow_style=False, sort_keys=False).encode()
    write_atomic(approvals_path(spec), HEADER + body)


def _update(spec: ClusterSpec, change) -> bool:
    """Runs `change(approvals) -> bool` under the approvals lock and saves when it says so."""
    trust = Store.of(spec).open().checked_trust(create=True)
    with locked(trust.approvals_lock):
        ap = load(spec)
        changed = change(ap)
        if changed:
            _save(spec, ap)
    return changed


def _pin_new(ap: Approvals, entries: list[Entry]) -> list[str]:
    """Pins the approved entries that have no pin yet; an existing pin is never replaced."""
    new = [e for e in entries if ap.covers(e.name, e.version) and e.ref not in ap.pinned]
    for e in new:
        ap.pinned[e.ref] = Pin.of(e)
    return [e.ref for e in new]


def approve(spec: ClusterSpec, ref: str, accepted: Index | None = None) -> bool:
    """Adds `ref` and pins what it covers in `accepted` (default: this host's accepted index, when
    it verifies under the current trust anchors); False when nothing changed."""
    check_pattern(ref)
    if accepted is None:
        # trust.py imports this module for the boot check, so the accepted index is looked up here.
        from catalogue.trust import trusted_accepted_index
        accepted = trusted_accepted_index(spec)
    entries = accepted.entries if accepted else []

    def change(ap: Approvals) -> bool:
        added = ref not in ap.approved
        if added:
            ap.approved.append(ref)
        return bool(_pin_new(ap, entries)) or added
    return _update(spec, change)


def pin_accepted(spec: ClusterSpec, index: Index) -> list[str]:
    """Pins the approved entries of a just-accepted index that have no pin yet (the first index
    that lists an approved NAME@VERSION fixes its bytes); the refs pinned."""
    if not _pin_new(load(spec), index.entries):
        return []  # the common case, without taking the lock
    pinned: list[str] = []

    def change(ap: Approvals) -> bool:
        pinned.extend(_pin_new(ap, index.entries))
        return bool(pinned)
    _update(spec, change)
    return pinned


def unapprove(spec: ClusterSpec, ref: str) -> bool:
    """Removes `ref` and the pins no remaining approval covers; False when it was not there."""
    check_pattern(ref)

    def change(ap: Approvals) -> bool:
        if ref not in ap.approved:
            return False
        ap.approved.remove(ref)
        for pinned_ref in list(ap.pinned):
            if not ap.covers(*split_image_ref(pinned_ref)):
                del ap.pinned[pinned_ref]
        return True
    return _update(spec, change)
