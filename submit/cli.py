"""`salvus_jobs scale | status | stop | render`: the operator's view of jobs on the scheduler."""
from __future__ import annotations

import argparse
import json
import sys
import time

from cluster.cliframe import format_age, format_table, printable
from cluster.spec import load_spec
from submit import open_backend


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("scale", parents=[common], help="run N VMs per role (submit or cancel jobs)",
                       description="Compare the desired count per role with the jobs the scheduler "
                                   "reports, then submit the shortfall or cancel the surplus (held and "
                                   "queued before running, never-registered before registered, newest "
                                   "first). Without ROLE=N, every role's 'count' from the spec.",
                       epilog="example: salvus_jobs scale sage=2 hub=1 --dry-run")
    p.add_argument("counts", nargs="*", metavar="ROLE=N")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("status", parents=[common], help="desired/queued/running/registered per role, and each job",
                       epilog="example: salvus_jobs status --json")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", parents=[common], help="cancel a role's jobs and wait until their VMs are down",
                       epilog="example: salvus_jobs stop sage hub   |   salvus_jobs stop --all")
    p.add_argument("roles", nargs="*", metavar="ROLE")
    p.add_argument("--all", action="store_true", help="every role in the spec")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait before killing (default: the roles' stop_timeout + 40)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("controller", parents=[common], help="keep every role at its count (long-running)",
                       description="Every controller.interval seconds: reconcile every role against the "
                                   "desired counts (`scale` records them), probe every registered service, "
                                   "replace unhealthy and dead VMs, reap orphans. One controller acts at a "
                                   "time (a registry lease); others stand by. Logs to stderr; status and "
                                   "metrics on http://controller.listen/.",
                       epilog="example: salvus_jobs controller -v")
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("upgrade", parents=[common], help="roll a role's VMs over to another image",
                       description="Record that ROLE's VMs move to IMAGE (NAME@VERSION). The controller "
                                   "replaces them roles.ROLE.max_surge at a time (default 1), each new VM "
                                   "healthy before an old one is drained, so a role never has fewer healthy "
                                   "VMs than desired; a version that fails to become healthy max_failures "
                                   "times halts the rollout, and the old VMs keep serving. Editing the "
                                   "spec's image: does the same. Jobs already queued boot what they were "
                                   "submitted with. Without --image or --rollback: show the rollout.",
                       epilog="example: salvus_jobs upgrade sage --image sage@2   |   "
                              "salvus_jobs upgrade sage --rollback")
    p.add_argument("role")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--image", metavar="NAME@VERSION", help="the image the role's VMs move to")
    how.add_argument("--rollback", action="store_true", help="return to what the last rollout replaced")
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("render", parents=[common], help="print a role's job description for a scheduler",
                       epilog="example: salvus_jobs render sage --scheduler slurm > sage.sbatch")
    p.add_argument("role")
    p.add_argument("--scheduler", metavar="NAME", default=None,
                   help="condor, pbs, slurm (default: the spec's scheduler.backend)")
    p.add_argument("--service-id", default=None, help="bake this service id into the job")
    p.set_defaults(func=cmd_render)


def cmd_scale(args: argparse.Namespace) -> int:
    from submit.scale import parse_desired, scale

    spec = load_spec(args.spec)
    plan, submitted = scale(spec, parse_desired(spec, args.counts), dry_run=args.dry_run)
    for line in plan.describe():
        print(printable(line))  # hold reasons come from the scheduler, any user's text
    if plan.controller:
        print(printable(f"{'would record' if args.dry_run else 'recorded'} the desired counts: "
                        f"{plan.controller} holds the lease and acts on them"))
    elif args.dry_run:
        print("(dry run: nothing changed)")
    elif plan.noop:
        print("nothing to do")
    else:
        for job in submitted:
            print(f"submitted {plan.backend} job {job.job_id} ({job.role}, {job.service_id or 'id from the job'})")
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from submit.controller import Controller
    from submit.controller_http import serve

    # Its events are its output: info by default, -v for debug.
    logging.getLogger().setLevel(max(logging.INFO - 10 * (args.verbose or 0), logging.DEBUG))
    controller = Controller(load_spec(args.spec))

    def request_stop(signum: int, _frame: object) -> None:
        controller.stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server = serve(controller)
    try:
        controller.run()
    finally:
        if server is not None:
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.server_close()
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from cluster.registry import open_registry
    from cluster.registry.lease import CONTROLLER_LEASE, holder_kind
    from submit.rollout import current, read_rollouts, rollback, start_upgrade

    spec = load_spec(args.spec)
    spec.role(args.role)
    with open_registry(spec) as registry:
        if args.image:
            r = start_upgrade(spec, registry, args.role, args.image)
        elif args.rollback:
            r = rollback(spec, registry, args.role)
        else:
            r = current(spec, args.role, read_rollouts(spec, registry))
            state = "halted: " + r.reason if r.halted else ("none" if r.target == r.previous else "rolling")
            print(printable(f"{args.role}: new jobs boot {r.image}; rollout {r.previous} -> {r.target}: {state} "
                            f"({r.failures} failure(s))"))
            return 0
        info = registry.lease(CONTROLLER_LEASE)
    print(printable(f"{args.role}: recorded the rollout {r.previous} -> {r.target}"))
    if info is not None and holder_kind(info.holder) == "controller":
        print(printable(f"{info.holder} holds the lease and rolls it out; follow it with salvus_jobs status"))
    else:
        print("no controller is running: start `salvus_jobs controller` to roll it out (a one-shot `scale` "
              "only submits new jobs with the new image)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from submit.controller_http import controller_report
    from submit.scale import status_report

    spec = load_spec(args.spec)
    report = controller_report(spec) or status_report(spec)
    if "unfit_hosts" not in report:  # the controller's report: the registry holds the marks
        from cluster.registry import open_registry
        from submit.scale import unfit_report

        with open_registry(spec) as registry:
            report["unfit_hosts"] = unfit_report(spec, registry)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    for line in status_lines(report):
        print(line)
    return 0


def status_lines(report: dict) -> list[str]:
    """`status_report`'s data as the lines `status` prints (the demo prints them too)."""
    lines = [f"backend: {report['backend']}"]
    figures = ["desired", "queued", "running", "held", "stopping", "registered"]
    if report.get("leader"):  # the controller's report: its health figures too
        lines.append(printable(f"controller: {report['leader']} (token {report.get('token')})"))
        figures += ["healthy", "unhealthy", "retiring", "draining"]
    lines += format_table(["ROLE", *(f.upper() for f in figures)],
                          [[role, *(str(c.get(k, 0)) for k in figures)]
                           for role, c in report["roles"].items()]).splitlines()
    if report["jobs"]:
        lines.append("")
        lines += format_table(["JOB", "ROLE", "STATE", "SERVICE", "ENDPOINT", "AGE", "NOTE"],
                              [[j["job_id"], j["role"], j["state"] + ("+registered" if j["registered"] else ""),
                                j["service_id"] or "-", j["endpoint"] or "-", format_age(j["age"]), j["hold_reason"]]
                               for j in report["jobs"]]).splitlines()
    for role, c in report["roles"].items():
        r = c.get("rollout")
        if r:
            lines.append(printable(f"rollout of {role}: {r['previous']} -> {r['target']}: {r['state']}, "
                                   f"{r['failures']}/{r['max_failures']} failures"
                                   + (f" ({r['reason']})" if r.get("reason") else "")))
    if report.get("unfit_hosts"):
        lines += ["", "hosts marked unfit (site jobs are placed elsewhere until `salvus_jobs network up` runs there):"]
        lines += format_table(["HOST", "SINCE", "REASON"],
                              [[u["host"], format_age(max(0.0, time.time() - u["since"])) + " ago", u["reason"]]
                               for u in report["unfit_hosts"]]).splitlines()
    return lines


def cmd_stop(args: argparse.Namespace) -> int:
    from cluster.errors import SpecError
    from submit.scale import stop_roles

    spec = load_spec(args.spec)
    if args.all == bool(args.roles):
        raise SpecError("stop: name the roles to stop, or --all (not both)")
    roles = list(spec.roles) if args.all else args.roles
    stopped = stop_roles(spec, roles, wait=True, timeout=args.timeout)
    print(f"stopped {len(stopped)} job(s)" + (f": {' '.join(j.job_id for j in stopped)}" if stopped else ""))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from submit.base import checked_service_id

    spec = load_spec(args.spec)
    checked_service_id(args.service_id)  # every backend bakes it into the job's text
    backend = open_backend(spec, args.scheduler)
    sys.stdout.write(backend.render(args.role, args.service_id))
    return 0
