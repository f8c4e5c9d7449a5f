"""Compressed qcow2 images (zlib, and zstd via compression_type=zstd) are endorsed with their virtual
size, moved by imgdist and booted as they are: no decompress step, the base's bytes unchanged.
Images are the real demo image written by qemu-img with compressed clusters; one zstd boot."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from catalogue import approvals, qcow2, trust
from catalogue.endorse import CatalogueDir, add_image, verify_catalogue
from catalogue.imagefile import open_image
from catalogue.index import SCHEMA, SCHEMA_V1, Index, new_signature_file, now_utc, parse_index, sign_index_bytes
from cluster.cliframe import format_size
from cluster.errors import DataError
from cluster.spec import load_spec
from cluster.store import Store
from imagedist import listing
from jobwrappers.demo_image import DemoImage, build_demo_image, demo_image_paths
from tests.conftest import run_cli
from tests.fixtures.catalogue import header_of
from tests.fixtures.imgdist_lab import free_port

VIRTUAL = 64 << 20  # the demo root filesystem (demo_image.ROOT_SIZE)


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def qemu_img_json(*args: str) -> dict:
    # -U: a running QEMU may hold the image; reading its metadata must not need its lock.
    out = subprocess.run(["qemu-img", *args, "-U", "--output=json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def compressed_clusters(path: Path) -> int:
    return qemu_img_json("check", str(path))["compressed-clusters"]


@pytest.fixture(scope="module")
def compressed_demos(tmp_path_factory) -> dict[str, DemoImage]:
    """The demo image built compressed both ways: zstd through `image build-demo --compress`, zlib
    through the builder itself."""
    zstd_dir = tmp_path_factory.mktemp("demo-zstd")
    r = run_cli("image", "build-demo", "--out", str(zstd_dir), "--compress", "zstd", timeout=180)
    assert r.returncode == 0, r.stderr
    return {"zstd": demo_image_paths(zstd_dir),
            "zlib": build_demo_image(tmp_path_factory.mktemp("demo-zlib"), compression="zlib")}


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
def test_compressed_demo_passes_the_header_check_and_is_endorsed_with_its_virtual_size(
        compressed_demos, signed_catalogue, kind):
    disk = compressed_demos[kind].disk
    info = qemu_img_json("info", str(disk))
    assert info["format"] == "qcow2" and info["format-specific"]["data"]["compression-type"] == kind
    assert compressed_clusters(disk) > 0
    header = header_of(disk)
    assert (header.compression, header.virtual_size) == (kind, VIRTUAL)
    assert bool(header.incompatible & qcow2.INCOMPAT_COMPRESSION) == (kind == "zstd")
    sc = signed_catalogue
    entry = add_image(sc.cat, disk, f"demo-{kind}", "1", ["sage"], [], sc.url)
    assert (entry.size, entry.virtual_size) == (disk.stat().st_size, VIRTUAL)
    assert entry.size < VIRTUAL // 10, "the compressed file, not an inflated copy"
    assert sha256(sc.cat.image_file(entry)) == sha256(disk), "endorsed as it is"
    sc.sign()
    raw = sc.cat.index_path.read_bytes()
    assert f"schema: {SCHEMA}\n".encode() in raw and f"virtual_size: {VIRTUAL}\n".encode() in raw
    assert parse_index(raw).find(f"demo-{kind}", "1").virtual_size == VIRTUAL
    _, problems = verify_catalogue(sc.cat, trust.trust_keys(sc.spec()), 1)
    assert problems == []


def set_compression_byte(path: Path, value: int | None = None, bits: int | None = None) -> None:
    with open(path, "r+b") as f:
        if value is not None:
            f.seek(qcow2.COMPRESSION_TYPE_OFFSET)
            f.write(bytes([value]))
        if bits is not None:
            f.seek(72)
            f.write(bits.to_bytes(8, "big"))


def test_unknown_compression_type_refused_with_its_own_exception(compressed_demos, tmp_path):
    unknown = tmp_path / "unknown.qcow2"
    shutil.copyfile(compressed_demos["zstd"].disk, unknown)
    set_compression_byte(unknown, 2)
    with pytest.raises(qcow2.UnknownCompressionRefused, match="compression_type 2 .*expected 0 zlib or 1 zstd") as e:
        header_of(unknown)
    assert e.value.exit_code == 65 and "\n" not in str(e.value)
    with pytest.raises(qcow2.UnknownCompressionRefused):  # the boot's door: open_image
        open_image(unknown, "qcow2", None)
    # Byte and bit 3 must agree, as QEMU requires: zstd without the bit, the bit with zlib.
    no_bit = tmp_path / "no-bit.qcow2"
    shutil.copyfile(compressed_demos["zstd"].disk, no_bit)
    set_compression_byte(no_bit, bits=header_of(no_bit).incompatible & ~qcow2.INCOMPAT_COMPRESSION)
    with pytest.raises(qcow2.NotQcow2, match="compression_type 1 disagrees .*bit \\(clear\\)"):
        header_of(no_bit)
    bit_only = tmp_path / "bit-only.qcow2"
    shutil.copyfile(compressed_demos["zlib"].disk, bit_only)
    set_compression_byte(bit_only, bits=qcow2.INCOMPAT_COMPRESSION)
    with pytest.raises(qcow2.NotQcow2, match="compression_type 0 disagrees .*bit \\(set\\)"):
        header_of(bit_only)


def test_index_entry_without_virtual_size_still_verifies_and_a_wrong_one_is_refused(signed_catalogue):
    sc = signed_catalogue
    spec = sc.spec()
    published = sc.cat.signed_index_unverified()
    old_entry = dataclasses.replace(published.entries[0], virtual_size=None)
    old = Index(version=published.version + 1, issued=now_utc(), expires=published.expires, entries=[old_entry])
    raw = old.render()
    assert f"schema: {SCHEMA_V1}\n".encode() in raw and b"virtual_size" not in raw, "written as before"
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, sc.key())]))
    approvals.approve(spec, "demo@1")
    installed = sc.install()
    trust.verified_image(spec, "sage").close()
    # The parsed copy an older salvus-jobs cached has no virtual_size key at all.
    cached = json.loads(old.to_json())
    assert "virtual_size" not in cached["entries"][0]
    assert Index.from_json(json.dumps(cached).encode()).entries[0].virtual_size is None
    # imgdist list: the installed file's header says it; not installed and unrecorded: "-".
    rows = {r.name: r for r in listing.rows(spec, Store.of(spec), old)}
    assert rows["demo"].virtual == 4 << 20
    installed.unlink()
    row = table_rows(listing.render(listing.rows(spec, Store.of(spec), old)))["demo"]
    assert (row["VIRTUAL"], row["STATE"]) == ("-", "missing")
    # A version-1 index carrying the version-2 field is refused, like any unknown key.
    sneaky = raw.replace(b"  size: ", b"  virtual_size: 1\n  size: ", 1)
    with pytest.raises(DataError, match=r"entries\[0\].virtual_size: unknown key in salvus-image-index/1"):
        parse_index(sneaky)
    # A signed virtual size the header contradicts: refused at the boot's file check.
    wrong = dataclasses.replace(published.entries[0], virtual_size=123)
    index = Index(version=old.version + 1, issued=now_utc(), expires=published.expires, entries=[wrong])
    raw = index.render()
    trust.accept_index(spec, raw, new_signature_file([sign_index_bytes(raw, sc.key())]))
    sc.install()
    with pytest.raises(DataError, match="file check failed: .*virtual size 4194304 bytes, the signed index says 123"):
        trust.verified_image(spec, "sage")


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """`format_table` output as {first column: {header: cell}}, cut at the headers' offsets (cells
    such as "1.4 MiB" hold a space)."""
    head, *lines = text.splitlines()
    names = head.split()
    starts = [head.index(f"{n} " if i + 1 < len(names) else n) for i, n in enumerate(names)]
    bounds = list(zip(starts, starts[1:] + [None]))
    rows = [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds)} for line in lines if line.strip()]
    return {r[names[0]]: r for r in rows}


def host_spec(lab, host: Path) -> Path:
    """A hypervisor with the catalogue on: imgdist pulls from the lab's web seed, the wrapper boots
    demo-zstd@1 with the demo kernel and initrd, each a catalogue entry."""
    spec = host / "cluster.yaml"
    host.mkdir(parents=True, exist_ok=True)
    spec.write_text(f"""\
store: {host / 'store'}
registry: {{ttl: 6, heartbeat_interval: 1}}
hypervisor: {{libvirt: never, boot_timeout: 150, stop_timeout: 15}}
catalogue: {{url: '{lab.url}', trust: {{keys: ['{lab.key}.pub']}}}}
imgdist: {{listen_ip: 127.0.0.1, listen_port: {free_port()}, stall_timeout: 30, reserve_mb: 1}}
roles:
  sage:
    image: demo-zstd@1
    boot: {{kernel: demo-kernel@1, initrd: demo-initrd@1}}
    memory_mb: 128
    port: 6000
    probe: {{send: "1+1\\n", expect: "2"}}
""")
    return spec


def test_compressed_images_move_through_imgdist_and_zstd_boots_as_it_is(compressed_demos, imgdist_lab,
                                                                        run_wrapper):
    lab = imgdist_lab
    cat = CatalogueDir(lab.cat_dir)
    entries = {kind: add_image(cat, demo.disk, f"demo-{kind}", "1", ["sage"], [], lab.url)
               for kind, demo in compressed_demos.items()}
    zstd = compressed_demos["zstd"]
    add_image(cat, zstd.kernel, "demo-kernel", "1", [], [], lab.url)
    add_image(cat, zstd.initrd, "demo-initrd", "1", [], [], lab.url)
    lab.sign()
    spec = host_spec(lab, lab.root / "h0")
    for ref in ("demo-zstd@1", "demo-zlib@1", "demo-kernel@1", "demo-initrd@1"):
        approvals.approve(load_spec(spec), ref)
    r = lab.run(spec, "sync")
    assert r.returncode == 0, r.stderr
    base = Store.of(load_spec(spec)).base
    for kind, entry in entries.items():
        assert f"installed demo-{kind}@1" in r.stdout
        assert sha256(base / entry.file_name) == sha256(compressed_demos[kind].disk), "moved as it is"
    listed = lab.run(spec, "list")
    assert listed.returncode == 0, listed.stderr
    rows = table_rows(listed.stdout)
    for kind, entry in entries.items():
        row = rows[f"demo-{kind}"]
        assert (row["SIZE"], row["VIRTUAL"], row["STATE"]) == (format_size(entry.size), "64 MiB", "verified"), row
        assert row["SIZE"].endswith(" MiB") and entry.size < 4 << 20

    disk = base / entries["zstd"].file_name
    before = (sha256(disk), disk.stat().st_mtime_ns, compressed_clusters(disk))
    run = run_wrapper(spec, "sage", "sage-zstd")
    svc = run.registered()
    assert svc.image == "demo-zstd@1"
    # QEMU reads the installed compressed file itself (the descriptor the trust check verified).
    (qemu,) = run.qemu_pids()
    opened = {os.path.realpath(f"/proc/{qemu}/fd/{fd}") for fd in os.listdir(f"/proc/{qemu}/fd")}
    assert str(disk) in opened, opened
    assert run.terminate() == 0, run.output()
    assert (sha256(disk), disk.stat().st_mtime_ns, compressed_clusters(disk)) == before
    info = qemu_img_json("info", str(disk))
    assert info["format-specific"]["data"]["compression-type"] == "zstd" and info["virtual-size"] == VIRTUAL
    assert sorted(p.name for p in base.iterdir()) == sorted(
        ["demo-zstd-1.qcow2", "demo-zlib-1.qcow2", "demo-kernel-1.raw", "demo-initrd-1.raw"]), "no inflated copy"
