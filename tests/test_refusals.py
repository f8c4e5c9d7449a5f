"""Bad input to each command is one line `PROG: message` with the documented exit code, never a
traceback (issue 24's "one line, the documented code" list)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from catalogue import trust
from cluster.errors import DataError
from cluster.files import read_limited
from cluster.registry.base import Service
from cluster.registry.sqlite import SqliteRegistry
from cluster.spec import load_spec
from cluster.store import Store
from imagedist.gc import collect
from tests.fixtures.demo_image import demo_spec_text

ROOT = Path(__file__).resolve().parent.parent


def run(*argv: str, cwd: Path, prog: str = "salvus_jobs.py", timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SALVUS_SPEC", None)
    if prog == "imgdist":
        cmd = [sys.executable, "-c", "import sys; from imagedist.cli import main; sys.exit(main())", *argv]
    else:
        cmd = [sys.executable, str(ROOT / prog), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def refused(r: subprocess.CompletedProcess, code: int, text: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert any(text in line for line in lines), r.stderr
    if code != 2:  # argparse prints its usage before the one error line
        assert len(lines) == 1, r.stderr


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    text = (ROOT / "examples" / "cluster.yaml").read_text().replace("~/.local/share/salvus", str(tmp_path / "store"))
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("counts, text", [
    (["sage=²"], "expected ROLE=N with N a whole number, got 'sage=²'"),
    (["sage=1", "sage=0"], "sage given twice"),
    (["sage=10001"], "at most 10000 services per role"),
    (["sage=99999999999999999999"], "expected ROLE=N with N a whole number"),
])
def test_scale_refuses_odd_digits_repeats_and_absurd_counts(spec_file, counts, text):
    refused(run("--spec", str(spec_file), "scale", "--dry-run", *counts, cwd=spec_file.parent), 78, text)


@pytest.mark.parametrize("backend", ["condor", "drmaa", "slurm"])
@pytest.mark.parametrize("walltime", ["7 days", "1:2:3:4:5"])
def test_walltime_forms_no_backend_knows_are_refused(spec_file, backend, walltime):
    spec_file.write_text(spec_file.read_text().replace(
        "backend: local", f"backend: {backend}\n  walltime: \"{walltime}\""))
    refused(run("--spec", str(spec_file), "render", "sage", cwd=spec_file.parent), 78,
            "scheduler.walltime: expected a Slurm time")


@pytest.mark.parametrize("value", [".inf", ".nan", "1e300"])
def test_infinite_or_absurd_timeouts_are_refused(spec_file, value):
    spec_file.write_text(spec_file.read_text().replace("boot_timeout: 180", f"boot_timeout: {value}"))
    refused(run("--spec", str(spec_file), "status", cwd=spec_file.parent), 78, "hypervisor.boot_timeout")


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_20000_deep_yaml_nesting_is_refused(tmp_path, opener):
    (tmp_path / "deep.yaml").write_text("a:\n  " + opener * 20000 + "\n")
    refused(run("--spec", "deep.yaml", "status", cwd=tmp_path), 78, "deep.yaml: malformed YAML")


def test_spec_that_is_dev_zero_or_a_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/zero", str(tmp_path / "fifo")):
        refused(run("--spec", path, "status", cwd=tmp_path, timeout=20), 78, "cannot read spec: not a regular file")


def test_catalogue_serve_refuses_a_port_out_of_range(tmp_path):
    refused(run("catalogue", "serve", "--dir", str(tmp_path), "--bind", "127.0.0.1:99999", cwd=tmp_path),
            78, "--bind: expected HOST:PORT with PORT 0-65535")


def test_catalogue_sign_refuses_an_expiry_beyond_the_cap(tmp_path):
    refused(run("catalogue", "sign", "--dir", str(tmp_path), "--key", "k", "--expires", "99999999999d",
                cwd=tmp_path), 2, "at most 3650d")


def test_index_valid_longer_than_the_spec_allows_is_refused(signed_catalogue):
    sc = signed_catalogue
    sc.write_spec(extra="")
    sc.spec_path.write_text(sc.spec_path.read_text().replace(
        "catalogue:\n", "catalogue:\n  max_index_lifetime_days: 5\n"))
    with pytest.raises(DataError, match="longer than catalogue.max_index_lifetime_days \\(5\\)"):
        trust.accept_index(sc.spec(), *sc.signed())  # signed for 7 days
    sc.sign(days=3)
    assert trust.accept_index(sc.spec(), *sc.signed()).version == 2


def test_imgdist_gc_removes_a_dangling_symlink_in_partial_without_an_index(spec_file):
    spec = load_spec(spec_file)
    store = Store.of(spec)
    store.partial.mkdir(parents=True)
    (store.partial / "demo-9.qcow2").symlink_to(spec_file.parent / "gone")
    (store.partial / "demo-8.qcow2").write_bytes(b"fresh")  # a download in progress stays
    result = collect(spec, store, None, keep=2, partials=True)
    assert sorted(p.name for p in store.partial.iterdir()) == ["demo-8.qcow2"], result


@pytest.mark.parametrize("interval", ["-5", "0", "nan", "inf"])
def test_imgdist_daemon_refuses_an_interval_that_is_no_pause(spec_file, interval):
    refused(run("--spec", str(spec_file), "daemon", "--interval", interval, cwd=spec_file.parent, prog="imgdist"),
            2, "--interval: expected seconds above 0")


def test_read_limited_refuses_what_is_not_a_regular_file_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", Path("/dev/zero"), tmp_path):
        with pytest.raises(DataError, match="cannot read: not a regular file"):
            read_limited(path, 1 << 16)
        with pytest.raises(DataError, match="not a plain file or directory|not a regular file"):
            read_limited(path, 1 << 16, owners=frozenset({os.getuid()}))  # trust state


def test_a_fifo_in_place_of_a_trust_file_or_a_key_is_refused_without_hanging(spec_file):
    cwd = spec_file.parent
    assert run("--spec", str(spec_file), "catalogue", "unapprove", "demo@1", cwd=cwd).returncode == 0
    os.mkfifo(Store.of(load_spec(spec_file)).trust.approvals)
    refused(run("--spec", str(spec_file), "catalogue", "unapprove", "demo@1", cwd=cwd, timeout=20), 65,
            "approvals.yaml: not a plain file or directory; refused as trust state")
    os.mkfifo(cwd / "key.pub")
    refused(run("catalogue", "verify", "--dir", str(cwd), "--trust", str(cwd / "key.pub"), cwd=cwd, timeout=20),
            78, "key.pub: cannot read: not a regular file")


def test_key_errors_exit_78_not_77(tmp_path, monkeypatch):
    monkeypatch.delenv("SALVUS_KEY_PASSPHRASE", raising=False)  # run() passes the environment on
    refused(run("catalogue", "sign", "--dir", str(tmp_path), "--key", "nokey", cwd=tmp_path), 78,
            "no passphrase: set $SALVUS_KEY_PASSPHRASE")
    monkeypatch.setenv("SALVUS_KEY_PASSPHRASE", "a passphrase")
    refused(run("catalogue", "sign", "--dir", str(tmp_path), "--key", "nokey", cwd=tmp_path), 78,
            "key file nokey: cannot read: No such file or directory")


def damage_registry(path: Path, how: str) -> None:
    """`garbage`: the whole file random bytes; `pages`: a real registry of 300 rows whose pages after
    the first (the schema) are random bytes, so it opens and fails on the first read."""
    rng = random.Random(24)
    if how == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(8192))
        return
    reg = SqliteRegistry(path)
    for i in range(300):
        reg.register(Service(role="sage", service_id=f"sage-{i}", host="127.0.0.1", port=6000 + i,
                             hypervisor="hv1", scheduler="local", job_id=str(i), image="demo@1"))
    reg.close()  # the last connection checkpoints the WAL into the file
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page, len(data)
    data[page:] = rng.randbytes(len(data) - page)
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["garbage", "pages"])
def test_a_corrupt_registry_is_78_for_every_command_that_reads_it(spec_file, how):
    damage_registry(load_spec(spec_file).sqlite_path, how)
    for command in (["services"], ["services", "sage", "--json"], ["status"], ["scale", "--dry-run"]):
        refused(run("--spec", str(spec_file), *command, cwd=spec_file.parent), 78,
                "not a registry or damaged; move it aside")


def wrapper(spec: Path, role: str, scratch: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    return subprocess.run([sys.executable, "-m", "jobwrappers.vmjob", "--spec", str(spec), "--role", role],
                          env=env, capture_output=True, text=True, timeout=60)


def wrapper_refused(r: subprocess.CompletedProcess, code: int, text: str) -> str:
    """The wrapper logs warnings (unsigned demo image, TCG) before its one `salvus-vmjob:` line."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("salvus-vmjob:")]
    assert r.returncode == code and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert len(lines) == 1 and text in lines[0], r.stderr
    return lines[0]


@pytest.mark.parametrize("how, role", [("garbage", "sage"), ("pages", "hub")])
def test_the_wrapper_exits_78_on_a_corrupt_registry_and_leaves_nothing(tmp_path, demo_image, how, role):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store"))
    damage_registry(load_spec(spec).sqlite_path, how)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wrapper_refused(wrapper(spec, role, scratch), 78, "not a registry or damaged")
    assert list(scratch.iterdir()) == [] and not list((tmp_path / "store" / "state" / "jobs").glob("*"))


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs of the test's own (we are root): room for an overlay, not for a kernel copy."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("full", [True, False], ids=["no-room-for-the-overlay", "no-room-for-the-kernel"])
def test_a_full_scratch_disk_is_75_retry_elsewhere(tmp_path, demo_image, small_tmpfs, full):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store"))
    keep = []
    if full:
        with open(small_tmpfs / "fill", "wb") as f:
            with pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        keep = ["fill"]
    line = wrapper_refused(wrapper(spec, "sage", small_tmpfs), 75, "No space left on device")
    assert ("qemu-img create" in line) == full, line
    assert sorted(p.name for p in small_tmpfs.iterdir()) == keep
    assert not list((tmp_path / "store" / "state" / "jobs").glob("*"))


def test_a_spec_over_1_mib_is_refused_unread(tmp_path):
    (tmp_path / "big.yaml").write_bytes(b"#" * (1 << 20) + b"\n")
    refused(run("--spec", "big.yaml", "status", cwd=tmp_path), 78, "big.yaml: spec larger than the limit of 1048576")


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "2000000"])
def test_a_console_log_cap_out_of_range_is_refused(spec_file, value):
    spec_file.write_text(spec_file.read_text().replace("boot_timeout: 180", f"console_log_max_mb: {value}"))
    refused(run("--spec", str(spec_file), "status", cwd=spec_file.parent), 78, "hypervisor.console_log_max_mb")
