"""`salvus-vmjob`: the process a scheduler runs; its life is one VM's life.

    salvus-vmjob --spec cluster.yaml --role ROLE [--image NAME@VERSION] [--service-id ID] [--hypervisor NAME]

check image -> overlay -> config drive -> boot -> ready (the role's `readiness`: the agent's READY,
its CLOUD-INIT-FINAL, or the probe alone) + probe -> register (with the host keys the agent reports) -> heartbeat ->
SIGTERM -> ACPI shutdown (bounded) -> destroy -> deregister -> clean up. Exit codes are the job
contract: 0 stopped on request, 75 transient (retry), 65 image/trust failure, 78 configuration error.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from catalogue.imagefile import OpenImage, copy_from
from catalogue.trust import verified_boot_files, verified_image
from cluster.cliframe import SPEC_HELP, add_verbose, run_command, setup_logging
from cluster.errors import SpecError, TempFailure
from cluster.files import STATE_MODE, open_append
from cluster.registry import Registry, Service, open_registry
from cluster.registry.base import valid_endpoint
from cluster import jobstatus, unfit
from cluster.jobstatus import JobStatus
from cluster.spec import ClusterSpec, RoleSpec, load_spec
from cluster.store import Store
from cluster.yamlmodel import split_image_ref
from jobwrappers.accel import choose_accel
from jobwrappers.agent import CLOUD_INIT_FINAL, GuestReports
from jobwrappers.configdrive import GuestConfig, build_config_drive, hostname_for
from jobwrappers.consolelog import ConsoleLogCap
from jobwrappers.disks import create_overlay, ensure_persistent_disk
from jobwrappers.firmware import prepare_firmware
from jobwrappers.heartbeat import Heartbeater
from jobwrappers.jobenv import JobEnv, check_service_id, default_service_id, job_from_env
from jobwrappers.machine import Disk, Machine, SiteNic, VmRunner, free_port
from jobwrappers.probe import HostChannel, probe_until
from jobwrappers.runners import open_runner
from jobwrappers.sitenet import client as nethelper
from jobwrappers.sitenet.host import check_ready as site_bridge_ready
from jobwrappers.sitenet.layout import SiteLayout, host_identity

log = logging.getLogger("salvus-vmjob")

GUEST_HOST_ADDR = "10.0.2.2"  # how a guest on user-mode networking reaches this host's loopback
START_ATTEMPTS = 3  # a forwarded port taken between choosing it and QEMU binding it: pick another
LIVENESS_CHECK_S = 0.5
UPSTREAM_REFRESH_S = 2.0
PROBE_BACKOFF_MAX_S = 5.0  # readiness: probe polls at most this far apart
# Unix socket paths are limited to 108 bytes; deep scratch directories get a short socket dir.
MAX_SOCKET_DIR_LEN = 80


@dataclass
class Job:
    """Everything one wrapper run owns; `cleanup` removes what is not meant to outlive it."""

    spec: ClusterSpec
    role_name: str
    role: RoleSpec
    service_id: str
    env: JobEnv
    image: OpenImage  # verified and open: QEMU gets this descriptor
    boot_files: dict[str, OpenImage]  # kernel/initrd, verified and open
    stop: threading.Event
    workdir: Path | None = None
    sockdir: Path | None = None
    runner: VmRunner | None = None
    channel: HostChannel | None = None
    endpoint: tuple[str, int] | None = None
    ssh_port: int = 0  # where the guest's sshd is forwarded (the endpoint's port when the role's is 22)
    console_socket: Path | None = None
    console_log: Path | None = None
    console_cap: ConsoleLogCap | None = None
    started: float = field(default_factory=time.time)
    sent_upstreams: list[str] | None = None
    upstreams_checked: float = 0.0
    here: frozenset[str] = frozenset()
    reports: GuestReports = field(default_factory=GuestReports)
    hypervisor: str = ""  # this host's identity (--hypervisor, the scheduler's node name)
    site: dict | None = None  # network: site: the address the helper reserved for this VM
    probe_target: tuple[str, int] | None = None  # where the wrapper probes the guest's service

    def keep_going(self) -> bool:
        return not self.stop.is_set() and self.runner is not None and self.runner.alive()

    def write_state(self, state: str) -> None:
        endpoint = f"{self.endpoint[0]}:{self.endpoint[1]}" if self.endpoint else ""
        jobstatus.write(Store.of(self.spec), JobStatus(
            self.service_id, self.role_name, self.env.job_id, os.getpid(), state, endpoint,
            str(self.console_log or ""), self.started, self.role.image, str(self.workdir or ""),
            str(self.console_socket or "")))

    def cleanup(self) -> None:
        if self.channel:
            self.channel.close()
        if self.runner:
            self.runner.destroy()
            self.runner.close()
        if self.site is not None:
            try:  # the helper's watcher would do it when QEMU is gone; at once is better
                nethelper.call("release", self.service_id)
            except Exception as e:
                log.warning("site network: releasing %s's address failed: %s", self.service_id, e)
        if self.console_cap:
            self.console_cap.stop()
        for d in (self.workdir, self.sockdir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        for f in (self.image, *self.boot_files.values()):
            f.close()
        self.env.remove_private_scratch()
        jobstatus.remove(Store.of(self.spec), self.service_id, os.getpid())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="salvus-vmjob", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one service VM as this job: check the image, boot it from a copy-on-write\n"
                    "overlay, register it once it answers, heartbeat, and on SIGTERM shut it down.",
        epilog="exit codes: 0 stopped on request; 75 temporary failure, retry (guest died, registry\n"
               "down at start, boot timeout); 65 image not trusted or missing; 78 spec or role wrong.\n"
               "example: salvus-vmjob --spec examples/cluster.yaml --role sage --service-id sage-test")
    p.add_argument("--spec", help=SPEC_HELP)
    p.add_argument("--role", required=True, help="the role to boot (a key of the spec's roles)")
    p.add_argument("--image", help="NAME@VERSION to boot, fixed when the job was submitted (default: the "
                                   "role's image in the spec as it is now)")
    p.add_argument("--service-id", help="registry id (default ROLE-JOBID); persistent disks are keyed by it")
    p.add_argument("--hypervisor", help="this host's name in hypervisor.hosts (default $SALVUS_HYPERVISOR, "
                                        "$SLURMD_NODENAME, then the hostname)")
    add_verbose(p, help_text="debug log output")
    return p.parse_args(argv)


def with_job_image(spec: ClusterSpec, role_name: str, image: str | None) -> ClusterSpec:
    """The spec as this job sees it: the role's image is the one the job was submitted with
    (`--image`), so an edit of the spec's `image:` never changes a queued or requeued job. The
    trust checks, the boot, the status file and the registry all read it from here. Without
    --image (a job script from before the contract named it) the spec's own."""
    role = spec.role(role_name)
    if image is None:
        return spec
    try:
        split_image_ref(image)  # the spec's ImageRef rule: a full match, nothing escapes the store
    except ValueError as e:
        raise SpecError(f"--image: {e}") from None
    if image != role.image:
        log.info("booting %s as submitted; the spec's roles.%s.image is now %s", image, role_name, role.image)
    # Copies, not an edit: the spec object may be shared (tests, a caller holding it).
    chosen = copy.copy(role)
    chosen.image = image
    out = copy.copy(spec)
    out.roles = {**spec.roles, role_name: chosen}
    return out


def local_names(spec: ClusterSpec, hypervisor: str = "") -> frozenset[str]:
    """Names under which registered endpoints are on this very host (no DNS: it may be slow)."""
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname(), *filter(None, [hypervisor])}
    if spec.hypervisor.advertise_host:
        names.add(spec.hypervisor.advertise_host)
    return frozenset(names)


def guest_upstreams(job: Job, registry: Registry) -> list[str]:
    """Endpoints of the roles this role forwards to, as the guest can reach them."""
    out = []
    for upstream_role in job.role.upstreams:
        for svc in registry.lookup(upstream_role):
            if not valid_endpoint(svc.host, svc.port):  # the channel is line-based: no '\n' may pass
                log.warning("upstream %r has an invalid endpoint %r:%r: not sent to the guest",
                            svc.service_id, svc.host, svc.port)
                continue
            host = svc.host
            if job.role.network == "user" and host in job.here:
                host = GUEST_HOST_ADDR
            out.append(f"{host}:{svc.port}")
    return out


class HostUnfit(TempFailure):
    """This host cannot run site-network jobs until an operator fixes it (75, and the host is
    marked unfit in the registry so placement avoids it)."""


def check_site_host(spec: ClusterSpec, hypervisor: str) -> None:
    """This host is in hypervisor.hosts (78 if not) and has the site bridge (75 if not: a host's
    set-up missing; the scheduler retries the job elsewhere)."""
    SiteLayout(spec).host(hypervisor)
    bridge = spec.site_network.bridge
    if not site_bridge_ready(bridge):
        raise HostUnfit(f"{hypervisor}: no site network bridge {bridge}: run `salvus_jobs network up "
                          f"--spec {spec.source} --host {hypervisor}` as root on this host")


def mark_host_unfit(spec: ClusterSpec, hypervisor: str, reason: str) -> None:
    """Records the host as unfit for site jobs; best effort: the job exits 75 either way, and a
    registry out of reach must not turn the host's problem into a different one."""
    try:
        Store.of(spec).open()
        with open_registry(spec) as registry:
            unfit.mark(registry, hypervisor, reason)
        log.warning("marked %s unfit in the registry: site jobs are placed elsewhere until "
                    "`salvus_jobs network up` runs on it", hypervisor)
    except Exception as e:  # noqa: BLE001 - any registry failure: the mark is an optimisation
        log.warning("could not mark %s unfit in the registry: %s", hypervisor, e)


def prepare_machine(job: Job, registry: Registry) -> Machine:
    spec, role = job.spec, job.role
    accel = choose_accel(spec.hypervisor.accel, spec.hypervisor.tcg)
    job.workdir = Path(tempfile.mkdtemp(prefix=f"salvus-{job.service_id}-", dir=job.env.scratch()))
    job.sockdir = (job.workdir if len(str(job.workdir)) <= MAX_SOCKET_DIR_LEN
                   else Path(tempfile.mkdtemp(prefix="salvus-sock-", dir="/tmp")))
    overlay = create_overlay(job.image, job.workdir / "root.qcow2")
    disks = [Disk(overlay, "qcow2", backing=job.image)]
    # QEMU opens -kernel/-initrd by name and takes no /dev/fdset: it boots private copies written
    # from the verified descriptors into the job's own (0700) work dir.
    boot = {label: copy_from(f, job.workdir / f"boot-{label}") for label, f in job.boot_files.items()}
    for d in role.persistent:
        disks.append(Disk(ensure_persistent_disk(Store.of(spec), job.service_id, d), "qcow2", serial=d.name))
    upstreams = guest_upstreams(job, registry)
    job.sent_upstreams = upstreams
    nic = None
    if role.network == "site":
        job.site = nethelper.call("reserve", job.role_name, job.service_id, str(os.getpid()))
        if job.site["host"] != job.hypervisor:  # this host's set-up, not the job's: 75, run elsewhere
            raise TempFailure(f"--hypervisor {job.hypervisor}: this host's site network was set up as "
                            f"{job.site['host']!r} (salvus_jobs network up --host)")
        nic = SiteNic(job.site["bridge"], job.site["mac"], job.site["mtu"], spec.site_network.bridge_helper)
    site = job.site or {}
    cfg = GuestConfig(service_id=job.service_id, role=job.role_name, hostname=hostname_for(job.service_id),
                      port=role.port, instance_id=f"{job.service_id}.{job.env.job_id}",
                      upstreams=upstreams, disks={d.name: d.mount for d in role.persistent},
                      ssh_keys=list(spec.ssh_keys), role_config=dict(role.config), reload=role.reload or "",
                      address=f"{site['ip']}/{site['prefixlen']}" if site else "", mac=site.get("mac", ""),
                      mtu=site.get("mtu", 0))
    drive = build_config_drive(job.workdir / "cidata.iso", cfg)
    disks.append(Disk(drive, "raw", readonly=True))
    job.console_log = Store.of(spec).console_log(job.service_id)
    job.console_log.parent.mkdir(parents=True, exist_ok=True)
    # Earlier jobs of a stable service id appended to the same log: cut it before this boot's header.
    job.console_cap = ConsoleLogCap(job.console_log, spec.hypervisor.console_log_max_mb << 20)
    job.console_cap.check()
    # A guest's console may print secrets (keys, tokens): an operator group may read it, no one else.
    with open_append(job.console_log, STATE_MODE) as f:
        f.write(f"\n=== salvus-vmjob job {job.env.job_id} pid {os.getpid()} booting "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} ===\n".encode())
    job.console_cap.start()
    advertise = spec.hypervisor.advertise_host
    host_addr = "0.0.0.0" if advertise else "127.0.0.1"
    machine = Machine(
        name=job.service_id, vcpus=role.vcpus, memory_mb=role.memory_mb, accel=accel, disks=disks,
        guest_port=role.port, host_addr=host_addr, host_port=0 if nic else free_port(host_addr), net=nic,
        channel_path=job.sockdir / "channel.sock", console_log=job.console_log, workdir=job.workdir,
        kernel=boot.get("kernel"), initrd=boot.get("initrd"), cmdline=role.boot.cmdline if role.boot else "",
        firmware=prepare_firmware(spec, job.role_name, job.workdir),
        ssh_host_port=None if role.port == 22 or nic else free_port(host_addr))
    job.console_socket = machine.console_socket
    return machine


def start_vm(job: Job, machine: Machine) -> None:
    """Starts the VM; retries with a fresh port when QEMU exits at once (its port was taken)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        job.runner = open_runner(job.spec, machine)
        job.runner.start()
        time.sleep(0.3)
        if job.runner.alive():
            break
        detail = job.runner.failure_detail()
        job.runner.close()
        if attempt == START_ATTEMPTS or "forward" not in detail:
            raise TempFailure(f"VM for {job.service_id} failed to start: {detail}")
        if machine.net is not None:
            raise TempFailure(f"VM for {job.service_id} failed to start: {detail}")
        machine.host_port = free_port(machine.host_addr)
        if machine.ssh_host_port is not None:
            machine.ssh_host_port = free_port(machine.host_addr)
        log.info("forwarded port was taken; retrying on %d", machine.host_port)
    if machine.net is not None:
        # The VM's own address is its endpoint: the filter rules bound to its tap come first.
        nethelper.call("attach", job.service_id, str(job.runner.pid))
        job.endpoint = job.probe_target = (job.site["ip"], job.role.port)
        job.ssh_port = 22  # the guest's own sshd at its own address (the site's hosts may reach it)
        return
    host = job.spec.hypervisor.advertise_host or "127.0.0.1"
    job.endpoint = (host, machine.host_port)
    job.probe_target = ("127.0.0.1", machine.host_port)
    job.ssh_port = machine.ssh_host_port or machine.host_port




# What each readiness mode waits for on the host channel, and what its absence suggests.
AWAITED = {
    "agent": ("READY", "no READY on the host channel: does the image run cloud-init (or the salvus agent)?"),
    "cloud-init-final": (CLOUD_INIT_FINAL, "no CLOUD-INIT-FINAL on the host channel: does the image run "
                                           "cloud-init, and did its final stage finish?"),
}


def wait_until_ready(job: Job, machine: Machine) -> float:
    """The role's readiness signal, then the probe; returns when the guest said it was up, or the
    probe first answered for `readiness: probe` (monotonic)."""
    timeout = job.spec.boot_timeout(job.role_name)
    deadline = time.monotonic() + timeout
    job.channel = HostChannel(machine.channel_path)
    mode = job.role.readiness
    awaited, detail = "", True  # what was awaited when time ran out; whether the error adds to it
    try:
        if mode == "probe":
            # No agent to ask: the port answering is taken as the service being up (a guess).
            awaited = "no answer from the probe (readiness: probe)"
            job.channel.connect(deadline, job.keep_going)  # upstreams/host keys, if an agent is there
            probe_until(*job.probe_target, job.role.probe, deadline, job.keep_going,
                        max_interval=PROBE_BACKOFF_MAX_S)
            return time.monotonic()
        word, awaited = AWAITED[mode]
        detail = False
        line = job.channel.wait_for(word, deadline, job.keep_going, other=job.reports.take)
        ready_at = time.monotonic()
        log.info("guest says %r", line)
        if mode == "cloud-init-final":
            job.reports.take(line)
        awaited, detail = f"{word} arrived but the probe never answered", True
        probe_until(*job.probe_target, job.role.probe, deadline, job.keep_going)
    except (TimeoutError, ConnectionError) as e:
        if job.stop.is_set():
            raise
        if job.runner and not job.runner.alive():
            why = job.runner.failure_detail() or "guest stopped"
        else:
            why = f"{awaited} ({e})" if detail or isinstance(e, ConnectionError) else awaited
        sep = "" if why.endswith("?") else ";"
        raise TempFailure(f"{job.service_id} did not become ready within {timeout:g} s: {why}{sep} "
                          f"see console log {job.console_log}") from None
    return ready_at


def take_reports(job: Job, beat: Heartbeater, registry: Registry) -> None:
    """Applies what the agent said since the last look: new host keys are recorded with the row."""
    if job.channel is None:
        return
    try:
        for line in job.channel.poll_lines():
            job.reports.take(line)
    except OSError as e:
        log.debug("host channel read failed: %s", e)
        return
    if job.reports.keys_changed and not beat.draining:  # a drained service stays deregistered
        job.reports.keys_changed = False
        beat.service.host_keys = job.reports.host_keys
        try:
            registry.register(beat.service)
            log.info("recorded %s's SSH host keys in the registry", job.service_id)
        except Exception as e:  # the next report or heartbeat may fare better; the VM keeps running
            job.reports.keys_changed = True
            log.warning("could not record %s's host keys: %s", job.service_id, e)


def push_upstreams(job: Job, registry: Registry) -> None:
    if not job.role.upstreams or job.channel is None:
        return
    # Often enough that a new sage is used within seconds, rarely enough to spare a remote registry.
    if time.monotonic() - job.upstreams_checked < UPSTREAM_REFRESH_S:
        return
    job.upstreams_checked = time.monotonic()
    try:
        current = guest_upstreams(job, registry)
    except Exception as e:
        log.debug("upstream lookup failed: %s", e)
        return
    if current != job.sent_upstreams:
        try:
            job.channel.send("UPSTREAMS " + " ".join(current))
            job.sent_upstreams = current
            log.info("upstreams now %s", " ".join(current) or "(none)")
        except OSError as e:
            log.warning("could not update the guest's upstreams: %s", e)


def supervise(job: Job, beat: Heartbeater, registry: Registry) -> bool:
    """Until stopped or the guest dies; True when asked to stop."""
    while not job.stop.is_set():
        if not job.runner.alive():
            return False
        beat.beat_if_due()
        take_reports(job, beat, registry)
        push_upstreams(job, registry)
        job.stop.wait(min(LIVENESS_CHECK_S, beat.seconds_until_due() or LIVENESS_CHECK_S))
    return True


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    spec = with_job_image(load_spec(args.spec), args.role, args.image)
    role = spec.role(args.role)
    env = job_from_env(spec.scheduler.backend)
    service_id = check_service_id(args.service_id or default_service_id(args.role, env.job_id))
    # Nothing is created before the image and boot files pass their checks; they stay open from
    # here to the end of the job (the descriptors QEMU reads; a failed start exits the process).
    image = verified_image(spec, args.role)
    try:
        boot_files = verified_boot_files(spec, args.role)
        if role.network == "bridge":
            raise SpecError(f"roles.{args.role}.network: salvus-vmjob supports 'user' (a host port forward) "
                            f"and 'site' networking, got {role.network!r}")
        hypervisor = host_identity(args.hypervisor)
        if role.network == "site":
            try:
                check_site_host(spec, hypervisor)
            except HostUnfit as e:
                mark_host_unfit(spec, hypervisor, str(e))
                raise
        for up in role.upstreams:
            spec.role(up)
        Store.of(spec).open()
        registry = open_registry(spec)
        if role.network == "site" and unfit.clear(registry, hypervisor):
            log.info("%s passes the site network's check again: its unfit mark is cleared", hypervisor)
    except BaseException:
        image.close()
        raise
    job = Job(spec, args.role, role, service_id, env, image, boot_files, stop,
              here=local_names(spec, hypervisor), hypervisor=hypervisor)
    beat: Heartbeater | None = None
    try:
        try:
            machine = prepare_machine(job, registry)
        except OSError as e:  # scratch or store full or unwritable: a host's trouble, another may do
            raise TempFailure(f"{service_id}: cannot prepare the VM's files in {e.filename or job.workdir}: "
                              f"{e.strerror or e}") from None
        job.write_state("booting")  # visible to `status` at once; again below with the endpoint
        start_vm(job, machine)
        job.write_state("booting")
        print(f"salvus-vmjob: {service_id}: {job.runner.kind} VM under {machine.accel.name}, "
              f"{'direct kernel boot' if machine.kernel else machine.firmware.kind + ' firmware boot'}, "
              f"endpoint {job.endpoint[0]}:{job.endpoint[1]}, console log {job.console_log}", flush=True)
        try:
            ready_at = wait_until_ready(job, machine)
        except (TimeoutError, ConnectionError):
            log.info("stop requested while %s was booting", service_id)
            return 0
        beat = Heartbeater(registry, Service(
            role=args.role, service_id=service_id, host=job.endpoint[0], port=job.endpoint[1],
            hypervisor=job.hypervisor, scheduler=env.scheduler, job_id=env.job_id,
            image=role.image, host_keys=job.reports.host_keys, ssh_port=job.ssh_port),
            interval=spec.registry.heartbeat_interval, ttl=spec.registry.ttl)
        job.reports.keys_changed = False
        try:
            beat.start()
        except SpecError:  # a registry no retry mends (damaged, or refusing the configuration): 78
            beat = None
            raise
        except Exception as e:  # any other backend failure: the scheduler retries the job later
            beat = None
            raise TempFailure(f"cannot register {service_id}: {e}") from None
        signal_word = {"probe": "the probe's first answer", "cloud-init-final": CLOUD_INIT_FINAL}.get(
            role.readiness, "READY")
        log.info("registered %s at %s:%d (%.3f s after %s)", service_id, *job.endpoint,
                 time.monotonic() - ready_at, signal_word)
        job.write_state("running")
        if supervise(job, beat, registry):
            job.write_state("stopping")
            t0 = time.monotonic()
            clean = job.runner.shutdown(spec.stop_timeout(job.role_name))
            log.info("guest %s in %.1f s", "shut down" if clean else "destroyed after stop_timeout",
                     time.monotonic() - t0)
            return 0
        raise TempFailure(f"guest {service_id} died: {job.runner.failure_detail() or 'VM gone'} "
                          f"(console: {job.console_log})")
    finally:
        if beat is not None:
            beat.deregister()
        job.cleanup()
        registry.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The log is the scheduler's job output, read long after the fact: full dates and the pid.
    setup_logging(args.verbose, quiet_level=logging.INFO,
                  fmt="%(asctime)s salvus-vmjob[%(process)d] %(levelname)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if not stop.is_set():
            log.info("%s: stopping the VM", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return run_command("salvus-vmjob", lambda: run(args, stop))


if __name__ == "__main__":
    sys.exit(main())
