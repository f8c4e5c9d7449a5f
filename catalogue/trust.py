"""The pre-boot trust check the wrapper (and imgdist) call before using an image.

`verified_image(spec, role)` returns the base image file a role may boot from, or raises
DataError (exit 65) with one line naming which check failed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.errors import DataError
from cluster.spec import ClusterSpec, split_image_ref

log = logging.getLogger(__name__)


def base_image_path(spec: ClusterSpec, image_ref: str) -> Path:
    """images/base/NAME-VERSION.qcow2 in the store; the name was validated not to escape it."""
    name, version = split_image_ref(image_ref)
    base = (spec.store_path / "images" / "base").resolve()
    path = (base / f"{name}-{version}.qcow2").resolve()
    if path.parent != base:
        raise DataError(f"image {image_ref!r}: resolves outside the image store")
    return path


def verified_image(spec: ClusterSpec, role_name: str) -> Path:
    role = spec.role(role_name)
    path = Path(role.image_path) if role.image_path else base_image_path(spec, role.image)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise DataError(f"image {role.image} for role {role_name}: {path} is missing or unreadable")
    return path
