"""The console log's size cap (jobwrappers/consolelog.py): a real process appending to the file as
QEMU does (O_APPEND), QEMU itself holding the log (logappend=on keeps the wrapper's header), and a
wrapper booting the demo guest over a log earlier jobs left too big."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from jobwrappers.accel import choose_accel
from jobwrappers.consolelog import ConsoleLogCap, rotated_path
from jobwrappers.machine import Machine, free_port
from jobwrappers.qemu_runner import QemuRunner, qemu_argv
from jobwrappers.qmp import Qmp, QmpError
from tests.fixtures.demo_image import demo_spec_text
from tests.polling import wait_for

CAP = 1 << 20
LINE = re.compile(rb"(\d{8}) x{100}")

# A guest flooding its serial console: numbered lines, 64 per write() like a burst from a UART,
# through an O_APPEND descriptor as QEMU's `-chardev socket,...,logappend=on` opens it. With a third argument
# it says so on stdout after the numbered lines and waits for a line on stdin before its last one.
FLOOD = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
lines = int(sys.argv[2])
for start in range(0, lines, 64):
    os.write(fd, b"".join(b"%08d " % i + b"x" * 100 + b"\\n" for i in range(start, min(start + 64, lines))))
if len(sys.argv) > 3:
    print("flooded", flush=True)
    sys.stdin.readline()
os.write(fd, b"DONE\\n")
"""


def flood(path: Path, lines: int, pause: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FLOOD, str(path), str(lines), *(["pause"] if pause else [])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def numbers(data: bytes) -> list[int]:
    return [int(m.group(1)) for m in LINE.finditer(data)]


def output(data: bytes) -> bytes:
    """The guest's bytes, without the wrapper's marker lines."""
    return re.sub(rb"=== salvus-vmjob: console log passed [^\n]*\n", b"", data)


def test_a_flooding_writer_is_cut_in_place_keeping_the_latest_output(tmp_path):
    log = tmp_path / "sage-1.log"
    log.write_bytes(b"=== salvus-vmjob job 1 booting ===\n")
    cap = ConsoleLogCap(log, CAP)
    writer = flood(log, 200_000, pause=True)  # 21 MiB, cut while it is written
    while not select.select([writer.stdout], [], [], 0)[0]:
        cap.check()
    assert writer.stdout.readline() == b"flooded\n"
    writer.communicate(b"go on\n", timeout=30)  # its last line, with no cut under way
    assert writer.returncode == 0
    cap.check()
    assert cap.rotations >= 3
    kept, current = rotated_path(log).read_bytes(), log.read_bytes()
    assert len(kept) == CAP and len(current) <= CAP
    # QEMU's O_APPEND writes went on at the new end: no hole of NULs where the cut was.
    assert b"\0" not in current and b"\0" not in kept
    assert b"=== salvus-vmjob: console log passed 1048576 bytes at " in current
    assert current.endswith(b"DONE\n") or kept.endswith(b"DONE\n")  # the last output is kept
    # Each file holds consecutive lines, the log going on after what LOG.1 kept (a guest's bytes
    # written between reading the end and the cut are lost, never reordered).
    old, new = numbers(kept), numbers(current)
    assert old == list(range(old[0], old[0] + len(old)))
    assert not new or (new == list(range(new[0], new[0] + len(new))) and new[0] > old[-1])


def test_the_watch_thread_keeps_a_growing_log_under_the_cap(tmp_path):
    log = tmp_path / "sage-2.log"
    cap = ConsoleLogCap(log, CAP)
    cap.start()
    try:
        writer = flood(log, 40_000)  # 4.2 MiB
        assert writer.wait(60) == 0
        wait_for(lambda: log.stat().st_size < CAP, 20, "the cap thread to cut the log")
    finally:
        cap.stop()
    kept = rotated_path(log).read_bytes()
    assert cap.rotations >= 1 and len(kept) == CAP and b"\0" not in kept + log.read_bytes()
    assert rotated_path(log).stat().st_mode & 0o777 == 0o640  # as private as the log itself


def test_a_log_under_the_cap_and_a_missing_log_are_left_alone(tmp_path):
    log = tmp_path / "sage-3.log"
    cap = ConsoleLogCap(log, CAP)
    assert cap.check() is False and not log.exists()
    log.write_bytes(b"a" * CAP)
    assert cap.check() is False and log.read_bytes() == b"a" * CAP and not rotated_path(log).exists()


def test_qemu_appends_to_the_console_log_and_keeps_the_wrappers_header(tmp_path):
    """QEMU paused (-S) with the runner's own command line: it has opened the log by the time QMP
    answers. Without append=on (now logappend=on) it truncated the header (and earlier boots' output) here."""
    log = tmp_path / "console.log"
    log.write_bytes(b"=== salvus-vmjob job 1 booting ===\n")
    m = Machine(name="t1", vcpus=1, memory_mb=96, accel=choose_accel("tcg"), disks=[], guest_port=22,
                host_addr="127.0.0.1", host_port=free_port(), channel_path=tmp_path / "channel.sock",
                console_log=log, workdir=tmp_path)
    runner = QemuRunner(m)
    argv, fds = qemu_argv(m, runner.qmp_path)
    proc = subprocess.Popen(argv + ["-S"], pass_fds=fds, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def qmp_answers() -> bool:
            try:
                Qmp(runner.qmp_path, timeout=2).close()
                return True
            except QmpError:
                assert proc.poll() is None, proc.stderr.read().decode()
                return False
        wait_for(qmp_answers, 30, "QEMU's QMP socket")
        assert log.read_bytes() == b"=== salvus-vmjob job 1 booting ===\n"
        flags = [int(line.split()[1], 8) for fd in os.listdir(f"/proc/{proc.pid}/fd")
                 if os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(log)
                 for line in Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text().splitlines()
                 if line.startswith("flags:")]
        assert flags and all(f & os.O_APPEND for f in flags), flags
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.vm
def test_the_wrapper_cuts_a_log_earlier_jobs_left_too_big_and_keeps_the_boot(tmp_path, demo_image, run_wrapper):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store", console_log_max_mb=1))
    log = tmp_path / "store" / "logs" / "console" / "sage-cap.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"".join(b"%08d " % i + b"x" * 100 + b"\n" for i in range(30_000)))  # 3.2 MiB
    run = run_wrapper(spec, "sage", "sage-cap")
    run.registered()
    kept = rotated_path(log).read_bytes()
    assert len(kept) == CAP and numbers(kept)[-1] == 29_999
    current = log.read_bytes()
    assert len(current) < CAP and current.startswith(b"=== salvus-vmjob: console log passed")
    assert b"=== salvus-vmjob job t0 pid " in current and not numbers(current)
    assert run.terminate() == 0
