"""The one door through which `submit/` runs scheduler client commands (sbatch, squeue, scancel,
scontrol, qsub, qstat, qdel, the DRMAA helper) and writes the files they read (PBS job scripts).

Backends receive a runner and never start those processes themselves, so `SshRunner` runs the
same argv on the cluster's login node (`scheduler.login`) without touching any backend: one SSH
connection per runner (so per `salvus_jobs` command), a channel per command, files up by SFTP.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import SchedulerError, SchedulerUnavailable
from cluster.files import write_atomic
from cluster.spec import LOGIN_BACKENDS, ClusterSpec, LoginSpec
from cluster.ssh import SshConnection

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class CommandResult:
    argv: list[str]  # as run, the program resolved through bin_dir
    returncode: int
    stdout: str
    stderr: str


def last_line(text: str) -> str:
    """The last non-blank line: where client commands put the error that ended them. Quotes
    around it go (Slurm's qsub quotes sbatch's output, its closing quote on a line of its own)."""
    lines = [ln.strip().strip("'\"") for ln in text.splitlines() if ln.strip().strip("'\"")]
    return lines[-1] if lines else "(no output)"


@dataclass
class CommandRunner:
    """Runs commands on this machine. A bare program name is taken from `bin_dir` when the site
    sets one (else from PATH); a path is run as it is."""

    bin_dir: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment

    @classmethod
    def for_spec(cls, spec: ClusterSpec) -> "CommandRunner":
        return cls(bin_dir=spec.scheduler.bin_dir)

    def program(self, name: str) -> str:
        return str(Path(self.bin_dir) / name) if self.bin_dir and "/" not in name else name

    def run(self, argv: list[str], input: str | None = None, *, env: dict[str, str] | None = None,
            timeout: float | None = None) -> CommandResult:
        """Runs `argv` to completion whatever its exit code; a missing program or no answer within
        the timeout is one line (75), since both usually pass once the site fixes its set-up."""
        argv = [self.program(argv[0]), *argv[1:]]
        timeout = self.timeout if timeout is None else timeout
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                               env={**os.environ, **self.env, **(env or {})})
        except FileNotFoundError:
            raise SchedulerUnavailable(f"{argv[0]}: command not found (is the scheduler's client "
                                       f"installed and on PATH?)") from None
        except subprocess.TimeoutExpired:
            raise SchedulerUnavailable(f"{argv[0]}: no answer within {timeout:.0f}s "
                                       f"(is the scheduler reachable?)") from None
        return CommandResult(argv, r.returncode, r.stdout, r.stderr)

    def write_file(self, path: Path, text: str, mode: int = 0o644) -> None:
        """Writes a file a command will read (a PBS job script), where the commands run."""
        write_atomic(path, text.encode(), mode)

    def make_dirs(self, path: Path) -> None:
        """Makes a directory the scheduler's jobs write into (their logs), where the commands run."""
        path.mkdir(parents=True, exist_ok=True)

    def check(self, argv: list[str], input: str | None = None, *, scheduler: str,
              unreachable_hints: tuple[str, ...] = (), env: dict[str, str] | None = None,
              timeout: float | None = None) -> CommandResult:
        """`run`, and a non-zero exit is one line: unreachable (75) when the error output carries
        one of the scheduler's `unreachable_hints`, else rejected (1)."""
        r = self.run(argv, input, env=env, timeout=timeout)
        if r.returncode != 0:
            msg = last_line(r.stderr or r.stdout)
            if any(h in msg for h in unreachable_hints):
                raise SchedulerUnavailable(f"{argv[0]}: the {scheduler} scheduler is unreachable: {msg}")
            raise SchedulerError(f"{argv[0]} failed (exit {r.returncode}): {msg}")
        return r


@dataclass
class SshRunner(CommandRunner):
    """Runs commands on the login node over one SSH connection, opened on the first command.
    Commands see `login.env`, then `login.profile` (e.g. `module load slurm`), then the command's
    own environment: commands over SSH get no interactive login environment of their own."""

    login: LoginSpec | None = None
    _conn: SshConnection | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_spec(cls, spec: ClusterSpec) -> "SshRunner":
        return cls(bin_dir=spec.scheduler.bin_dir, login=spec.scheduler.login)

    @property
    def connection(self) -> SshConnection:
        if self._conn is None:
            lg = self.login
            self._conn = SshConnection(lg.host, lg.port, lg.user, lg.key_file, lg.known_hosts,
                                       float(lg.connect_timeout))
        return self._conn

    def command_line(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        """The remote shell's command: exports, the profile, then `exec` the quoted argv. A
        variable the command is given with this process's own value (PATH, HOME, ... passed on to
        a job) is this machine's environment, not a setting: on the login node its own stands."""
        given = {**self.env, **(env or {})}
        exports = {**self.login.env, **{k: v for k, v in given.items() if os.environ.get(k) != v}}
        lines = [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
        if self.login.profile:
            lines.append(self.login.profile)
        lines.append(f"exec {shlex.join(argv)}")
        return "\n".join(lines)

    def run(self, argv: list[str], input: str | None = None, *, env: dict[str, str] | None = None,
            timeout: float | None = None) -> CommandResult:
        argv = [self.program(argv[0]), *argv[1:]]
        timeout = self.timeout if timeout is None else timeout
        r = self.connection.exec(self.command_line(argv, env), input, timeout, what=Path(argv[0]).name)
        if r.returncode == 127 and "not found" in r.stderr:
            raise SchedulerUnavailable(f"{argv[0]}: command not found on {self.connection.target} "
                                       f"(set login.profile or scheduler.bin_dir): {last_line(r.stderr)}")
        return CommandResult(argv, r.returncode, r.stdout, r.stderr)

    def write_file(self, path: Path, text: str, mode: int = 0o644) -> None:
        """Uploads the file by SFTP to the same path on the login node (the cluster's store)."""
        self.connection.put(str(path), text.encode(), mode)

    def make_dirs(self, path: Path) -> None:
        self.connection.make_dirs(str(path))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def runner_for(spec: ClusterSpec, backend: str) -> CommandRunner:
    """Where `backend`'s commands run: on the login node when `scheduler.login` is set and the
    backend's commands can run there (the spec refuses login with any other backend; another
    backend is only ever opened here to `render`, which runs nothing)."""
    if spec.scheduler.login and backend in LOGIN_BACKENDS:
        return SshRunner.for_spec(spec)
    return CommandRunner.for_spec(spec)
