"""BitTorrent v2 metainfo for catalogue images (libtorrent), and checking one against its entry.

v2-only torrents: SHA-256 merkle piece hashes, cheapest to verify, and the info hash (sha256 of the
info dict) is what the signed index pins, so a torrent file fetched from anywhere can be checked
against the index before a single piece is trusted.

Web seed (BEP 19): the metainfo's url-list holds the origin's `images/` DIRECTORY URL (with a
trailing slash), and libtorrent appends the file name. A v2 torrent of one file gets a tail pad file,
so libtorrent treats it as multi-file and would turn a URL naming the file itself into
`.../NAME-VERSION.qcow2/NAME-VERSION.qcow2` (seen: 404 and a silent stall); the directory form works
either way. The index's `web_seeds` hold the same directory URLs.
"""
from __future__ import annotations

from pathlib import Path

import libtorrent as lt

from cluster.errors import DataError
from catalogue.index import Entry


MAX_TORRENT_BYTES = 16 << 20
MIN_PIECE = 256 << 10
MAX_PIECE = 16 << 20
TARGET_PIECES = 1024  # fewer pieces = smaller metainfo; more = finer-grained swarming


def piece_size_for(size: int) -> int:
    """A power of two (v2 requires one, >= 16 KiB) giving about TARGET_PIECES pieces."""
    piece = MIN_PIECE
    while piece < MAX_PIECE and size // piece > TARGET_PIECES:
        piece *= 2
    return piece


def make_torrent(image: Path, web_seed_dir_url: str, piece_size: int | None = None) -> tuple[bytes, str]:
    """(bencoded metainfo, v2 info hash hex) for the single file `image`."""
    if not web_seed_dir_url.endswith("/"):
        web_seed_dir_url += "/"
    files = lt.list_files(str(image))
    ct = lt.create_torrent(files, piece_size or piece_size_for(image.stat().st_size), lt.create_torrent.v2_only)
    ct.add_url_seed(web_seed_dir_url)
    ct.set_creator("salvus-jobs catalogue")
    lt.set_piece_hashes(ct, str(image.parent))
    # generate_buf() raises UnicodeDecodeError in libtorrent 2.1.1; bencode(generate()) is equivalent.
    data = lt.bencode(ct.generate())
    return data, str(lt.torrent_info(data).info_hashes().v2)


def check_torrent(entry: Entry, data: bytes, source: str = "torrent") -> lt.torrent_info:
    """The parsed metainfo when its v2 info hash is the one the signed index pins; DataError otherwise."""
    if len(data) > MAX_TORRENT_BYTES:
        raise DataError(f"{source}: {len(data)} bytes exceeds the limit of {MAX_TORRENT_BYTES} bytes")
    try:
        ti = lt.torrent_info(data)
    except RuntimeError as e:
        raise DataError(f"{source}: not valid metainfo: {e}") from None
    hashes = ti.info_hashes()
    if not hashes.has_v2() or str(hashes.v2) != entry.info_hash:
        raise DataError(f"{source}: info hash {hashes.v2 if hashes.has_v2() else '(no v2 hash)'} is not "
                        f"{entry.ref}'s {entry.info_hash} from the signed index")
    files = ti.layout()
    if files.file_size(0) != entry.size or files.file_path(0) != entry.file_name:
        raise DataError(f"{source}: describes {files.file_path(0)} of {files.file_size(0)} bytes, "
                        f"{entry.ref} is {entry.file_name} of {entry.size}")
    return ti
