"""`salvus_jobs ssh | exec | console`: into a job's VM, as operators reached every VM from their
admin script.

- `ssh SERVICE_ID [-- COMMAND...]`: paramiko (`cluster/ssh.py`) to the service's SSH endpoint, the
  registry's `host:ssh_port` (a forward on the hypervisor, or port 22 at the VM's own address). The
  guest's host key must be one the registry recorded when the VM became ready (`host_keys`, from the
  guest agent's HOSTKEY lines): anything else is refused with one line naming both fingerprints,
  never accepted as new. With a command, its output is streamed and its exit status is ours; without
  one, an interactive shell on a pty. Failures of ssh itself exit 255, as OpenSSH's do.
- `exec ROLE -- COMMAND...`: the command on every live VM of the role, a bounded number at once.
- `console SERVICE_ID`: the serial console's socket on the VM's hypervisor (read-write; Ctrl-] detaches),
  or its log with `--log`; on another host, the same command run there over SSH. A console must not
  depend on the guest's network, so it never goes through the guest's sshd.
"""
from __future__ import annotations

import argparse
import os
import re
import select
import shlex
import socket
import stat
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import paramiko

from cluster import jobstatus
from cluster.cliframe import printable
from cluster.errors import SalvusError, SpecError
from cluster.registry import Service, open_registry
from cluster.registry.base import valid_endpoint
from cluster.spec import ClusterSpec, load_spec
from cluster.ssh import LoginRefused, SshConnection, SshUnavailable
from cluster.store import Store
from cluster.terminal import READ_CHUNK, quiet_stdout, relay, window_size, write_all
from cluster.yamlmodel import is_service_id

EXIT_SSH_FAILED = 255  # OpenSSH's status when ssh itself failed (not the remote command)
DEFAULT_SSH_USER = "debian"  # Debian's cloud-init default user
DETACH_KEY = b"\x1d"  # Ctrl-], as telnet and `virsh console`
EXEC_PARALLEL = 8
EXEC_TIMEOUT_S = 600.0
# A real guest's sshd under TCG takes seconds to send its banner (it re-execs per connection).
GUEST_CONNECT_TIMEOUT_S = 60.0
# [USER@]HOST[:PORT] for --jump; a host name or address, never an option.
_HOP_RE = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_.-]{0,31})@)?([A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]+\])"
                     r"(?::([0-9]{1,5}))?")
_TERM_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}")


class AccessFailed(SalvusError):
    """ssh itself failed (no such VM, no endpoint, host key refused, cannot connect): exit 255."""

    exit_code = EXIT_SSH_FAILED


@dataclass(frozen=True)
class Hop:
    """How to reach a hypervisor over SSH: its host key from known_hosts, as for a login node."""

    host: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str = "~/.ssh/known_hosts"

    def connection(self) -> SshConnection:
        return SshConnection(self.host, self.port, self.user, self.key_file, self.known_hosts)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    hop = argparse.ArgumentParser(add_help=False)
    hop.add_argument("--jump-key", metavar="FILE", help="private key for the hypervisor (default: ssh-agent, "
                     "then ~/.ssh/id_*)")
    hop.add_argument("--known-hosts", metavar="FILE", default="~/.ssh/known_hosts",
                     help="the hypervisors' host keys (default: ~/.ssh/known_hosts; never learned)")
    login = argparse.ArgumentParser(add_help=False)
    login.add_argument("-l", "--user", help="guest user (default: the role's ssh_user, else debian)")
    login.add_argument("-i", "--identity", metavar="FILE",
                       help="private key (default: the role's ssh_key_file, else ssh-agent, then ~/.ssh/id_*)")

    jump = argparse.ArgumentParser(add_help=False)
    jump.add_argument("--jump", nargs="?", const="", metavar="[USER@]HOST[:PORT]",
                      help="go through the VM's hypervisor (default: the one the registry names)")
    jump.add_argument("-n", dest="no_stdin", action="store_true", help="do not send standard input")
    p = sub.add_parser("ssh", parents=[common, login, hop, jump], help="a shell or a command on a VM (host key pinned)",
                       description="SSH to a service's VM at its registered SSH endpoint. Its host key must be "
                                   "one the registry recorded when the VM became ready; any other is refused. "
                                   "With COMMAND (its words joined by spaces, as ssh does) its output is "
                                   "streamed and its exit status is this command's; without, an interactive "
                                   "shell. ssh's own failures exit 255.",
                       epilog="example: salvus_jobs ssh sage-1 -- uptime   |   salvus_jobs ssh sage-1 --jump")
    p.add_argument("service_id", metavar="SERVICE_ID")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="run this instead of a shell")
    p.set_defaults(func=cmd_ssh, trailing=argparse.ArgumentParser(
        prog="salvus_jobs ssh", add_help=False, parents=[common, login, hop, jump]))

    bounds = argparse.ArgumentParser(add_help=False)
    bounds.add_argument("--parallel", type=int, default=EXEC_PARALLEL,
                        help=f"at most this many at once ({EXEC_PARALLEL})")
    bounds.add_argument("--timeout", type=float, default=EXEC_TIMEOUT_S,
                        help=f"seconds each command may take ({EXEC_TIMEOUT_S:.0f})")
    p = sub.add_parser("exec", parents=[common, login, bounds], help="run a command on every live VM of a role",
                       description="Runs COMMAND on every VM of ROLE the registry lists as live, a few at a "
                                   "time, and prints 'SERVICE_ID: exit STATUS' then each one's output. Exit 0 "
                                   "when all succeeded, 1 when a command failed, 255 when a connection failed.",
                       epilog="example: salvus_jobs exec cassandra -- df -h /data")
    p.add_argument("role")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    p.set_defaults(func=cmd_exec, trailing=argparse.ArgumentParser(
        prog="salvus_jobs exec", add_help=False, parents=[common, login, bounds]))

    p = sub.add_parser("console", parents=[common, hop], help="a VM's serial console (Ctrl-] detaches)",
                       description="Attaches this terminal read-write to the VM's serial console on its "
                                   "hypervisor; Ctrl-] detaches (the VM keeps running). --log prints what the "
                                   "console said so far. For a VM on another host, runs this command there "
                                   "over SSH (the spec at the same path, salvus_jobs beside "
                                   "scheduler.wrapper). Needs no network in the guest.",
                       epilog="example: salvus_jobs console sage-1   |   salvus_jobs console sage-1 --log")
    p.add_argument("service_id", metavar="SERVICE_ID")
    p.add_argument("--log", action="store_true", help="print the console log so far and exit")
    p.add_argument("--jump", nargs="?", const="", metavar="[USER@]HOST[:PORT]",
                   help="run it on this host over SSH (default: the hypervisor the registry names)")
    p.set_defaults(func=cmd_console)


# --- finding the VM -----------------------------------------------------------------------------

def checked_service_id(service_id: str) -> str:
    if not is_service_id(service_id):
        raise AccessFailed(f"SERVICE_ID: expected letters, digits, '.', '_', '-' (at most 64), got {service_id!r}")
    return service_id


def live_service(spec: ClusterSpec, service_id: str) -> Service:
    with open_registry(spec) as registry:
        svc = registry.get(checked_service_id(service_id))
    if svc is None:
        raise AccessFailed(f"{service_id}: no live service of that id in the registry (salvus_jobs services)")
    return svc


def ssh_endpoint(spec: ClusterSpec, svc: Service) -> tuple[str, int]:
    if svc.ssh_port:
        if not valid_endpoint(svc.host, svc.ssh_port):  # any registry writer may have written it
            raise AccessFailed(f"{printable(svc.service_id)}: the registry's SSH port {svc.ssh_port!r} is not 1-65535")
        return svc.host, svc.ssh_port
    role = spec.roles.get(svc.role)
    if role is not None and role.port == 22:
        return svc.host, svc.port  # the role's own port is sshd's (rows from before ssh_port)
    raise AccessFailed(f"{printable(svc.service_id)}: the registry records no SSH endpoint for it "
                       f"(registered by an older salvus-vmjob?)")


def parse_hop(text: str, default_host: str, args: argparse.Namespace) -> Hop:
    m = _HOP_RE.fullmatch(text or default_host)
    if m is None or (m[3] and not 1 <= int(m[3]) <= 65535):
        raise AccessFailed(f"--jump: expected [USER@]HOST[:PORT], got {printable(text or default_host)!r}")
    return Hop(m[2].strip("[]"), int(m[3] or 22), m[1], args.jump_key, args.known_hosts)


def guest_connection(spec: ClusterSpec, svc: Service, user: str | None, key_file: str | None,
                     via: SshConnection | None = None) -> SshConnection:
    """A connection to the guest's sshd whose host key must be one the registry recorded."""
    keys = tuple(line for line in svc.host_keys.splitlines() if line.strip())
    sid = printable(svc.service_id)
    if not keys:
        raise AccessFailed(f"{sid}: the registry recorded no SSH host keys for it (its agent reports them once "
                           f"sshd listens): refusing to trust whatever answers")
    role = spec.roles.get(svc.role)
    host, port = ssh_endpoint(spec, svc)
    key = key_file or (role.ssh_key_file if role else None)
    conn = SshConnection(host, port, user or (role.ssh_user if role else None) or DEFAULT_SSH_USER,
                         os.path.expanduser(key) if key else None, connect_timeout=GUEST_CONNECT_TIMEOUT_S,
                         pinned_keys=keys,
                         pinned_source=f"the one the registry recorded for {sid}")
    if via is not None:
        conn.sock = via.tunnel(host, port)
    return conn


# --- ssh -----------------------------------------------------------------------------------------

def command_words(args: argparse.Namespace) -> list[str]:
    """The words after `--`. argparse gives everything after the first positional to the command,
    so options written between it and `--` (`ssh ID -i KEY -- uptime`) are parsed here."""
    words = list(args.command)
    if "--" in words:
        cut = words.index("--")
        args.trailing.parse_args(words[:cut], namespace=args)
        return words[cut + 1:]
    if words and words[0].startswith("-"):
        args.trailing.parse_args(words, namespace=args)
        return []
    return words


def cmd_ssh(args: argparse.Namespace) -> int:
    words = command_words(args)
    spec = load_spec(args.spec)
    try:
        svc = live_service(spec, args.service_id)
        hop = None
        if args.jump is not None:
            hop = parse_hop(args.jump, svc.hypervisor, args).connection()
        conn = guest_connection(spec, svc, args.user, args.identity, via=hop)
        try:
            if words:
                return stream_command(conn, " ".join(words), forward_stdin=not args.no_stdin)
            return interactive_shell(conn)
        finally:
            conn.close()
            if hop is not None:
                hop.close()
    except (LoginRefused, SshUnavailable) as e:
        raise AccessFailed(str(e)) from None


def stream_command(conn: SshConnection, command: str, forward_stdin: bool = True) -> int:
    """Runs `command`, its output and errors streamed to ours, our input to it; its exit status
    (255 when it has none: killed by a signal, or the connection dropped)."""
    chan = conn.session()
    try:
        chan.exec_command(command)
        reading = forward_stdin and stdin_open()
        while True:
            watched: list = [chan, 0] if reading else [chan]
            ready, _, _ = select.select(watched, [], [], 0.05)
            if reading and 0 in ready:
                data = os.read(0, READ_CHUNK)
                if data:
                    chan.sendall(data)
                else:
                    chan.shutdown_write()
                    reading = False
            moved = False
            while chan.recv_ready():
                write_all(1, chan.recv(READ_CHUNK))
                moved = True
            while chan.recv_stderr_ready():
                write_all(2, chan.recv_stderr(READ_CHUNK))
                moved = True
            if not moved and (chan.exit_status_ready() or chan.closed) and not chan.recv_ready() \
                    and not chan.recv_stderr_ready():
                break
        status = chan.recv_exit_status()
    except BrokenPipeError:  # our reader went away (`| head`): the command is abandoned, as ssh's SIGPIPE does
        quiet_stdout()
        return EXIT_SSH_FAILED
    except (OSError, paramiko.SSHException, EOFError) as e:
        raise SshUnavailable(f"{conn.target}: connection lost: {e or type(e).__name__}") from None
    finally:
        chan.close()
    if status < 0:
        if not conn.connected():
            raise SshUnavailable(f"{conn.target}: connection lost (the command's outcome is unknown)")
        return EXIT_SSH_FAILED
    return status


def stdin_open() -> bool:
    try:
        os.fstat(0)
        return True
    except OSError:
        return False


def terminal_type() -> str:
    term = os.environ.get("TERM", "")
    return term if _TERM_RE.fullmatch(term) else "vt100"


def interactive_shell(conn: SshConnection) -> int:
    """A login shell: on a pty sized like this terminal (resized with it), this terminal raw until
    the shell exits. Without a terminal on stdin, the shell reads stdin as a script (no pty)."""
    chan = conn.session()
    try:
        if os.isatty(0):
            cols, rows = window_size()
            chan.get_pty(term=terminal_type(), width=cols, height=rows)
            chan.invoke_shell()
            relay(chan, resize=lambda c, r: chan.resize_pty(c, r), on_input_end=chan.shutdown_write)
        else:
            chan.invoke_shell()
            relay(chan, on_input_end=chan.shutdown_write)
        status = chan.recv_exit_status()
    except (OSError, paramiko.SSHException, EOFError) as e:
        raise SshUnavailable(f"{conn.target}: connection lost: {e or type(e).__name__}") from None
    finally:
        chan.close()
    return EXIT_SSH_FAILED if status < 0 else status


# --- exec ----------------------------------------------------------------------------------------

@dataclass
class ExecOutcome:
    service_id: str
    status: int  # the command's; EXIT_SSH_FAILED when the connection failed
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # why the connection failed

    def lines(self) -> list[str]:
        sid = printable(self.service_id)
        if self.error:
            return [f"{sid}: ssh failed: {printable(self.error)}"]
        return [f"{sid}: exit {self.status}", *(report_text(t) for t in (self.stdout, self.stderr) if t)]


def report_text(text: str) -> str:
    """A guest's output in a report: control characters other than tab and newline escaped (guests
    are not trusted with the operator's terminal), no final newline."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text).rstrip("\n")


def exec_one(spec: ClusterSpec, svc: Service, command: str, user: str | None, key_file: str | None,
             timeout: float) -> ExecOutcome:
    try:
        conn = guest_connection(spec, svc, user, key_file)
        try:
            r = conn.exec(command, timeout=timeout, what="the command")
        finally:
            conn.close()
    except (AccessFailed, LoginRefused, SshUnavailable) as e:
        return ExecOutcome(svc.service_id, EXIT_SSH_FAILED, error=str(e))
    return ExecOutcome(svc.service_id, r.returncode, r.stdout, r.stderr)


def cmd_exec(args: argparse.Namespace) -> int:
    words = command_words(args)
    spec = load_spec(args.spec)
    spec.role(args.role)
    if not words:
        raise SpecError("exec: give the command after --: salvus_jobs exec ROLE -- COMMAND")
    if not 1 <= args.parallel <= 256:
        raise SpecError(f"--parallel: expected 1 to 256, got {args.parallel}")
    with open_registry(spec) as registry:
        services = registry.lookup(args.role)
    if not services:
        raise AccessFailed(f"exec: no live VM of role {args.role} in the registry")
    command, failed, broken = " ".join(words), False, False
    with ThreadPoolExecutor(max_workers=min(args.parallel, len(services))) as pool:
        futures = [pool.submit(exec_one, spec, s, command, args.user, args.identity, args.timeout) for s in services]
        for f in as_completed(futures):
            out = f.result()
            broken |= bool(out.error)
            failed |= out.status != 0
            print("\n".join(out.lines()), flush=True)  # as each finishes, from this thread only
    return EXIT_SSH_FAILED if broken else 1 if failed else 0


# --- console -------------------------------------------------------------------------------------

def remote_salvus_jobs(spec: ClusterSpec) -> str:
    """salvus_jobs on a hypervisor: beside salvus-vmjob when the spec names its path, else beside
    this Python (hosts installed alike), else on PATH."""
    if spec.scheduler.wrapper and spec.scheduler.wrapper.startswith("/"):
        return str(Path(spec.scheduler.wrapper).with_name("salvus_jobs"))
    here = Path(sys.executable).with_name("salvus_jobs")
    return str(here) if here.is_file() else "salvus_jobs"


def print_log(store: Store, service_id: str) -> int:
    log = store.console_log(service_id)
    parts = [log.with_name(log.name + ".1"), log]  # the older part the cap kept (consolelog.py), then the rest
    found = False
    try:
        for part in parts:
            try:
                with open(os.open(part, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                    found = True
                    while chunk := f.read(READ_CHUNK):
                        sys.stdout.buffer.write(chunk)
            except FileNotFoundError:
                continue
        sys.stdout.flush()
    except BrokenPipeError:  # `console --log | tail`
        quiet_stdout()
        return 0
    if not found:
        raise AccessFailed(f"{service_id}: no console log on this host ({log})")
    return 0


def attach(status: jobstatus.JobStatus) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(status.console_socket)
    except OSError as e:
        sock.close()
        raise AccessFailed(f"{status.service_id}: cannot attach to the console {status.console_socket}: "
                           f"{e.strerror or e}") from None
    print(f"connected to {status.service_id}'s serial console; Ctrl-] detaches", file=sys.stderr, flush=True)
    try:
        why = relay(sock, detach=DETACH_KEY)
    finally:
        sock.close()
    print({"detached": "\r\ndetached", "closed": "\r\nthe console closed (the VM stopped)",
           "input": "\r\ninput ended"}[why], file=sys.stderr, flush=True)
    return 0


def remote_console(spec: ClusterSpec, hop: Hop, service_id: str, log_only: bool) -> int:
    spec_path = spec.source  # the loaded file's absolute path: the same on every host
    command = shlex.join([remote_salvus_jobs(spec), "--spec", spec_path, "console", service_id,
                          *(["--log"] if log_only else [])])
    conn = hop.connection()
    try:
        if log_only or not os.isatty(0):
            return stream_command(conn, command, forward_stdin=not log_only)
        chan = conn.session()
        try:
            cols, rows = window_size()
            chan.get_pty(term=terminal_type(), width=cols, height=rows)
            chan.exec_command(command)
            # Detached here, not only there: a hung remote end must not hold this terminal.
            why = relay(chan, detach=DETACH_KEY, resize=lambda c, r: chan.resize_pty(c, r))
        finally:
            chan.close()
        if why == "detached":
            print("\r\ndetached", file=sys.stderr, flush=True)
        return 0
    finally:
        conn.close()


def cmd_console(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    service_id = checked_service_id(args.service_id)
    store = Store.of(spec)
    try:
        if args.jump is not None:
            host = args.jump or live_service(spec, service_id).hypervisor
            return remote_console(spec, parse_hop(args.jump, host, args), service_id, args.log)
        status = jobstatus.read(store, service_id)
        if status is not None and status.alive():
            return print_log(store, service_id) if args.log else attach_local(store, status)
        with open_registry(spec) as registry:
            svc = registry.get(service_id)
        if svc is not None and svc.hypervisor not in local_host_names(spec):
            return remote_console(spec, parse_hop("", svc.hypervisor, args), service_id, args.log)
        if args.log:
            return print_log(store, service_id)  # a VM that ran here and stopped: its log stays
        raise AccessFailed(f"{service_id}: no running VM of that id on this host or in the registry")
    except (LoginRefused, SshUnavailable) as e:
        raise AccessFailed(str(e)) from None


def attach_local(store: Store, status: jobstatus.JobStatus) -> int:
    if not status.console_socket:
        raise AccessFailed(f"{status.service_id}: its wrapper records no console socket (an older salvus-vmjob?)")
    check_console_socket(store, status)
    return attach(status)


def check_console_socket(store: Store, status: jobstatus.JobStatus) -> None:
    """Job users share `state/jobs/`, so a status file could name any socket (root's docker.sock)
    for an operator's keystrokes: the socket must be a `console.sock` owned by the owner of the status
    file and of the wrapper's process, as the wrapper's own QEMU makes it."""
    sid = status.service_id
    try:
        file_uid = os.stat(store.runtime.job_status(sid), follow_symlinks=False).st_uid
        proc_uid = os.stat(f"/proc/{status.pid}").st_uid
        sock = os.stat(status.console_socket, follow_symlinks=False)
    except OSError as e:
        raise AccessFailed(f"{sid}: cannot check the console socket {status.console_socket}: {e.strerror or e}") from None
    if (Path(status.console_socket).name != "console.sock" or not stat.S_ISSOCK(sock.st_mode)
            or not sock.st_uid == file_uid == proc_uid):
        raise AccessFailed(f"{sid}: {status.console_socket} is not its wrapper's console socket (owner or kind "
                           f"differs from its status file's and process's): refused")


def local_host_names(spec: ClusterSpec) -> set[str]:
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    if spec.hypervisor.advertise_host:
        names.add(spec.hypervisor.advertise_host)
    return names

