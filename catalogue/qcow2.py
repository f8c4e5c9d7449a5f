"""The one door for qcow2 header rules: a base image must be self-contained.

A qcow2 header can make QEMU read other files: a backing file (header field), an external data
file (incompatible feature bit 2 plus the 0x44415441 header extension) whose clusters ARE the
guest's disk, so an endorsed 1 MiB image could show the guest any host file (OSSA-2024-001).
`check_qcow2` refuses both, and any incompatible feature bit this module does not know (a future
bit may mean another way to reach outside the file). Allowed are the bits a plain image carries:
0 dirty, 1 corrupt (QEMU itself refuses to write a corrupt image), 3 compression type (zstd),
4 extended L2. The compression type byte (offset 104, present when a v3 header is at least 105
bytes long) must be 0 zlib or 1 zstd and agree with bit 3, as QEMU requires; another type is a
codec this project has not vetted and is refused. Compressed clusters themselves are ordinary
image content: such an image is booted as it is, never decompressed first.
Layout: QEMU docs/interop/qcow2.txt.

Used at `catalogue add` (on the copy that is hashed), at imgdist install and before every boot.
Reads only the header and its extensions through the given descriptor (pread: the caller's file
offset is untouched); no other I/O.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cluster.errors import DataError

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
MAX_HEADER_BYTES = 1 << 16  # header + extensions live in the first cluster; 64 KiB is plenty

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
ALLOWED_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

COMPRESSION_TYPE_OFFSET = 104
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441


class Qcow2Refused(DataError):
    """A qcow2 header the project will not boot (exit 65)."""


class NotQcow2(Qcow2Refused):
    """No qcow2 magic or a truncated/malformed header."""


class BackingFileRefused(Qcow2Refused):
    """The header names a backing file (or a backing format)."""


class DataFileRefused(Qcow2Refused):
    """The header names an external data file (bit 2 or the data-file extension)."""


class UnknownFeatureRefused(Qcow2Refused):
    """An incompatible feature bit this module does not know."""


class EncryptionRefused(Qcow2Refused):
    """An encrypted image (it could not boot unattended anyway)."""


class UnknownCompressionRefused(Qcow2Refused):
    """A compression type byte other than 0 (zlib) or 1 (zstd)."""


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    virtual_size: int
    incompatible: int
    header_length: int
    compression: str = "zlib"  # of the compressed clusters, if any: zlib | zstd


def check_qcow2(fd: int, source: str) -> Qcow2Header:
    """The header of the qcow2 open at `fd` if it is self-contained; a Qcow2Refused subclass
    naming `source` and the field otherwise."""
    head = os.pread(fd, MAX_HEADER_BYTES, 0)
    if len(head) < V2_HEADER_LEN or head[:4] != MAGIC:
        raise NotQcow2(f"{source}: not a qcow2 image (no QFI\\xfb magic or header shorter than 72 bytes)")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    virtual_size, crypt_method = struct.unpack_from(">QI", head, 24)
    if version not in (2, 3):
        raise NotQcow2(f"{source}: qcow2 version {version}; expected 2 or 3")
    if backing_offset or backing_size:
        raise BackingFileRefused(f"{source}: qcow2 header names a backing file; a base image must be "
                                 "self-contained (flatten it: qemu-img convert -O qcow2)")
    if crypt_method:
        raise EncryptionRefused(f"{source}: qcow2 image is encrypted (crypt_method {crypt_method}); refused")
    incompatible, header_length = 0, V2_HEADER_LEN
    if version == 3:
        if len(head) < 104:
            raise NotQcow2(f"{source}: qcow2 v3 header shorter than 104 bytes")
        incompatible, = struct.unpack_from(">Q", head, 72)
        header_length, = struct.unpack_from(">I", head, 100)
        if header_length < 104 or header_length > len(head) or header_length % 8:
            raise NotQcow2(f"{source}: qcow2 header_length {header_length} is malformed")
    if incompatible & INCOMPAT_DATA_FILE:
        raise DataFileRefused(f"{source}: qcow2 header sets the external data file bit; the image's data "
                              "would be read from another host file: refused")
    unknown = incompatible & ~ALLOWED_INCOMPAT
    if unknown:
        raise UnknownFeatureRefused(f"{source}: qcow2 header sets unknown incompatible feature bits "
                                    f"{unknown:#x}; refused")
    compression = _compression_type(head, header_length, incompatible, source)
    _check_extensions(head, header_length, source)
    return Qcow2Header(version, virtual_size, incompatible, header_length, compression)


def _compression_type(head: bytes, header_length: int, incompatible: int, source: str) -> str:
    """zlib or zstd; the byte and bit 3 must agree (QEMU refuses the image otherwise, so an image
    that disagrees was made by something other than qemu-img)."""
    kind = head[COMPRESSION_TYPE_OFFSET] if header_length > COMPRESSION_TYPE_OFFSET else 0
    if kind not in COMPRESSION_TYPES:
        raise UnknownCompressionRefused(f"{source}: qcow2 compression_type {kind} (header byte "
                                        f"{COMPRESSION_TYPE_OFFSET}); expected 0 zlib or 1 zstd: refused")
    if bool(kind) != bool(incompatible & INCOMPAT_COMPRESSION):
        raise NotQcow2(f"{source}: qcow2 compression_type {kind} disagrees with the compression type "
                       f"feature bit ({'set' if incompatible & INCOMPAT_COMPRESSION else 'clear'})")
    return COMPRESSION_TYPES[kind]


def _check_extensions(head: bytes, offset: int, source: str) -> None:
    while True:
        if offset + 8 > len(head):
            raise NotQcow2(f"{source}: qcow2 header extensions run past {MAX_HEADER_BYTES} bytes")
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == EXT_END:
            return
        if kind == EXT_DATA_FILE:
            raise DataFileRefused(f"{source}: qcow2 header names an external data file; refused")
        if kind == EXT_BACKING_FORMAT:
            raise BackingFileRefused(f"{source}: qcow2 header has a backing format extension; a base "
                                     "image must be self-contained")
        offset += 8 + (length + 7) // 8 * 8


def check_image_header(fd: int, fmt: str, source: str) -> int:
    """The virtual size of the image open at `fd` in format `fmt` (from the signed entry, never
    probed): qcow2 headers pass `check_qcow2`; a raw image is its bytes (its size)."""
    if fmt == "raw":
        return os.fstat(fd).st_size
    if fmt == "qcow2":
        return check_qcow2(fd, source).virtual_size
    raise DataError(f"{source}: format {fmt!r}; expected qcow2 or raw")
