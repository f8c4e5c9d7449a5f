"""The verified bytes are the booted bytes: the base is opened once, refused when anyone but root or
the store's owner could change it (StrictModes, with a real non-root user), hashed from that
descriptor, and QEMU reads that same descriptor (a rename afterwards changes nothing). Paths with
',' and quotes reach QEMU and the libvirt XML as one value. Direct-boot files are catalogue entries."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from catalogue import approvals, trust
from catalogue.endorse import add_image
from catalogue.imagefile import open_image
from cluster.errors import DataError, SpecError
from jobwrappers.accel import choose_accel
from jobwrappers.disks import create_overlay
from jobwrappers.libvirt_runner import render_domain_xml
from jobwrappers.machine import Disk, Machine, free_port
from jobwrappers.qemu_runner import QemuRunner, qemu_argv
from tests.fixtures.catalogue import make_qcow2

USER = f"salvust{os.getpid() % 100000}"


@pytest.fixture
def other_user():
    """A real non-root account, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a user")
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    try:
        yield pwd.getpwnam(USER).pw_uid
    finally:
        subprocess.run(["userdel", USER], check=True)


def refused_file_check(spec, *expected: str) -> None:
    with pytest.raises(DataError) as e:
        trust.verified_image(spec, "sage").close()
    assert "file check failed" in str(e.value), e.value
    for text in expected:
        assert text in str(e.value), e.value


def test_strict_modes_refuse_what_another_user_could_change(signed_catalogue, other_user):
    sc = signed_catalogue
    spec, path = sc.trust_on_site()
    trust.verified_image(spec, "sage").close()  # root's 0644 file in root's directories: fine
    os.chown(path, other_user, -1)
    refused_file_check(spec, f"owned by uid {other_user}")
    os.chown(path, 0, -1)
    os.chmod(path, 0o664)
    refused_file_check(spec, "writable by group or others")
    os.chmod(path, 0o444)
    os.link(path, path.with_name("second-name"))
    refused_file_check(spec, "2 hard links")
    path.with_name("second-name").unlink()
    os.chown(path.parent, other_user, -1)  # the job user could rename another file in
    refused_file_check(spec, f"directory {path.parent} is owned by uid {other_user}")
    os.chown(path.parent, 0, -1)
    os.chmod(path.parent.parent, 0o777)
    refused_file_check(spec, "is writable by group or others")
    os.chmod(path.parent.parent, 0o755)
    # The store's owner is trusted like root: a store owned by that (non-root) user may hold its files.
    for p in (sc.store, path.parent.parent, path.parent, path):
        os.chown(p, other_user, -1)
    trust.verified_image(spec, "sage").close()


def test_symlinked_base_is_refused(signed_catalogue, tmp_path):
    sc = signed_catalogue
    spec, path = sc.trust_on_site()
    real = tmp_path / "elsewhere.qcow2"
    path.rename(real)
    path.symlink_to(real)
    refused_file_check(spec, "resolves outside the image store")
    with pytest.raises(DataError, match="cannot open: Too many levels of symbolic links"):
        open_image(path, "qcow2", None)  # the store aside, the open itself never follows one


def qmp(sock_path: Path, *commands: dict) -> list[dict]:
    deadline = time.monotonic() + 30  # QEMU makes the socket as it starts: seconds on a busy machine
    while True:
        s = socket.socket(socket.AF_UNIX)  # a new one each try: a failed connect can leave it unusable
        try:
            s.connect(str(sock_path))
            break
        except OSError:
            s.close()
            assert time.monotonic() < deadline, f"QEMU's QMP socket {sock_path} never accepted a connection"
            time.sleep(0.05)
    f = s.makefile("rw")
    f.readline()
    out = []
    for cmd in [{"execute": "qmp_capabilities"}, *commands]:
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" not in reply:
                break
        out.append(reply)
    s.close()
    return out


def machine_in(workdir: Path, base_fd_image, kernel: Path | None = None) -> Machine:
    overlay = create_overlay(base_fd_image, workdir / "root.qcow2")
    return Machine(name="t1", vcpus=1, memory_mb=96, accel=choose_accel("tcg"),
                   disks=[Disk(overlay, "qcow2", backing=base_fd_image)], guest_port=22, host_addr="127.0.0.1",
                   host_port=free_port(), channel_path=workdir / "channel.sock", console_log=workdir / "console.log",
                   workdir=workdir, kernel=kernel, cmdline="console=ttyS0")


@pytest.fixture
def short_tmp():
    """A directory with a short path: QEMU's sockets must fit in sun_path (108 bytes), and with this
    test's odd directory name under an xdist worker's tmp_path the console socket did not."""
    d = Path(tempfile.mkdtemp(prefix="salvus-bb-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_qemu_reads_the_verified_descriptor_and_comma_paths_stay_one_value(short_tmp):
    """A ',' and a quote in every path: QEMU (paused, -S) opens exactly those files, and after the base
    is replaced by other bytes under its name, the guest disk still reads the verified bytes."""
    odd = short_tmp / "a,b='c',server=on,path=x"
    odd.mkdir()
    base = make_qcow2(odd / "base.qcow2", pattern=0x5A)
    image = open_image(base, "qcow2", os.getuid())
    other = make_qcow2(short_tmp / "other.qcow2", pattern=0x11)
    os.replace(other, base)  # the rename attack, after the check
    m = machine_in(odd, image)
    runner = QemuRunner(m)
    argv, fds = qemu_argv(m, runner.qmp_path)
    assert fds == [image.fd] and f"fd={image.fd},set=1,opaque=base0" in argv
    node = json.loads(argv[argv.index("-add-fd") + 3])
    assert node == {"driver": "qcow2", "node-name": "base0", "read-only": True, "backing": None,
                    "file": {"driver": "file", "filename": "/dev/fdset/1", "read-only": True}}
    proc = subprocess.Popen(argv + ["-S"], pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        replies = qmp(runner.qmp_path, {"execute": "query-named-block-nodes"},
                      {"execute": "human-monitor-command",
                       "arguments": {"command-line": "qemu-io disk0 \"read -P 0x5a 0 64k\""}})
        nodes = {n["node-name"]: n for n in replies[1]["return"]}
        assert nodes["disk0"]["image"]["filename"].endswith("root.qcow2") or "root.qcow2" in nodes["disk0"]["file"]
        assert nodes["base0"]["file"] == "/dev/fdset/1"
        assert "error" not in replies[2], replies[2]
        assert m.console_log.exists() and m.channel_path.is_socket() and m.console_socket.is_socket(), \
            "paths with ',' must stay one value"
        assert not (short_tmp / "x").exists()
    finally:
        proc.kill()
        out = proc.communicate()[0].decode()
        image.close()
    # qemu-io prints to QEMU's stdout: the guest disk reads the verified 0x5A bytes, not the 0x11 swap.
    assert "read 65536/65536" in out and "Pattern verification failed" not in out, out


def test_libvirt_xml_quotes_every_path_and_spells_out_the_backing_chain(tmp_path):
    odd = tmp_path / "it's <&> \"odd\",x"
    odd.mkdir()
    base = make_qcow2(odd / "base.qcow2")
    image = open_image(base, "qcow2", None)
    m = machine_in(odd, image, kernel=odd / "boot-kernel")
    root = ET.fromstring(render_domain_xml(m))
    disk = root.find("devices/disk")
    assert disk.find("source").get("file") == str(odd / "root.qcow2")
    backing = disk.find("backingStore")
    assert backing.find("source").get("file") == str(base) and backing.find("format").get("type") == "qcow2"
    assert backing.find("source").get("fdgroup") == "base0"  # the descriptor, FDAssociate'd at start
    assert backing.find("backingStore") is not None and len(backing.find("backingStore")) == 0
    assert root.find("devices/serial/source").get("path") == str(m.console_socket)
    assert root.find("devices/serial/log").get("file") == str(m.console_log)
    assert root.find("devices/channel/source").get("path") == str(m.channel_path)
    assert root.find("os/kernel").text == str(odd / "boot-kernel")
    image.close()


def test_boot_files_are_catalogue_entries_when_the_catalogue_is_on(signed_catalogue, tmp_path):
    sc = signed_catalogue
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + os.urandom(4096))
    add_image(sc.cat, kernel, "demo-kernel", "1", ["sage"], [], sc.url)
    sc.sign()
    role = "roles: {sage: {image: 'demo@1', port: 6000, boot: {kernel: %s}}}\n"
    spec, _ = sc.trust_on_site()
    sc.spec_path.write_text(sc.spec_path.read_text().replace("roles: {sage: {image: 'demo@1', port: 6000}}\n",
                                                             role % kernel))
    with pytest.raises(SpecError, match=r"roles.sage.boot.kernel: .* is a file; with the catalogue on it must "
                                        r"name a catalogue entry NAME@VERSION"):
        trust.verified_boot_files(sc.spec(), "sage")
    sc.spec_path.write_text(sc.spec_path.read_text().replace(str(kernel), "demo-kernel@1"))
    spec = sc.spec()
    trust.accept_index(spec, *sc.signed())
    sc.install("demo-kernel-1.raw")
    with pytest.raises(DataError, match="image demo-kernel@1 for role sage: approved check failed"):
        trust.verified_boot_files(spec, "sage")
    approvals.approve(spec, "demo-kernel@1")
    files = trust.verified_boot_files(spec, "sage")
    assert list(files) == ["kernel"] and files["kernel"].format == "raw"
    files["kernel"].close()
    installed = sc.store / "images" / "base" / "demo-kernel-1.raw"
    installed.write_bytes(b"\x7fELF other kernel")  # another size: refused before its bytes are hashed
    with pytest.raises(DataError, match="file check failed: .* virtual size 17 bytes, the signed index says 4100"):
        trust.verified_boot_files(spec, "sage")
    installed.write_bytes(b"\x7fELF" + os.urandom(4096))  # the signed size, other bytes
    with pytest.raises(DataError, match="hash check failed"):
        trust.verified_boot_files(spec, "sage")

