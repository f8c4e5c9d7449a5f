"""The site's approvals: which endorsed images this site lets its hypervisors boot.

Endorsement is the endorser's word; approval is the site admin's, kept with the hypervisors'
state (`STORE/state/approvals.yaml`), never in the endorser's catalogue directory. An entry is
`NAME@VERSION` or `NAME@*` (every endorsed version of NAME):

```yaml
# written by `salvus_jobs catalogue approve/unapprove`
approved: [demo@1, sage-ubuntu@*]
```
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, StrictStr
from pydantic.dataclasses import dataclass

from cluster.errors import DataError, SpecError
from cluster.spec import ClusterSpec
from cluster.store import Store
from cluster.yamlmodel import STRICT, load_yaml, split_image_ref, validate_document
from cluster.files import locked, read_limited, write_atomic

MAX_APPROVALS_BYTES = 1 << 20
HEADER = b"# written by `salvus_jobs catalogue approve/unapprove`\n"


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
class Approvals:
    """approvals.yaml: what this site lets its hypervisors boot, NAME@VERSION or NAME@*."""

    approved: list[ApprovalPattern] = dataclasses.field(default_factory=list)


def check_pattern(ref: str) -> str:
    """NAME@VERSION or NAME@*; SpecError (78) otherwise."""
    try:
        return _pattern(ref)
    except ValueError as e:
        raise SpecError(f"approval {ref!r}: {e}") from None


def load_approvals(spec: ClusterSpec) -> list[str]:
    path = approvals_path(spec)
    if not path.exists():
        return []
    data = load_yaml(read_limited(path, MAX_APPROVALS_BYTES), str(path), DataError, MAX_APPROVALS_BYTES)
    return list(validate_document(Approvals, data, str(path), DataError).approved)


def is_approved(spec: ClusterSpec, name: str, version: str) -> bool:
    approved = load_approvals(spec)
    return f"{name}@{version}" in approved or f"{name}@*" in approved


def _save(spec: ClusterSpec, approved: list[str]) -> None:
    body = yaml.safe_dump({"approved": approved}, default_flow_style=False).encode()
    write_atomic(approvals_path(spec), HEADER + body)


def approve(spec: ClusterSpec, ref: str) -> bool:
    """Adds `ref`; False when it was already there."""
    check_pattern(ref)
    with locked(Store.of(spec).open().trust.approvals_lock):
        approved = load_approvals(spec)
        if ref in approved:
            return False
        _save(spec, sorted(approved + [ref]))
    return True


def unapprove(spec: ClusterSpec, ref: str) -> bool:
    """Removes `ref`; False when it was not there."""
    check_pattern(ref)
    with locked(Store.of(spec).open().trust.approvals_lock):
        approved = load_approvals(spec)
        if ref not in approved:
            return False
        _save(spec, [a for a in approved if a != ref])
    return True
