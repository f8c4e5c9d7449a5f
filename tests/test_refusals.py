"""Bad input to each command is one line `PROG: message` with the documented exit code, never a
traceback (issue 24's "one line, the documented code" list)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from catalogue import trust
from cluster.errors import DataError
from cluster.spec import load_spec
from cluster.store import Store
from imagedist.gc import collect

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
