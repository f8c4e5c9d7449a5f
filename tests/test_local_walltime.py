"""The local executor as a batch scheduler: `scheduler.walltime` enforced (SIGTERM at the limit,
SIGKILL to the wrapper's process group after the grace), how a job ended (`ended_by`), the
listing's walltime clock and image, and successors that wait for their predecessor to end.

The supervisor-only cases run a small shell script as the "wrapper" (named so in the tests): what
is under test is the supervisor's part, which is the same whatever it runs. The walltime with a
guest boots a real demo VM."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.registry import open_registry
from cluster.spec import load_spec
from submit import open_backend
from submit.base import Job
from tests.fixtures.demo_image import demo_spec_text, pid_alive
from tests.polling import wait_for
from tests.submit_support import stop_everything_after  # noqa: F401 (fixture)

STOP_TIMEOUT = 1  # the grace is this plus CLEANUP_GRACE_S


def write_spec(tmp_path: Path, demo_image, scheduler: str = "", **hypervisor: object) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"site: wt\nscheduler: {{backend: local{scheduler}}}\n"
                    + demo_spec_text(demo_image, tmp_path / "store", **hypervisor))
    return path


def script(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def job(backend, job_id: str) -> Job | None:
    return next((j for j in backend.list() if j.job_id == job_id), None)


def test_walltime_sigkills_a_wrapper_script_that_ignores_sigterm_after_the_grace_supervisor_only(
        tmp_path, demo_image, stop_everything_after):
    mark, child = tmp_path / "terms", tmp_path / "child.pid"
    wrapper = script(tmp_path, "stubborn", f"trap 'echo TERM >> {mark}' TERM\nsleep 1000 &\necho $! > {child}\n"
                                           "while :; do wait; done\n")
    spec = write_spec(tmp_path, demo_image, f", wrapper: {wrapper}, walltime: '0:03'", stop_timeout=STOP_TIMEOUT)
    stop_everything_after(spec)
    backend = open_backend(load_spec(spec))
    (submitted,) = backend.submit("sage", 1)
    running = wait_for(lambda: (j := job(backend, submitted.job_id)) and j.state == "running" and j.started and j,
                       30, "the job running")
    assert running.walltime_s == 3 and running.image == "demo@1"
    assert backend.earliest_signal(running) == running.started + 3  # local: no lead, no slack
    sleeper = int(wait_for(lambda: child.exists() and child.read_text().strip(), 10, "the script's child"))

    done = wait_for(lambda: (j := job(backend, submitted.job_id)) and j.state == "done" and j, 60, "the job ended")
    assert done.ended_by == "walltime"
    assert done.hold_reason.startswith("walltime 3s reached: SIGTERM, SIGKILL after the 16s grace; "
                                       "the wrapper exited -9"), done.hold_reason
    assert mark.read_text() == "TERM\n"  # one SIGTERM, then no more asking
    assert not pid_alive(sleeper)  # the SIGKILL went to the wrapper's whole process group
    assert done.started is None  # not running: no walltime clock


def test_successor_waits_for_its_predecessor_then_runs_supervisor_only(tmp_path, demo_image, stop_everything_after):
    runs, stop_file = tmp_path / "runs", tmp_path / "stop"
    # Appends its service id when it starts; exits 0 on SIGTERM, or by itself once `stop` exists.
    wrapper = script(tmp_path, "polite", f'echo "$*" >> {runs}\ntrap "exit 0" TERM\n'
                                         f"while [ ! -e {stop_file} ]; do sleep 0.2; done\n")
    spec = write_spec(tmp_path, demo_image, f", wrapper: {wrapper}", stop_timeout=STOP_TIMEOUT)
    stop_everything_after(spec)
    backend = open_backend(load_spec(spec))
    assert backend.dependencies
    (first,) = backend.submit("cassandra", 1)
    wait_for(lambda: job(backend, first.job_id).state == "running", 30, "the predecessor running")
    second = backend.submit_successor(first)
    assert second.service_id == first.service_id == "cassandra-0" and second.job_id != first.job_id

    queued = wait_for(lambda: (j := job(backend, second.job_id)) and j.hold_reason and j, 30, "the successor waiting")
    assert (queued.state, queued.hold_reason) == ("queued", f"waiting for job {first.job_id} to end")
    assert queued.started is None and queued.after == first.job_id
    assert runs.read_text().count("--service-id cassandra-0") == 1  # only the predecessor ran

    backend.cancel(job(backend, first.job_id))
    wait_for(lambda: job(backend, second.job_id).state == "running", 30, "the successor running")
    ended = job(backend, first.job_id)
    assert (ended.state, ended.ended_by) == ("done", "cancel")
    assert runs.read_text().count("--service-id cassandra-0") == 2

    stop_file.touch()  # the successor's wrapper ends by itself
    finished = wait_for(lambda: (j := job(backend, second.job_id)) and j.state == "done" and j, 30, "the successor ended")
    assert finished.ended_by == "exit"


def test_successor_cancelled_while_waiting_never_runs_supervisor_only(tmp_path, demo_image, stop_everything_after):
    runs = tmp_path / "runs"
    wrapper = script(tmp_path, "polite", f'echo "$*" >> {runs}\ntrap "exit 0" TERM\nwhile :; do sleep 0.2; done\n')
    spec = write_spec(tmp_path, demo_image, f", wrapper: {wrapper}", stop_timeout=STOP_TIMEOUT)
    stop_everything_after(spec)
    backend = open_backend(load_spec(spec))
    (first,) = backend.submit("cassandra", 1)
    second = backend.submit_successor(first)
    wait_for(lambda: job(backend, second.job_id).hold_reason, 30, "the successor waiting")
    backend.cancel(job(backend, second.job_id))
    cancelled = wait_for(lambda: (j := job(backend, second.job_id)) and j.state == "done" and j, 30, "cancelled")
    assert cancelled.ended_by == "cancel"
    assert job(backend, first.job_id).state == "running"
    assert runs.read_text().count("--service-id") == 1


@pytest.mark.vm
def test_local_walltime_sigterms_a_real_vm_which_shuts_down_and_deregisters(tmp_path, demo_image, stop_everything_after):
    # 40 s: the boot must come well inside the limit even while another worker boots VMs beside it
    # (15 s was missed once under the HTCondor group's load).
    spec_path = write_spec(tmp_path, demo_image, ", walltime: '0:40'")
    stop_everything_after(spec_path)
    spec = load_spec(spec_path)
    backend = open_backend(spec)
    (submitted,) = backend.submit("sage", 1)

    def registered():
        with open_registry(spec) as reg:
            return reg.get(submitted.service_id)

    wait_for(registered, 40, "the VM registered before its walltime")
    running = job(backend, submitted.job_id)
    assert (running.state, running.walltime_s, running.image) == ("running", 40, "demo@1")
    done = wait_for(lambda: (j := job(backend, submitted.job_id)) and j.state == "done" and j, 90, "the job ended")
    assert done.ended_by == "walltime"
    assert done.hold_reason == "walltime 40s reached: SIGTERM; the wrapper exited 0", done.hold_reason
    assert registered() is None
    err = (spec.store_path / "logs" / f"{submitted.job_id}.err").read_text()
    assert "SIGTERM: stopping the VM" in err and "guest shut down in" in err, err[-2000:]
