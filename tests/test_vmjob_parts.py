"""The wrapper's single-purpose parts, without booting a VM: overlay, persistent disks, config drive,
accelerator choice, job environment, heartbeats against a real SQLite registry."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.errors import SpecError
from cluster.registry import Service
from cluster.registry.sqlite import SqliteRegistry
from cluster.spec import DiskSpec
from cluster.store import Store
from cluster.yamlmodel import load_yaml
from cluster.spec import TcgSpec
from jobwrappers.accel import TCG, choose_accel, pvm_only
from jobwrappers.configdrive import GuestConfig, build_config_drive, hostname_for
from catalogue.imagefile import open_image
from jobwrappers.disks import create_overlay, ensure_persistent_disk
from jobwrappers.heartbeat import Heartbeater
from jobwrappers.jobenv import check_service_id, default_service_id, job_from_env, sweep_stale_private_scratch


def qemu_img_info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)


def test_overlay_names_no_backing_file_and_has_the_base_size(tmp_path):
    """The runner attaches the verified base as the overlay's backing node; the overlay's own header
    must not name a file QEMU would open by name."""
    base = tmp_path / "images" / "base.qcow2"
    base.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    (tmp_path / "scratch").mkdir()
    opened = open_image(base, "qcow2", None)
    overlay = create_overlay(opened, tmp_path / "scratch" / "root.qcow2")
    opened.close()
    info = qemu_img_info(overlay)
    assert "backing-filename" not in info
    assert info["virtual-size"] == 64 << 20


def test_persistent_disk_is_sparse_created_once_and_kept(tmp_path):
    disk = DiskSpec(name="data", size_mb=1024)
    path = ensure_persistent_disk(Store(tmp_path), "cassandra-0", disk)
    assert path == tmp_path / "persistent" / "cassandra-0" / "data.qcow2"
    assert qemu_img_info(path)["virtual-size"] == 1 << 30 and path.stat().st_size < 1 << 20
    path.write_bytes(path.read_bytes() + b"\0" * 512)  # stands in for data the guest wrote
    size = path.stat().st_size
    assert ensure_persistent_disk(Store(tmp_path), "cassandra-0", disk) == path and path.stat().st_size == size
    assert [p.name for p in path.parent.iterdir()] == ["data.qcow2"]


def test_config_drive_is_nocloud_with_keys_and_role_config(tmp_path):
    cfg = GuestConfig(service_id="hub-7", role="hub", hostname=hostname_for("Hub_7"), port=8080,
                      instance_id="hub-7.42", upstreams=["10.0.2.2:40001"], disks={},
                      ssh_keys=["ssh-ed25519 AAAAtest ops@site"], role_config={"title": "it's a hub"})
    iso = build_config_drive(tmp_path / "cidata.iso", cfg)
    pvd = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    assert "Volume id: cidata" in pvd

    def read(name: str) -> str:
        return subprocess.run(["isoinfo", "-R", "-i", str(iso), "-x", f"/{name}"],
                              capture_output=True, text=True, check=True).stdout

    meta = load_yaml(read("meta-data"), "meta-data", SpecError)
    assert meta == {"instance-id": "hub-7.42", "local-hostname": "hub-7"}
    ud_text = read("user-data")
    assert ud_text.startswith("#cloud-config\n")
    ud = load_yaml(ud_text, "user-data", SpecError)
    assert ud["hostname"] == "hub-7" and ud["ssh_authorized_keys"] == ["ssh-ed25519 AAAAtest ops@site"]
    service = json.loads(ud["write_files"][0]["content"])
    assert service["upstreams"] == ["10.0.2.2:40001"] and service["port"] == 8080
    env = subprocess.run(["sh", "-c", f"{read('salvus.env')}\necho \"$SALVUS_CONFIG_TITLE|$SALVUS_UPSTREAMS\""],
                         capture_output=True, text=True, check=True).stdout
    assert env == "it's a hub|10.0.2.2:40001\n"
    assert read("authorized_keys") == "ssh-ed25519 AAAAtest ops@site\n"


def test_accel_tcg_when_asked_and_detection_decides_auto(caplog):
    assert choose_accel("tcg") == TCG
    caplog.set_level("WARNING")
    auto = choose_accel("auto")
    warnings = [r for r in caplog.records if "TCG" in r.getMessage()]
    assert (auto == TCG) == (len(warnings) == 1)


def test_tcg_cpu_model_and_translation_cache_come_from_the_spec():
    accel = choose_accel("tcg", TcgSpec(cpu="qemu64", tb_size_mb=64))
    assert accel.qemu_args == ("-accel", "tcg,tb-size=64", "-cpu", "qemu64")
    assert accel.libvirt_cpu == "<cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>"
    assert "<tb-cache unit='MiB'>64</tb-cache>" in accel.libvirt_features
    assert choose_accel("tcg", TcgSpec()) == TCG


def test_kvm_pvm_alone_counts_as_a_kvm_that_cannot_run_stock_guests(tmp_path):
    modules = tmp_path / "module"
    (modules / "kvm").mkdir(parents=True)
    assert not pvm_only(modules)
    (modules / "kvm_pvm").mkdir()
    assert pvm_only(modules)
    (modules / "kvm_intel").mkdir()
    assert not pvm_only(modules), "a hardware KVM module beside it runs stock guests"


def test_job_env_from_each_scheduler(tmp_path):
    ad = tmp_path / ".job.ad"
    ad.write_text('ClusterId = 12\nProcId = 3\nOwner = "x"\n')
    cases = [({"_CONDOR_JOB_AD": str(ad), "_CONDOR_SCRATCH_DIR": str(tmp_path)}, ("12.3", "condor")),
             ({"SLURM_JOB_ID": "991", "TMPDIR": str(tmp_path)}, ("991", "slurm")),
             ({"PBS_JOBID": "5.server", "TMPDIR": str(tmp_path)}, ("5.server", "pbs")),
             ({"JOB_ID": "77", "TMPDIR": str(tmp_path)}, ("77", "sge")),
             ({"SALVUS_LOCAL_JOB_ID": "L1", "TMPDIR": str(tmp_path)}, ("L1", "local"))]
    for env, want in cases:
        job = job_from_env("local", env)
        assert (job.job_id, job.scheduler) == want and job.scratch() == tmp_path and job.private_dir is None
    private = job_from_env("local", {})
    assert private.private_dir is None, "nothing is made before the job needs it"
    scratch = private.scratch()
    assert scratch.is_dir() and private.private_dir == scratch
    # A SIGKILLed wrapper's private scratch is swept by the next wrapper; a live one's is kept.
    dead = scratch.with_name(scratch.name + "-dead")
    dead.mkdir()
    (dead / "owner").write_text("999999999 1\n")
    (dead / "root.qcow2").write_bytes(b"x")
    assert sweep_stale_private_scratch(scratch.parent) == [dead] and scratch.is_dir()
    private.remove_private_scratch()
    assert not scratch.exists()
    assert default_service_id("sage", "5.server") == "sage-5.server"
    with pytest.raises(SpecError, match="--service-id"):
        check_service_id("../etc")


def test_heartbeat_reregisters_an_expired_row(tmp_path):
    reg = SqliteRegistry(tmp_path / "reg.sqlite", ttl=5)
    beat = Heartbeater(reg, Service("sage", "sage-1", "127.0.0.1", 4000), interval=2.0, ttl=5)
    beat.start()
    reg.deregister("sage-1")  # as if the row had expired while the registry was unreachable
    beat.next_due = 0
    beat.beat_if_due()
    assert reg.get("sage-1") is not None and beat.failures == 0
    reg.close()
    beat.next_due = 0
    beat.beat_if_due()  # a closed connection fails like an unreachable backend: logged, retried
    assert beat.failures == 1 and 0 < beat.seconds_until_due() < 2.0


def test_guest_upstreams_forward_only_valid_endpoints(tmp_path):
    """A registry row whose host holds a newline would start a new command line on the guest's
    channel: such rows are never sent (the registry's read checks catch them too; this guards
    the channel itself)."""
    from types import SimpleNamespace
    from jobwrappers.vmjob import guest_upstreams

    class Unchecked(SqliteRegistry):  # a registry that hands back rows as stored
        def lookup(self, role: str) -> list[Service]:
            return [Service.from_row(r) for r in self._db.execute(
                "SELECT role, service_id, host, port FROM services WHERE role = ?", (role,))]

    reg = Unchecked(tmp_path / "reg.sqlite")
    reg.register(Service(role="sage", service_id="sage-ok", host="10.0.0.5", port=6000))
    reg.register(Service(role="sage", service_id="sage-bad", host="10.0.0.6\nRELOAD", port=6000))
    job = SimpleNamespace(role=SimpleNamespace(upstreams=["sage"], network="bridge"), here=frozenset())
    assert guest_upstreams(job, reg) == ["10.0.0.5:6000"]
    reg.close()


def test_host_channel_bounds_a_line_trickled_in_small_chunks(tmp_path):
    """An over-long line sent a few bytes at a time is dropped and never buffered beyond the cap;
    the line after it is read whole."""
    import socket
    import threading
    import time
    from jobwrappers.probe import MAX_LINE, HostChannel

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "ch.sock"))
    server.listen(1)
    ch = HostChannel(tmp_path / "ch.sock")
    ch.connect(time.monotonic() + 5, lambda: True)
    peer, _ = server.accept()
    biggest = []

    def guest() -> None:
        for _ in range(MAX_LINE * 2 // 512):
            peer.sendall(b"Y" * 512)
        peer.sendall(b"\nREADY sage s1\n")

    t = threading.Thread(target=guest)
    t.start()
    while True:
        line = ch.read_line(time.monotonic() + 10, lambda: biggest.append(len(ch._buf)) or True)
        if line.startswith("READY"):
            break
    t.join()
    assert line == "READY sage s1" and max(biggest) <= MAX_LINE + 4096
    peer.close(), server.close()


def test_the_wrapper_boots_the_image_of_its_job_not_the_spec(tmp_path):
    """`--image` (fixed at submit time) decides what the trust check opens and the job boots:
    the spec's `image:` was edited since; without --image (older job scripts) the spec's own."""
    from catalogue.trust import verified_image
    from cluster.spec import parse_spec
    from jobwrappers.vmjob import parse_args, with_job_image

    store = tmp_path / "store"
    base = store / "images" / "base"
    base.mkdir(parents=True)
    for v in ("1", "2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base / f"demo-{v}.qcow2"), "16M"], check=True)
    spec = parse_spec(f"store: {store}\ncatalogue: {{insecure_allow_unsigned: true}}\n"
                      "roles: {sage: {image: demo@2, port: 6000}}\n", tmp_path / "cluster.yaml")
    args = parse_args(["--spec", spec.source, "--role", "sage", "--image", "demo@1"])
    job_spec = with_job_image(spec, args.role, args.image)
    assert job_spec.role("sage").image == "demo@1" and spec.role("sage").image == "demo@2", "the spec is not edited"
    opened = verified_image(job_spec, "sage")
    assert opened.path == base / "demo-1.qcow2"
    opened.close()
    opened = verified_image(with_job_image(spec, "sage", None), "sage")
    assert opened.path == base / "demo-2.qcow2"
    opened.close()
    # Full match, the spec's ImageRef rule: nothing else reaches a path or the registry.
    for bad in ("demo", "demo@1\n", "demo@1 ", "../demo@1", "demo@1/x", "demo@..", "@1", "demo@1@2"):
        with pytest.raises(SpecError, match=r"^--image: expected NAME@VERSION"):
            with_job_image(spec, "sage", bad)


def test_an_image_path_role_takes_the_file_from_image_path_and_the_name_from_image(tmp_path):
    from catalogue.trust import verified_image
    from cluster.spec import parse_spec
    from jobwrappers.vmjob import with_job_image

    own = tmp_path / "own.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(own), "16M"], check=True)
    spec = parse_spec(f"store: {tmp_path}/store\ncatalogue: {{insecure_allow_unsigned: true}}\n"
                      f"roles: {{sage: {{image: demo@2, port: 6000, image_path: {own}}}}}\n", tmp_path / "c.yaml")
    job_spec = with_job_image(spec, "sage", "demo@1")
    assert job_spec.role("sage").image == "demo@1"
    opened = verified_image(job_spec, "sage")
    assert opened.path == own
    opened.close()


def test_a_bad_image_argument_is_one_line_and_exit_78(tmp_path, capsys, monkeypatch):
    from jobwrappers import vmjob

    monkeypatch.setattr(vmjob.signal, "signal", lambda *_a: None)  # keep pytest's own SIGINT/SIGTERM handlers
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"store: {tmp_path}/store\nroles: {{sage: {{image: demo@2, port: 6000}}}}\n")
    assert vmjob.main(["--spec", str(spec), "--role", "sage", "--image", "demo/../x@1"]) == 78
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("salvus-vmjob: --image: expected NAME@VERSION"), err
