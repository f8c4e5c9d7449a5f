"""`salvus_jobs image build-demo` and `salvus_jobs demo` end to end: four real VMs on the local executor."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.registry import open_registry
from cluster.spec import load_spec
from jobwrappers.demo_image import demo_image_paths

pytestmark = pytest.mark.vm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"


def example_spec_in(tmp_path: Path) -> Path:
    """examples/cluster.yaml with its store (and so its image paths) moved under tmp_path."""
    store = tmp_path / "salvus"
    text = EXAMPLE.read_text().replace("~/.local/share/salvus", str(store))
    text = text.replace("ttl: 30 ", "ttl: 6  ").replace("heartbeat_interval: 10", "heartbeat_interval: 1")
    spec = tmp_path / "cluster.yaml"
    spec.write_text(text)
    return spec


def test_build_demo_writes_where_the_example_spec_points(tmp_path, cli):
    spec = example_spec_in(tmp_path)
    r = cli("--spec", str(spec), "image", "build-demo", timeout=120)
    assert r.returncode == 0, r.stderr
    image = demo_image_paths(tmp_path / "salvus" / "images" / "base")
    assert r.stdout.split() == [str(p) for p in image.paths()]
    assert load_spec(spec).roles["sage"].image_path == str(image.disk)


def test_demo_end_to_end(tmp_path, cli):
    spec = example_spec_in(tmp_path)
    r = cli("--spec", str(spec), "demo", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "building the demo image" in out
    assert f"forwarded 12345*6789+(2**20) to a sage VM: {12345 * 6789 + 2 ** 20}" in out
    assert "cassandra cassandra-0: cassandra cassandra-0 boots=1 data=/data" in out
    assert "all 4 VMs registered" in out and "stopped 4 job(s)" in out
    loaded = load_spec(spec)
    with open_registry(loaded) as reg:
        assert reg.all() == []
    assert not any((loaded.store_path / "state" / "jobs").glob("*.json"))
    assert qemu_processes_using(tmp_path) == []


def qemu_processes_using(path: Path) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(path).encode() in a for a in argv):
            found.append(int(proc.name))
    return found
