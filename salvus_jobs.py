"""salvus_jobs: the operator's command line over specs, schedulers, the registry and the catalogue.

Each package contributes its commands through `add_commands(subparsers, common)`, so a command
lives next to the code it drives. The demo (`image build-demo`, `demo`) drives every part at once,
so it lives here, above the parts.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import catalogue.cli
import cluster.cli
import jobwrappers.sitenet.cli
import submit.cli
from cluster.cliframe import common_options, parse, run_command, setup_logging
from cluster.errors import SpecError, TempFailure
from cluster.registry import Service, open_registry
from cluster.spec import ClusterSpec, load_spec, resolve_spec_path
from cluster.store import Store
from jobwrappers.demo_image import COMPRESSION_TYPES, DEMO_NAME, DEMO_VERSION, build_demo_image, demo_image_paths

# salvus_jobs.py sits at the project root, in a checkout and in the editable install scripts/setup
# makes, so the example is found beside it; one file, no packaged copy that could drift from it.
EXAMPLE_SPEC = Path(__file__).resolve().parent / "examples" / "cluster.yaml"
DEMO_COUNTS = {"sage": 2, "hub": 1, "cassandra": 1}
DEMO_EXPRESSION = "12345*6789+(2**20)"


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="salvus_jobs", parents=[common],
        description="Run long-lived service VMs (sage, hub, cassandra) as batch jobs.",
        epilog="Every command takes --spec FILE. 'salvus_jobs COMMAND --help' explains one command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The order here is the order of --help.
    cluster.cli.add_commands(sub, common)
    submit.cli.add_commands(sub, common)
    add_demo_commands(sub, common)
    catalogue.cli.add_commands(sub, common)
    jobwrappers.sitenet.cli.add_commands(sub, common)
    return parser


def add_demo_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    image = sub.add_parser("image", parents=[common], help="build images for this machine")
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    p = isub.add_parser("build-demo", parents=[common],
                        help="build the tiny demo guest image (kernel, initramfs, qcow2 root)",
                        description="Builds demo-1.qcow2, demo-1.vmlinux and demo-1.initrd from this "
                                    "machine's Debian kernel and busybox in a few seconds, without root "
                                    "mounts. Default --out: where the spec's image_path points, else "
                                    "STORE/images/base. Without --spec, ./cluster.yaml or $SALVUS_SPEC, "
                                    "the spec is the bundled examples/cluster.yaml.",
                        epilog="example: salvus_jobs --spec examples/cluster.yaml image build-demo")
    p.add_argument("--out", type=Path, help="directory for the image files")
    p.add_argument("--compress", choices=COMPRESSION_TYPES, help="write the qcow2 with compressed clusters "
                   "(booted as it is; zstd: qcow2 compression_type=zstd)")
    p.set_defaults(func=cmd_build_demo)

    p = sub.add_parser("demo", parents=[common],
                       help="the whole system on this machine: sage=2 hub=1 cassandra=1, one computation",
                       description="Builds the demo image if missing, scales sage=2 hub=1 cassandra=1 on the "
                                   "spec's scheduler (the local executor by default), waits until all are "
                                   "registered, sends one computation through the hub to a sage VM, prints "
                                   "the answer and the status, then stops everything (unless --keep). "
                                   "Without --spec, ./cluster.yaml or $SALVUS_SPEC it uses the bundled "
                                   "one-machine examples/cluster.yaml (store under ~/.local/share/salvus).",
                       epilog="example: salvus_jobs demo   |   salvus_jobs --spec my.yaml demo --keep")
    p.add_argument("--keep", action="store_true", help="leave the VMs running")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for all VMs to be healthy (default: 2 x hypervisor.boot_timeout)")
    p.set_defaults(func=cmd_demo)


def demo_spec_path(arg: str | None) -> Path:
    """--spec, ./cluster.yaml or $SALVUS_SPEC as for every command; without any, the bundled example."""
    try:
        return resolve_spec_path(arg)
    except SpecError:
        if EXAMPLE_SPEC.is_file():
            return EXAMPLE_SPEC
        raise


def demo_image_dir(spec: ClusterSpec) -> Path:
    """Where the spec expects the demo image: beside a role's image_path, else the store's base dir."""
    for role in spec.roles.values():
        if role.image_path and Path(role.image_path).name == f"{DEMO_NAME}-{DEMO_VERSION}.qcow2":
            return Path(role.image_path).parent
    return Store.of(spec).base


def cmd_build_demo(args: argparse.Namespace) -> int:
    out = args.out or demo_image_dir(load_spec(demo_spec_path(args.spec)))
    image = build_demo_image(out, compression=args.compress)
    for p in image.paths():
        print(p)
    return 0


def http_get(host: str, port: int, path: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_healthy(spec: ClusterSpec, counts: dict[str, int], timeout: float) -> dict[str, list[Service]]:
    deadline = time.monotonic() + timeout
    last = ""
    with open_registry(spec) as reg:
        while True:
            live = {role: reg.lookup(role) for role in counts}
            line = " ".join(f"{r}={len(live[r])}/{n}" for r, n in counts.items())
            if line != last:
                print(f"registered: {line}", flush=True)
                last = line
            if all(len(live[r]) >= n for r, n in counts.items()):
                return live
            if time.monotonic() > deadline:
                raise TempFailure(f"demo: not all VMs registered within {timeout:.0f} s ({line}); "
                                  "see `salvus_jobs status` and the job logs in STORE/logs/")
            time.sleep(1)


def compute_through_hub(hub: Service, n_sages: int, timeout: float) -> str:
    """Waits until the hub knows its sages, then forwards one computation through it."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_get(hub.host, hub.port, "/")
        if status == 200 and len(json.loads(body).get("sages", [])) >= n_sages:
            break
        if time.monotonic() > deadline:
            raise TempFailure(f"demo: hub {hub.service_id} did not learn its sages within {timeout:.0f} s")
        time.sleep(0.5)
    status, body = http_get(hub.host, hub.port, "/compute?expr=" + urllib.parse.quote(DEMO_EXPRESSION))
    if status != 200:
        raise TempFailure(f"demo: hub {hub.service_id} answered {status}: {body.strip()}")
    return body.strip()


def cassandra_report(svc: Service) -> str:
    with socket.create_connection((svc.host, svc.port), timeout=10) as s:
        s.shutdown(socket.SHUT_WR)
        return s.makefile().readline().strip()


def cmd_demo(args: argparse.Namespace) -> int:
    from submit.scale import scale, status_report, stop_roles

    spec = load_spec(demo_spec_path(args.spec))
    for role in DEMO_COUNTS:
        spec.role(role)
    image = demo_image_paths(demo_image_dir(spec))
    if not image.exists():
        print(f"building the demo image in {image.disk.parent}", flush=True)
        build_demo_image(image.disk.parent)
    timeout = args.timeout or 2 * float(spec.hypervisor.boot_timeout)
    t0 = time.monotonic()
    plan, submitted = scale(spec, dict(DEMO_COUNTS))
    for line in plan.describe():
        print(line)
    try:
        live = wait_healthy(spec, DEMO_COUNTS, timeout)
        print(f"all {sum(DEMO_COUNTS.values())} VMs registered in {time.monotonic() - t0:.1f} s")
        hub = live["hub"][0]
        answer = compute_through_hub(hub, DEMO_COUNTS["sage"], timeout=60)
        print(f"hub {hub.service_id} ({hub.endpoint}) forwarded {DEMO_EXPRESSION} to a sage VM: {answer}")
        print(f"cassandra {live['cassandra'][0].service_id}: {cassandra_report(live['cassandra'][0])}")
        print()
        for line in submit.cli.status_lines(status_report(spec)):
            print(line)
    finally:
        if not args.keep:
            print("stopping the demo VMs", flush=True)
            stopped = stop_roles(spec, list(DEMO_COUNTS), wait=True)
            print(f"stopped {len(stopped)} job(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    setup_logging(args.verbose)
    return run_command("salvus_jobs", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
