"""The operator's terminal wired to a remote one: raw mode for the session (restored however it ends),
the window size now and on every SIGWINCH, and bytes copied both ways until the remote end closes,
this side's input ends, or the detach key is typed.

Used by `salvus_jobs ssh` (a shell on a pty channel) and `salvus_jobs console` (the serial console's
socket, or that command on the hypervisor). The remote end is anything with `fileno`, `recv` and
`sendall`: a paramiko channel or a socket.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import tty
from typing import Callable, Iterator, Protocol

READ_CHUNK = 1 << 16


class Stream(Protocol):
    def fileno(self) -> int: ...
    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> object: ...


def window_size(fd: int | None = None) -> tuple[int, int]:
    """(columns, rows) of the terminal on `fd` (default stdout), 80x24 when it is none."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno() if fd is None else fd)
        return size.columns, size.lines
    except (OSError, ValueError):
        cols, rows = shutil.get_terminal_size((80, 24))
        return cols, rows


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[bool]:
    """The terminal on `fd` in raw mode inside the block (yields False, changing nothing, when `fd`
    is no terminal); its settings are put back on the way out, exceptions and Ctrl-C included."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def resize_signals(wanted: bool) -> Iterator[int | None]:
    """Inside the block, every SIGWINCH writes a byte to a pipe whose read end it yields (None when
    not `wanted`): the copy loop resizes the remote end itself. A handler sending the resize would
    run inside whatever the loop was doing, maybe holding the SSH transport's send lock."""
    if not wanted:
        yield None
        return
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def note(_signum: int, _frame: object) -> None:
        try:
            os.write(write_end, b"w")
        except BlockingIOError:  # already noted: one resize covers them all
            pass

    previous = signal.signal(signal.SIGWINCH, note)
    try:
        yield read_end
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(read_end)
        os.close(write_end)


def relay(remote: Stream, detach: bytes | None = None, in_fd: int = 0, out_fd: int = 1,
          on_input_end: Callable[[], None] | None = None, resize: Callable[[int, int], None] | None = None) -> str:
    """Copies `in_fd` to `remote` and `remote` to `out_fd`, the terminal raw meanwhile, calling
    `resize(columns, rows)` when this terminal's size changes. Returns why it stopped: "closed" (the
    remote end), "detached" (`detach` typed; what came before it in the same read is sent) or
    "input" (this side's input ended and `on_input_end` is unset; with it set, it is called once
    and the output is copied on until the remote end closes)."""
    reading = True
    with raw_mode(in_fd), resize_signals(resize is not None) as resized:
        while True:
            watched = [remote, *([in_fd] if reading else []), *([resized] if resized is not None else [])]
            ready, _, _ = select.select(watched, [], [])
            if resized is not None and resized in ready:
                os.read(resized, 64)
                resize(*window_size())
            if remote in ready:
                data = remote.recv(READ_CHUNK)
                if not data:
                    return "closed"
                write_all(out_fd, data)
            if reading and in_fd in ready:
                data = os.read(in_fd, READ_CHUNK)
                if not data:
                    if on_input_end is None:
                        return "input"
                    on_input_end()
                    reading = False
                    continue
                if detach is not None and detach in data:
                    before = data.split(detach, 1)[0]
                    if before:
                        remote.sendall(before)
                    return "detached"
                remote.sendall(data)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def quiet_stdout() -> None:
    """After a reader of our stdout went away (`... | head`): later writes, and Python's flush at
    exit, go nowhere instead of raising BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
