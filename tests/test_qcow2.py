"""A qcow2 that would make QEMU read another host file is refused at `catalogue add`, at imgdist
install and before every boot (`catalogue.qcow2`, the one door); plain images' bits pass.
Images are made by the real qemu-img; one header bit is set by hand."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from catalogue import approvals, qcow2, trust
from catalogue.endorse import add_image
from catalogue.index import Entry, Index, new_signature_file, now_utc, sign_index_bytes
from catalogue.hashcache import sha256_file
from cluster.errors import DataError
from cluster.store import Store
from imagedist.install import install
from tests.fixtures.catalogue import header_of, make_qcow2, tree_snapshot


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def set_incompatible_bits(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        old, = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", old | bits))


@pytest.fixture
def data_file_image(tmp_path) -> Path:
    """What the issue reproduces: an external data file, then pointed at a host file."""
    img = tmp_path / "evil.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", str(img), "1M")
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"root:x:0:0\n" * 100)
    qemu_img("amend", "-o", f"data_file={secret}", str(img))
    return img


def test_plain_zstd_extended_l2_and_dirty_images_pass(tmp_path):
    plain = make_qcow2(tmp_path / "plain.qcow2")
    assert header_of(plain).virtual_size == 4 << 20
    zstd = tmp_path / "zstd.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(plain), str(zstd))
    assert header_of(zstd).incompatible & qcow2.INCOMPAT_COMPRESSION
    extl2 = tmp_path / "extl2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", str(extl2), "1M")
    assert header_of(extl2).incompatible & qcow2.INCOMPAT_EXTL2
    set_incompatible_bits(extl2, qcow2.INCOMPAT_DIRTY | qcow2.INCOMPAT_CORRUPT)
    header_of(extl2)


def test_external_data_file_backing_file_and_unknown_bit_refused(tmp_path, data_file_image):
    with pytest.raises(qcow2.DataFileRefused, match="external data file"):
        header_of(data_file_image)
    # The bit cleared by hand, the data-file name extension still there: refused all the same.
    with open(data_file_image, "r+b") as f:
        f.seek(72)
        bits, = struct.unpack(">Q", f.read(8))
        f.seek(72)
        f.write(struct.pack(">Q", bits & ~qcow2.INCOMPAT_DATA_FILE))
    with pytest.raises(qcow2.DataFileRefused, match="names an external data file"):
        header_of(data_file_image)
    base = make_qcow2(tmp_path / "base.qcow2")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(child))
    with pytest.raises(qcow2.BackingFileRefused, match="backing file"):
        header_of(child)
    unknown = make_qcow2(tmp_path / "unknown.qcow2")
    set_incompatible_bits(unknown, 1 << 9)
    with pytest.raises(qcow2.UnknownFeatureRefused, match="0x200"):
        header_of(unknown)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"QFI\xfb" + b"\0" * 100)  # looks like qcow2, but the entry says raw
    fd = os.open(raw, os.O_RDONLY)
    assert qcow2.check_image_header(fd, "raw", str(raw)) == 104
    with pytest.raises(qcow2.NotQcow2):
        qcow2.check_image_header(fd, "qcow2", str(raw))
    os.close(fd)


def test_catalogue_add_refuses_on_the_copy_it_hashes(signed_catalogue, data_file_image, monkeypatch):
    sc = signed_catalogue
    with pytest.raises(DataError, match="external data file"):
        add_image(sc.cat, data_file_image, "evil", "1", [], [], sc.url)
    # The source probed fine (qemu-img info) and was then swapped: the copy is what is checked.
    import catalogue.endorse as endorse
    monkeypatch.setattr(endorse, "image_info", lambda image: "qcow2")
    with pytest.raises(DataError, match="external data file"):
        add_image(sc.cat, data_file_image, "evil", "2", [], [], sc.url)
    assert not list((sc.cat.root / "images").glob("evil-*")), "no image file without an entry"
    assert [e.ref for e in sc.cat.draft()[0]] == ["demo@1"]


def endorse_raw_entry(sc, image: Path, name: str = "evil", fmt: str = "qcow2") -> Entry:
    """An index signed by the trusted key with an entry for `image` as it is (what a compromised or
    careless endorser could publish), accepted and approved on the site."""
    entry = Entry(name=name, version="1", sha256=sha256_file(image), size=image.stat().st_size, format=fmt,
                  roles=[], info_hash="0" * 64, torrent=f"torrents/{name}-1.torrent",
                  web_seeds=["http://o:1/images/"], created=now_utc())
    published = sc.cat.signed_index_unverified()
    index = Index(version=published.version + 1, issued=now_utc(), expires=published.expires,
                  entries=[*published.entries, entry])
    raw = index.render()
    spec = sc.spec()
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, sc.key())]))
    approvals.approve(spec, f"{name}@1")
    return entry


def test_imgdist_install_refuses_and_installs_nothing(signed_catalogue, data_file_image):
    sc = signed_catalogue
    entry = endorse_raw_entry(sc, data_file_image)
    store = Store(sc.store)
    store.partial.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_file_image, store.partial / entry.file_name)
    with pytest.raises(DataError, match="external data file"):
        install(store, entry, trust.hash_cache_path(sc.spec()))
    assert not (store.base / entry.file_name).exists()
    assert (store.partial / entry.file_name).exists(), "left for a recheck, never installed"


def test_boot_refuses_an_endorsed_data_file_image(signed_catalogue, data_file_image):
    sc = signed_catalogue
    endorse_raw_entry(sc, data_file_image)
    sc.write_spec(image="evil@1")
    spec = sc.spec()
    sc.install("demo-1.qcow2")
    dest = Store(sc.store).base / "evil-1.qcow2"
    shutil.copyfile(data_file_image, dest)
    before = tree_snapshot(sc.store)
    with pytest.raises(DataError, match="file check failed: .*external data file"):
        trust.verified_image(spec, "sage")
    assert tree_snapshot(sc.store) == before
    # Insecure mode checks nothing signed, but still never opens such a header.
    sc.write_spec(extra="  insecure_allow_unsigned: true\n", image="evil@1")
    with pytest.raises(DataError, match="external data file"):
        trust.verified_image(sc.spec(), "sage")
